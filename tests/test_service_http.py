"""The real thing: `bentoml serve` in a subprocess, called over HTTP with httpx and BentoML's client."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from devtools.photos import (
    ASTRONAUT_FACE_CENTRE,
    astronaut,
    box_centre,
    encode,
    face_grid,
    group_photo,
    many_scans_jpeg,
    no_face,
    one_bit_png,
)
from models.artifact import array_preprocess_for, stored_meta
from models.images import MAX_JPEG_SCANS
from training.utkface import read_metadata

from .conftest import SERVER_LIMITS, served_graph

JPEG = "image/jpeg"


def post(url: str, path: str, files, **kw) -> httpx.Response:
    return httpx.post(url + path, files=files, timeout=60, **kw)


def predict(url: str, image: Image.Image) -> dict:
    r = post(url, "/predict", {"image": ("photo.jpg", encode(image), JPEG)})
    assert r.status_code == 200, r.text
    return r.json()


def test_astronaut_one_face_at_the_right_place(server: str) -> None:
    body = predict(server, astronaut())
    assert (body["width"], body["height"]) == (512, 512)
    (face,) = body["faces"]
    assert np.linalg.norm(box_centre(face["box"]) - ASTRONAUT_FACE_CENTRE) < 20
    assert 60 < face["box"]["width"] < 130 and face["detection_score"] > 0.5
    assert face["gender"] in ("male", "female") and 0.5 <= face["gender_probability"] <= 1
    assert 0 <= face["age"] <= 120


def test_group_photo_every_face_largest_first(server: str) -> None:
    photo, centres = group_photo()
    faces = predict(server, photo)["faces"]
    assert len(faces) == len(centres)
    areas = [f["box"]["width"] * f["box"]["height"] for f in faces]
    assert areas == sorted(areas, reverse=True)
    for face, centre in zip(faces, centres, strict=True):  # pasted largest first too
        assert np.linalg.norm(box_centre(face["box"]) - centre) < 0.2 * face["box"]["width"]


@pytest.mark.parametrize("name", ["coffee", "chelsea"])
def test_no_face(server: str, name: str) -> None:
    assert predict(server, no_face(name))["faces"] == []


def test_batch_equals_single(server: str) -> None:
    photos = [astronaut(), no_face("coffee"), group_photo()[0]]
    files = [("images", (f"{i}.jpg", encode(p), JPEG)) for i, p in enumerate(photos)]
    r = post(server, "/predict_batch", files)
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [predict(server, p) for p in photos]
    cut = encode(astronaut())[:3000] + b"\xff\xd9"  # whole headers, so that only decoding finds the fault
    r = post(server, "/predict_batch", [*files[:2], ("images", ("cut.jpg", cut, JPEG))])
    assert r.status_code == 400 and r.json()["error"].startswith("file #3: the image is corrupt or truncated"), r.text


def test_predict_faces_matches_in_process_model(server: str, model_tag: str, metadata_file: Path) -> None:
    import bentoml

    paths = read_metadata(metadata_file).query("split == 'test'").path.tolist()[:6]
    files = [("images", (Path(p).name, Path(p).read_bytes(), JPEG)) for p in paths]
    r = post(server, "/predict_faces", files)
    assert r.status_code == 200, r.text
    served = r.json()["predictions"]
    stored = bentoml.models.get(model_tag)
    meta = stored_meta(stored)
    crops = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    age_logits, logits = served_graph(stored.path, meta, array_preprocess_for(meta)(crops))
    calibration = meta.calibration
    age = (age_logits / calibration.age_temperature).softmax(1) @ torch.arange(117.0)  # expected age, years
    probs = (logits / calibration.gender_temperature).softmax(1)
    for s, a, p in zip(served, age.tolist(), probs, strict=True):
        k = int(p.argmax())
        assert s["age"] == pytest.approx(a, abs=0.02)
        assert s["gender"] == meta.gender_classes[k]
        assert s["gender_probability"] == pytest.approx(float(p[k]), abs=1e-3)


def _bad_requests():
    good = encode(astronaut())
    return {
        "non-image file": ({"image": ("notes.jpg", b"just some text", JPEG)}, 415, "not an image"),
        "truncated jpeg": ({"image": ("cut.jpg", good[:3000], JPEG)}, 400, "corrupt or truncated"),
        "empty file": ({"image": ("empty.jpg", b"", JPEG)}, 400, "empty"),
        "unsupported type": ({"image": ("notes.txt", b"text", "text/plain")}, 415, "content type text/plain"),
        "misnamed field": ({"photo": ("a.jpg", good, JPEG)}, 400, "unknown field 'photo'"),
        "string in file field": ({"image": (None, "http://example.com/a.jpg")}, 400, "must be a file upload"),
        "two files for one": ([("image", ("a.jpg", good, JPEG)), ("image", ("b.jpg", good, JPEG))], 400, "takes one"),
        # the second in another field: not "2 files in 'image'"
        "a second file field": (
            [("image", ("a.jpg", good, JPEG)), ("other", ("b.jpg", good, JPEG))],
            400,
            "got 2 files; this endpoint takes one, in field 'image'",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_input_gets_json_4xx_and_server_keeps_serving(server: str, case: str) -> None:
    files, status, message = _bad_requests()[case]
    r = post(server, "/predict", files)
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"} and message in body["error"]
    assert len(predict(server, astronaut())["faces"]) == 1


def test_missing_field_and_wrong_body(server: str) -> None:
    empty_form = {"content-type": "multipart/form-data; boundary=xyz"}
    r = httpx.post(server + "/predict", content=b"--xyz--\r\n", headers=empty_form, timeout=30)
    assert r.status_code == 400 and "missing field 'image'" in r.json()["error"]
    r = httpx.post(server + "/predict", data={"image": "x"}, timeout=30)  # url-encoded form
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = httpx.post(server + "/predict", json={"image": "x"}, timeout=30)
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = httpx.post(server + "/predict_faces", files={"other": ("a.jpg", b"x", JPEG)}, timeout=30)
    assert r.status_code == 400 and "'images'" in r.json()["error"]


def test_limits_answer_413(server: str) -> None:
    big = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    r = post(server, "/predict", {"image": ("big.png", encode(Image.fromarray(big), "PNG"), "image/png")})
    assert r.status_code == 413 and "byte limit" in r.json()["error"]
    bomb = encode(Image.new("RGB", (4000, 4000)), "PNG")  # 16 Mpx in 47 kB
    assert len(bomb) < SERVER_LIMITS["AGE_GENDER_MAX_BYTES"]
    r = post(server, "/predict", {"image": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["error"]
    limit = SERVER_LIMITS["AGE_GENDER_MAX_IMAGES"]
    small = encode(astronaut().resize((64, 64)))
    for n in (limit + 1, 5 * limit):
        r = post(server, "/predict_batch", [("images", (f"{i}.jpg", small, JPEG)) for i in range(n)])
        assert r.status_code == 413 and f"got {n} images; at most {limit}" in r.json()["error"]
    assert len(predict(server, astronaut())["faces"]) == 1


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("one_bit.png", one_bit_png(3500), "pixels per byte"),  # 12 Mpx in 1.5 kB, under the pixel limit
        ("scans.jpg", many_scans_jpeg(astronaut().resize((2000, 2000)), MAX_JPEG_SCANS + 1), "progressive scans"),
    ],
)
def test_costly_files_answer_413_at_once(server: str, name: str, data: bytes, message: str) -> None:
    r = post(server, "/predict", {"image": (name, data, "application/octet-stream")})
    assert r.status_code == 413 and message in r.json()["error"] and r.elapsed.total_seconds() < 2, r.text


def test_face_limit_answers_the_largest_and_counts_the_rest(server: str) -> None:
    limit = SERVER_LIMITS["AGE_GENDER_MAX_FACES"]
    grid = face_grid(3, 160)  # 9 faces, all of one size
    body = predict(server, Image.fromarray(grid))
    assert len(body["faces"]) == limit and body["omitted_faces"] == 9 - limit
    assert predict(server, group_photo()[0])["omitted_faces"] == 0  # exactly the limit


def _unusual_requests() -> dict:
    """(method, path, httpx keyword arguments, status) for the request classes the guard answers itself."""
    jpeg, png = encode(astronaut()), encode(astronaut(), "PNG")
    grey16 = encode(Image.fromarray(np.asarray(astronaut().convert("L")).astype(np.uint16) * 257), "PNG")

    def raw(body: bytes, ctype: str = "multipart/form-data; boundary=xYz0") -> dict:
        return {"content": body, "headers": {"content-type": ctype}}

    def part(disposition: str, data: bytes) -> bytes:
        return f"--xYz0\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode() + data + b"\r\n"

    end = b"--xYz0--\r\n"
    one = part('name="image"; filename="a.jpg"', jpeg) + end
    many = raw(part("name=images; filename=a", b"x") * 40_000 + end)  # under the test server's byte limit
    return {
        "no boundary": ("POST", "/predict", raw(one, "multipart/form-data"), 400),
        "wrong boundary": ("POST", "/predict", raw(one, "multipart/form-data; boundary=other"), 400),
        "nameless part": ("POST", "/predict", raw(part('filename="a.jpg"', jpeg) + end), 400),
        "folded header": ("POST", "/predict", raw(part('name="image";\r\n filename="a.jpg"', jpeg) + end), 400),
        "image as a text field": ("POST", "/predict", raw(part('name="image"', jpeg) + end), 400),
        "40,000 one-byte parts": ("POST", "/predict_batch", many, 413),
        "mixed-case media type": ("POST", "/predict", raw(one, "Multipart/Form-Data; boundary=xYz0"), 200),
        "400-character file name": ("POST", "/predict", {"files": {"image": ("x" * 400 + ".jpg", jpeg, JPEG)}}, 200),
        "png declared image/jpg": ("POST", "/predict", {"files": {"image": ("a.jpg", png, "image/jpg")}}, 200),
        "16-bit greyscale png": ("POST", "/predict", {"files": {"image": ("a.png", grey16, "image/png")}}, 200),
        "model_info given a list": ("POST", "/model_info", {"json": [None, None]}, 400),
        "GET an upload route": ("GET", "/predict", {}, 405),
    }


@pytest.mark.parametrize("case", list(_unusual_requests()))
def test_unusual_requests_answer_at_once(server: str, case: str) -> None:
    method, path, kw, status = _unusual_requests()[case]
    r = httpx.request(method, server + path, timeout=30, **kw)
    assert r.status_code == status and r.elapsed.total_seconds() < 5, r.text
    if status == 200:  # the astronaut's face, largest first
        assert np.linalg.norm(box_centre(r.json()["faces"][0]["box"]) - ASTRONAUT_FACE_CENTRE) < 20
    else:
        assert set(r.json()) == {"error"}


def test_stalled_upload_answers_408_after_the_idle_timeout(server: str) -> None:
    import socket
    import time
    from urllib.parse import urlparse

    url = urlparse(server)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000\r\n\r\n--b\r\n"
        )
        start = time.monotonic()
        reply = b""
        while chunk := s.recv(4096):  # the client sends nothing more; the server answers and closes
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b'{"error":' in reply, reply
    assert 9 < time.monotonic() - start < 20  # AGE_GENDER_IDLE_TIMEOUT, 10 s by default


def _batch_histogram(metrics: str) -> tuple[float, float]:
    """(batches of size 1, all batches) of the model service's adaptive batching."""

    def value(pattern: str) -> float:
        return sum(float(m) for m in re.findall(pattern + r'[^\n]*method_name="predict"[^\n]*\} ([0-9.e+]+)', metrics))

    ones = value(r'bentoml_service_adaptive_batch_size_bucket\{le="1\.0",')
    return ones, value(r"bentoml_service_adaptive_batch_size_count\{")


def _burst(url: str, path: str, files: dict, n: int = 32) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(url + path, files=files) for _ in range(n)))

    return asyncio.run(run())


def test_32_concurrent_requests_succeed_and_share_batches(server: str, metadata_file: Path) -> None:
    responses = _burst(server, "/predict", {"image": ("a.jpg", encode(astronaut()), JPEG)})
    assert [r.status_code for r in responses] == [200] * 32
    assert all(len(r.json()["faces"]) == 1 for r in responses)
    # /predict is paced by the detector, so batches there depend on its speed; pre-cropped faces reach the
    # model service together, which must then group them
    ones_before, total_before = _batch_histogram(httpx.get(server + "/metrics").text)
    crop = Path(read_metadata(metadata_file).path.iloc[0]).read_bytes()
    responses = _burst(server, "/predict_faces", {"images": ("face.jpg", crop, JPEG)})
    assert [r.status_code for r in responses] == [200] * 32
    assert len({r.text for r in responses}) == 1, "the same crop must give the same answer in any batch"
    ones, total = _batch_histogram(httpx.get(server + "/metrics").text)
    assert total - total_before < 32, "every face went to the model alone: no batching"
    assert (total - total_before) - (ones - ones_before) > 0, "no batch larger than one"


def test_bentoml_sync_client(server: str, tmp_path: Path) -> None:
    import bentoml

    path = tmp_path / "astronaut.jpg"
    astronaut().save(path)
    with bentoml.SyncHTTPClient(server) as client:
        result = client.predict(image=path)
        batch = client.predict_batch(images=[path, path])
        info = client.model_info()
    assert len(result["faces"]) == 1
    assert batch["results"] == [result, result]
    assert info["demo"] is True and info["dataset"] == "sample" and info["backbone"] == "resnet18"


def test_answers_carry_an_age_interval_and_p_minor(server: str) -> None:
    r = httpx.post(server + "/predict", files={"image": ("a.jpg", encode(astronaut()), "image/jpeg")}, timeout=60)
    (face,) = r.json()["faces"]
    interval = face["age_interval"]
    assert interval["level"] == 0.8 and 0 <= interval["low"] <= face["age"] <= interval["high"] <= 116
    assert 0 <= face["minor_probability"] <= 1 and 0.5 <= face["gender_probability"] <= 1
    info = httpx.post(server + "/model_info").json()
    assert info["age_head"] == "distribution" and info["interval_level"] == 0.8 and info["gender_temperature"] > 0
    assert 0 <= info["test_metrics"]["interval_coverage"] <= 1 and info["model_card"] == "/model_card"
    assert 0 <= info["test_metrics"]["cs5"] <= 1 and info["test_metrics"]["n"] > 0  # every stored test metric


def test_model_card_route(server: str) -> None:
    r = httpx.get(server + "/model_card")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    assert r.text.startswith("# Model card") and "DEMO MODEL" in r.text and "## Known limits" in r.text
    assert "(`metadata.csv`)" in r.text and str(Path.home()) not in r.text and "/tmp/" not in r.text  # no paths
    spec = httpx.get(server + "/docs.json").json()
    assert "text/markdown" in spec["paths"]["/model_card"]["get"]["responses"]["200"]["content"]


def test_health_and_docs(server: str) -> None:
    for path in ("/livez", "/readyz", "/metrics", "/"):
        assert httpx.get(server + path).status_code == 200, path
    # every answer carries a request ID, the guard's own 4xx too (serving/edge.py is outside it)
    r = httpx.post(server + "/predict", content=b"x", headers={"X-Request-ID": "edge-1", "content-type": "text/plain"})
    assert r.status_code == 415 and r.headers["X-Request-ID"] == "edge-1"
    # the docs page: Swagger UI from the service's own assets, no tag manager or any other host
    page = httpx.get(server + "/").text
    assert "SwaggerUIBundle" in page and "googletagmanager" not in page and "://" not in page
    for asset in re.findall(r'(?:src|href)="\./([^"]+)"', page):
        assert httpx.get(f"{server}/{asset}").status_code == 200, asset
    spec = httpx.get(server + "/docs.json").json()
    text = str(spec)
    assert "'type': 'file'" not in text and "'type': 'tensor'" not in text
    assert spec["paths"]["/predict"]["post"]["operationId"] == "predict"


def test_request_id_is_in_every_process_log_line_of_the_request(server: str, server_log: Path) -> None:
    """Several requests one after another, on the same pooled connections to the dependencies: each
    process's access log line names the request it served (BentoML's own context once named an earlier
    one in the model service's lines)."""
    ids, photo = [f"trace-{i}" for i in range(4)], {"image": ("a.jpg", encode(astronaut()), JPEG)}
    for request_id in ids:
        r = post(server, "/predict", photo, headers={"X-Request-ID": request_id})
        assert r.status_code == 200 and r.headers["X-Request-ID"] == request_id
    time.sleep(0.5)  # access log lines are written as the answers leave
    log = server_log.read_text().splitlines()
    for request_id in ids:
        lines = [line for line in log if f"[request {request_id}]" in line]
        # BentoML's access log line in each process the request reached: API, a detector, the model
        for where in (":AgeGender:", ":FaceDetection:", ":AgeGenderModel:"):  # as in [entry_service:AgeGender:1]
            assert any(where in line and "path=/" in line for line in lines), (request_id, where, lines)


def test_openapi_generates_a_working_client(server: str, tmp_path: Path) -> None:
    spec = tmp_path / "openapi.json"
    spec.write_text(httpx.get(server + "/docs.json").text)
    import subprocess

    config = tmp_path / "config.yaml"  # as README gives it: /annotate's PNG answer comes back as a File
    config.write_text("content_type_overrides:\n  image/png: application/octet-stream\n")
    gen = subprocess.run(
        [
            *(str(Path(sys.executable).parent / "openapi-python-client"), "generate", "--path", str(spec)),
            *("--meta", "none", "--config", str(config)),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert gen.returncode == 0, gen.stdout + gen.stderr
    assert "will not be generated" not in gen.stdout + gen.stderr
    assert "Unsupported content_type" not in gen.stdout + gen.stderr  # /annotate's image/png is read as bytes
    sys.path.insert(0, str(tmp_path))
    try:
        from age_gender_client import Client
        from age_gender_client.api.service_ap_is import predict as predict_api
        from age_gender_client.models import PredictInput
        from age_gender_client.types import File

        client = Client(base_url=server, timeout=60)
        with spec.open("rb") as f:
            body = PredictInput(image=File(payload=f, file_name="spec.jpg", mime_type="image/jpeg"))
            bad = predict_api.sync_detailed(client=client, body=body)
        assert bad.status_code == 415 and "not an image" in bad.parsed.error
        photo = tmp_path / "a.jpg"
        astronaut().save(photo)
        with photo.open("rb") as f:
            result = predict_api.sync(client=client, body=PredictInput(image=File(payload=f, file_name="a.jpg")))
        assert result.width == 512 and len(result.faces) == 1
        assert result.faces[0].gender.value in ("male", "female")
        from age_gender_client.api.service_ap_is import annotate as annotate_api
        from age_gender_client.models import AnnotateInput

        with photo.open("rb") as f:
            drawn = annotate_api.sync(client=client, body=AnnotateInput(image=File(payload=f, file_name="a.jpg")))
        assert Image.open(drawn.payload).size == (512, 512)  # the answer's type is generated
    finally:
        sys.path.remove(str(tmp_path))
