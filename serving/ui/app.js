// The page calls the same public API as every client: POST /predict, one photo per request.
"use strict";

const results = document.getElementById("results");
// Photos are sent IN_FLIGHT at a time, from one queue for all drops: a folder dropped on the page must not
// meet the server's limit on requests in flight (429) all at once. A 429 that still comes (other clients)
// is retried after its Retry-After for up to RETRY_FOR_MS.
const IN_FLIGHT = 2;
const RETRY_FOR_MS = 60_000;
const waiting = []; // [file, its card] not yet sent
let senders = 0;

function label(face) {
  return `${Math.round(face.age)} · ${face.gender} ${Math.round(face.gender_probability * 100)} %`;
}

function el(tag, attrs = {}, text = "") {
  const node = Object.assign(document.createElement(tag), attrs);
  if (text) node.textContent = text;
  return node;
}

function showFaces(card, url, body) {
  const photo = el("div", { className: "photo" });
  const img = el("img", { src: url, alt: "uploaded photo" });
  // TIFF, which the API takes, is a format most browsers cannot show: say so instead of a broken picture
  img.addEventListener("error", () => photo.replaceChildren(
    el("p", { className: "message" }, "This browser cannot show this file's format; the faces found are listed below.")));
  photo.append(img);
  body.faces.forEach((face) => {
    // boxes are in pixels of the uploaded image: place them in percent so they scale with the picture
    const b = face.box;
    const box = el("div", { className: "box" });
    Object.assign(box.style, {
      left: `${(100 * b.x) / body.width}%`, top: `${(100 * b.y) / body.height}%`,
      width: `${(100 * b.width) / body.width}%`, height: `${(100 * b.height) / body.height}%`,
    });
    box.append(el("span", {}, label(face)));
    photo.append(box);
  });
  card.append(photo);
  if (body.faces.length === 0) {
    card.append(el("p", { className: "message" }, "No face found in this photo."));
    return;
  }
  const table = el("table");
  table.append(el("tr", {
    innerHTML: "<th>#</th><th>age</th><th>age interval</th><th>P(under 18)</th><th>gender</th>" +
      "<th>probability</th><th>box (x, y, w, h)</th>",
  }));
  body.faces.forEach((f, i) => {
    const row = el("tr");
    const interval = f.age_interval
      ? `${f.age_interval.low.toFixed(0)}–${f.age_interval.high.toFixed(0)} (${Math.round(f.age_interval.level * 100)} %)`
      : "n/a";
    const minor = f.minor_probability != null ? `${(f.minor_probability * 100).toFixed(1)} %` : "n/a";
    [i + 1, f.age.toFixed(1), interval, minor, f.gender, `${(f.gender_probability * 100).toFixed(1)} %`,
      `${f.box.x}, ${f.box.y}, ${f.box.width}, ${f.box.height}`].forEach((v) => row.append(el("td", {}, String(v))));
    table.append(row);
  });
  card.append(table);
}

function newCard(file) {
  const card = el("section", { className: "card" });
  card.append(el("h2", {}, file.name));
  const status = el("p", { className: "message" }, "Waiting…");
  card.append(status);
  results.prepend(card);
  return { card, status };
}

async function post(form, status) {
  const giveUp = Date.now() + RETRY_FOR_MS;
  for (;;) {
    const response = await fetch("/predict", { method: "POST", body: form });
    const wait = 1000 * (Number(response.headers.get("retry-after")) || 1);
    if (response.status !== 429 || Date.now() + wait > giveUp) return response;
    response.body?.cancel(); // its error is not shown: the photo is sent again
    status.textContent = "Server busy, trying again…";
    await new Promise((resolve) => setTimeout(resolve, wait));
    status.textContent = "Detecting faces…";
  }
}

function problem(status, body) {
  if (status >= 500) return "Server error";
  if (body.error == null) return "Unexpected answer"; // not the API's JSON: a proxy's page, say
  if (status === 429) return "Server busy";
  return "Could not read this file";
}

async function predict(file, { card, status }) {
  status.textContent = "Detecting faces…";
  const form = new FormData();
  form.append("image", file, file.name);
  let message;
  try {
    const response = await post(form, status);
    const body = await response.json().catch(() => ({}));
    if (response.ok && Array.isArray(body.faces)) {
      status.remove();
      showFaces(card, URL.createObjectURL(file), body);
      return;
    }
    message = `${problem(response.status, body)}: ${body.error ?? `server answered HTTP ${response.status} without the API's JSON`}`;
  } catch (err) {
    message = `Server error: ${err.message}`;
  }
  status.className = "message error";
  status.textContent = message;
  card.append(status); // at the card's end, where a failure in showFaces had taken it out
}

async function send() {
  senders++;
  try {
    while (waiting.length) await predict(...waiting.shift());
  } finally {
    senders--;
  }
}

function handle(files) {
  Array.from(files).forEach((file) => waiting.push([file, newCard(file)]));
  while (senders < IN_FLIGHT && waiting.length) send(); // send() takes its first photo at once
}

async function showModel() {
  const node = document.getElementById("model");
  try {
    const info = await (await fetch("/model_info", { method: "POST" })).json();
    node.textContent = `Model ${info.tag}: ${info.backbone}, ${info.image_size} px, trained on ${info.dataset}` +
      (info.test_metrics.age_mae != null ? `; test age MAE ${info.test_metrics.age_mae.toFixed(2)} years` : "") +
      (info.test_metrics.gender_acc != null ? `, gender accuracy ${(100 * info.test_metrics.gender_acc).toFixed(1)} %` : "");
    document.getElementById("demo-warning").hidden = !info.demo;
  } catch (err) {
    node.textContent = `Model information unavailable: ${err.message}`;
  }
  const card = document.getElementById("model-card");
  const response = await fetch("/model_card").catch(() => null);
  if (response && response.ok) {
    card.querySelector("pre").textContent = await response.text();
    card.hidden = false;
  }
}

const drop = document.getElementById("drop");
document.getElementById("files").addEventListener("change", (e) => handle(e.target.files));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handle(e.dataTransfer.files); });
showModel();
