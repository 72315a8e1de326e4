"""The /ui page in a real headless Chromium against a real `bentoml serve`, and POST /annotate."""

from __future__ import annotations

import io
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from devtools.launch import running_service
from devtools.photos import ASTRONAUT_FACE_CENTRE, astronaut, encode, group_photo
from models.schemas import PhotoResult
from serving.annotate import annotate

from .conftest import ROOT

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [  # what Chromium needs on a machine with no network but the package registries
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_annotate_draws_inside_the_box_only(server: str) -> None:
    photo = astronaut()
    r = httpx.post(server + "/annotate", files={"image": ("a.jpg", encode(photo, "PNG"), "image/png")}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:300]
    drawn = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    original = np.asarray(photo).astype(int)
    assert drawn.shape == original.shape
    box = httpx.post(server + "/predict", files={"image": ("a.jpg", encode(photo, "PNG"), "image/png")}).json()
    b = box["faces"][0]["box"]
    changed = np.abs(drawn - original).sum(2) > 30
    ys, xs = np.nonzero(changed)
    assert changed[b["y"] : b["y"] + b["height"], b["x"] : b["x"] + b["width"]].any(), "nothing drawn on the face"
    # the outline and its label: nothing changed far from the box
    margin = 40
    assert xs.min() >= b["x"] - margin and xs.max() <= b["x"] + b["width"] + 4 * margin
    assert ys.min() >= b["y"] - margin and ys.max() <= b["y"] + b["height"] + margin


ODD_SHAPES = [(1, 1), (1, 2_700_000), (20_000, 1), (3, 4000), (2, 2)]  # (height, width)


@pytest.mark.parametrize("route", ["/predict", "/predict_batch", "/predict_faces", "/annotate"])
def test_every_route_answers_odd_shapes(server: str, route: str) -> None:
    """One-pixel images and extreme aspect ratios: 200 (no faces), never a 500; /annotate draws at any size."""
    field = "image" if route in ("/predict", "/annotate") else "images"
    for h, w in ODD_SHAPES:
        png = encode(Image.new("RGB", (w, h), (200, 150, 120)), "PNG")
        r = httpx.post(server + route, files={field: ("odd.png", png, "image/png")}, timeout=60)
        assert r.status_code == 200, (h, w, r.text[:300])
        if route == "/annotate":
            assert Image.open(io.BytesIO(r.content)).size == (w, h)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 2000),
    w=st.integers(1, 2000),
    boxes=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), max_size=4),
)
def test_annotate_draws_on_any_shape(h: int, w: int, boxes: list) -> None:
    """Any photo shape, boxes anywhere in it (at its edges, one pixel wide): a PNG of the same size."""
    faces = []
    for fx, fy, fw, fh in boxes:
        x, y = int(fx * (w - 1)), int(fy * (h - 1))
        box = {"x": x, "y": y, "width": max(1, int(fw * (w - x))), "height": max(1, int(fh * (h - y)))}
        faces.append({"box": box, "detection_score": 1.0, "age": 30.0, "age_interval": None})
        faces[-1] |= {"minor_probability": None, "gender": "female", "gender_probability": 0.9}
    png = annotate(np.zeros((h, w, 3), np.uint8), PhotoResult(width=w, height=h, faces=faces))
    assert Image.open(io.BytesIO(png)).size == (w, h)


def test_annotate_labels_of_small_faces_stay_small() -> None:
    """A 52 px face in a 4000x3000 photo: its label's band above the box stays under the face's height (the
    photo's scale alone gave it 100 px text, over the faces around it in a crowd)."""
    face = {"box": {"x": 2000, "y": 1500, "width": 52, "height": 52}, "detection_score": 1.0, "age": 30.0}
    face |= {"age_interval": None, "minor_probability": None, "gender": "male", "gender_probability": 0.9}
    png = annotate(np.zeros((3000, 4000, 3), np.uint8), PhotoResult(width=4000, height=3000, faces=[face]))
    rows = np.nonzero(np.asarray(Image.open(io.BytesIO(png))).any(axis=(1, 2)))[0]
    assert 1500 - rows.min() < 52 and rows.max() < 1500 + 52


def test_annotate_labels_at_the_right_edge_are_moved_inside() -> None:
    """A face at the photo's right edge: its label ends at the edge instead of being cut by it."""
    face = {"box": {"x": 590, "y": 100, "width": 50, "height": 50}, "detection_score": 1.0, "age": 30.0}
    face |= {"age_interval": None, "minor_probability": None, "gender": "female", "gender_probability": 0.9}
    png = annotate(np.zeros((480, 640, 3), np.uint8), PhotoResult(width=640, height=480, faces=[face]))
    band = np.asarray(Image.open(io.BytesIO(png)))[:100]  # the rows above the box: the label alone
    columns = np.nonzero(band.any(axis=(0, 2)))[0]
    assert columns.min() < 590 - 50 and columns.max() == 639  # wider than the face, so it starts left of it


def test_annotate_labels_fit_pillow_on_huge_sides() -> None:
    face = {"box": {"x": 0, "y": 0, "width": 1, "height": 1}, "detection_score": 1.0, "age": 30.0}
    face |= {"age_interval": None, "minor_probability": None, "gender": "male", "gender_probability": 0.9}
    png = annotate(np.zeros((1, 2_700_000, 3), np.uint8), PhotoResult(width=2_700_000, height=1, faces=[face]))
    assert Image.open(io.BytesIO(png)).size == (2_700_000, 1)


def test_annotate_rejects_non_images(server: str) -> None:
    r = httpx.post(server + "/annotate", files={"image": ("a.jpg", b"no image", "image/jpeg")}, timeout=30)
    assert r.status_code == 415 and "not an image" in r.json()["error"]


def test_ui_assets_are_served_locally(server: str) -> None:
    page = httpx.get(server + "/ui/").text
    assert "Age and gender recognition" in page
    for asset in ("/ui/app.js", "/ui/style.css"):
        assert httpx.get(server + asset).status_code == 200
    assert "http://" not in page and "https://" not in page  # no CDN, no web fonts


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (make test installs Debian's chromium)"
)


@needs_chromium
def test_page_in_a_real_browser(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "astronaut.jpg"
    astronaut().save(photo, quality=92)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not a photo")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(server + "/ui/")
        page.wait_for_selector("#model:has-text('Model age_gender:')")
        assert page.is_visible("#demo-warning"), "the demo model must be flagged"

        page.set_input_files("#files", str(photo))
        box = page.wait_for_selector(".photo .box", timeout=60_000)
        label = box.inner_text()
        assert re.fullmatch(r"\d+ · (male|female) \d+ %", label.strip()), label
        assert page.locator(".photo .box").count() == 1
        img = page.locator(".photo img").bounding_box()
        rect = box.bounding_box()
        # the drawn box sits on the astronaut's face, in the picture's displayed coordinates
        scale = img["width"] / 512
        centre = (
            (rect["x"] - img["x"] + rect["width"] / 2) / scale,
            (rect["y"] - img["y"] + rect["height"] / 2) / scale,
        )
        assert np.linalg.norm(np.subtract(centre, ASTRONAUT_FACE_CENTRE)) < 25
        assert page.locator("table tr").count() == 2  # header + one face
        cells = page.locator("table tr").nth(1).locator("td").all_inner_texts()
        assert re.fullmatch(r"\d+–\d+ \(80 %\)", cells[2]), cells  # the age interval at its level
        assert re.fullmatch(r"\d+\.\d %", cells[3]), cells  # P(under 18)
        page.click("#model-card summary")  # the model card, fetched from GET /model_card
        assert "Model card" in page.inner_text("#model-card pre")

        page.set_input_files("#files", str(not_image))
        error = page.wait_for_selector(".message.error", timeout=30_000).inner_text()
        assert "Could not read this file" in error and "not an image" in error
        page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)

        tiff = tmp_path / "astronaut.tif"  # accepted by the API, not shown by Chromium
        astronaut().save(tiff)
        page.set_input_files("#files", str(tiff))
        page.wait_for_selector(".photo:has-text('cannot show this file')", timeout=60_000)
        assert page.locator(".card").first.locator("table tr").count() == 2  # its face is still listed
        # a 200 that is not the API's answer (a proxy's login page): said so, not a blank card
        page.route("**/predict", lambda route: route.fulfill(status=200, content_type="text/html", body="<p>"))
        page.set_input_files("#files", str(photo))
        page.wait_for_selector(".card:first-child .message.error", timeout=30_000)
        assert "Unexpected answer" in page.locator(".card").first.inner_text()
        browser.close()


@needs_chromium
def test_page_sends_dropped_photos_within_the_servers_limit(model_tag: str, tmp_path: Path) -> None:
    """Three phone photos dropped at once on a server that handles two requests at a time, one of them
    another client's 50 Mpx photo: the page sends two at a time and retries the 429 after its Retry-After,
    and every photo gets its answer (sent all at once, they met 429s, shown as "Could not read this
    file")."""
    from playwright.sync_api import sync_playwright

    group, _ = group_photo()
    paths = [tmp_path / f"phone{i}.jpg" for i in range(3)]
    for path in paths:
        group.resize((4000, 3000)).save(path, quality=90)  # 12 Mpx: each takes a second or two to answer
    largest = encode(group.resize((8160, 6120)))  # ~5 s to answer: in flight while the page sends
    env = {"AGE_GENDER_MODEL": model_tag, "AGE_GENDER_MAX_CONCURRENCY": "2"}
    with running_service(env, tmp_path / "serve.log") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        statuses: list[int] = []
        page.on("response", lambda r: statuses.append(r.status) if r.url.endswith("/predict") else None)
        page.goto(url + "/ui/")
        page.wait_for_selector("#model:has-text('Model age_gender:')")
        with ThreadPoolExecutor(1) as other:
            theirs = other.submit(httpx.post, url + "/predict", files={"image": ("l.jpg", largest)}, timeout=60)
            time.sleep(1)  # their photo is being handled
            page.set_input_files("#files", [str(path) for path in paths])
            answered = "document.querySelectorAll('.card .photo, .card .message.error').length === 3"
            page.wait_for_function(answered, timeout=120_000)
        errors = page.locator(".card .message.error").all_inner_texts()
        browser.close()
    assert theirs.result().status_code == 200
    assert not errors, errors
    assert statuses.count(200) == 3 and 429 in statuses, statuses  # the retry was needed, and worked
