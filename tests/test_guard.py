"""The request guard (serving/guard.py), the OpenAPI rewriting (serving/openapi.py) and decode_image, in-process.

The guard is wrapped around a tiny stand-in BentoML service with the same API signatures as the real one
(no model): BentoML parses what the guard passes on exactly as in production, in about a second. Slow and
stalled clients are played by hand-written ASGI receive() functions.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from pathlib import Path

import bentoml
import numpy as np
import pytest
from PIL import Image
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from devtools.forms import MALFORMED, MULTIPART, PNG, B, form, part
from devtools.photos import astronaut, encode
from models.faces import FaceDetector
from models.images import decode_image, image_format
from serving.guard import DRAIN_UP_TO, FileField, RequestGuard
from serving.openapi import StandardOpenAPI
from serving.uploads import SPOOL_BYTES

MAX_IMAGES = 4
LIMITS = {
    "max_bytes": 20_000_000,
    "max_images": MAX_IMAGES,
    "max_pixels": 2_000_000,
    "max_request_pixels": 3_000_000,
    "idle_timeout": 0.3,
    "upload_timeout": 1.0,
    "min_upload_rate": 100,
}
ROUTES = {"/predict": FileField("image", many=False), "/predict_batch": FileField("images", many=True)}


@bentoml.service
class StandIn:
    """The public API's signatures; answers what BentoML handed it."""

    @bentoml.api
    def predict(self, image: Path) -> dict:
        data = image.read_bytes()
        return {"name": image.name, "format": image_format(data), "size": len(data), "sha": _sha(data)}

    @bentoml.api
    def predict_batch(self, images: list[Path]) -> dict:
        return {"names": [p.name for p in images], "sizes": [p.stat().st_size for p in images]}

    @bentoml.api
    def model_info(self) -> dict:
        return {"demo": True}


StandIn.add_asgi_middleware(RequestGuard, routes=ROUTES, **LIMITS)
StandIn.add_asgi_middleware(StandardOpenAPI)


@pytest.fixture(scope="module")
def client():
    with TestClient(StandIn.to_asgi(), raise_server_exceptions=False) as c:
        yield c


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def post(client, path: str, body: bytes, ctype: bytes | str = b"multipart/form-data; boundary=" + B):
    start = time.perf_counter()
    r = client.post(path, content=body, headers={"content-type": ctype if isinstance(ctype, str) else ctype.decode()})
    return r, time.perf_counter() - start


def error_of(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_multipart_answers_400_at_once(client, case: str) -> None:
    body, ctype, message = MALFORMED[case]
    r, seconds = post(client, "/predict", body, ctype)
    assert message in error_of(r, 400) and seconds < 2


def test_media_type_is_case_insensitive(client) -> None:
    r, _ = post(client, "/predict", form(part(b"image", PNG)), "Multipart/Form-Data; Boundary=" + B.decode())
    assert r.status_code == 200, r.text


def test_any_file_name_works_and_is_replaced(client) -> None:
    for name in (b"x" * 400 + b".jpg", "ünïcødé ".encode() * 40 + b".png", b"../../etc/passwd", b"a\\b\\c.png", b""):
        r, _ = post(client, "/predict", form(part(b"image", PNG, filename=name)))
        assert r.status_code == 200, (name[:20], r.text)
        assert r.json()["name"].endswith("image-0.png") and r.json()["size"] == len(PNG)


def test_images_are_recognised_from_their_bytes(client) -> None:
    photo = astronaut().resize((64, 64))
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"):
        for declared in (b"image/jpg", b"application/octet-stream", b"text/plain"):
            r, _ = post(
                client, "/predict", form(part(b"image", encode(photo, fmt), filename=b"photo.jpg", ctype=declared))
            )
            assert r.status_code == 200 and r.json()["format"] == fmt, (fmt, declared, r.text)
            suffix = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
            assert r.json()["name"].endswith(f"image-0.{suffix}")
    mpo = _saved(photo, "MPO", save_all=True, append_images=[photo])  # a JPEG with a second picture (phones)
    r, _ = post(client, "/predict", form(part(b"image", mpo)))
    assert r.status_code == 200 and r.json()["format"] == "JPEG" and r.json()["name"].endswith("image-0.jpg")
    for data in (b"just some text", encode(photo, "ICO"), encode(photo, "PPM"), b"GIF89a but not really", b"\x00" * 64):
        r, _ = post(client, "/predict", form(part(b"image", data, ctype=b"image/jpeg")))
        message = error_of(r, 415)
        assert "not an image" in message and "JPEG, PNG, WebP, BMP, GIF or TIFF" in message, message


def test_large_files_arrive_whole_through_the_spool(client) -> None:
    """Bodies past SPOOL_BYTES are kept in a temporary file and handed on in chunks: every byte arrives."""
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    png = encode(Image.fromarray(noise), "PNG")
    assert len(png) > 10 * SPOOL_BYTES
    r, _ = post(client, "/predict", form(part(b"image", png)))
    assert r.status_code == 200 and r.json()["size"] == len(png) and r.json()["sha"] == _sha(png), r.text
    r, _ = post(client, "/predict_batch", form(part(b"images", png), part(b"images", PNG), part(b"images", png)))
    assert r.status_code == 200 and r.json()["sizes"] == [len(png), len(PNG), len(png)], r.text


def test_spool_files_are_closed_whatever_the_answer(client) -> None:
    """Every spool file (bodies past SPOOL_BYTES) is closed after its request: answered, refused after
    the check, or refused while being read."""
    big = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    png = encode(Image.fromarray(np.frombuffer(big, np.uint8)[:270_000].reshape(300, 300, 3)), "PNG")
    cases = {
        200: form(part(b"image", png)),
        415: form(part(b"image", big)),  # not an image: refused by the check
        400: form(part(b"image", png))[:-10],  # truncated: refused by the parser
    }
    post(client, "/predict", cases[200])  # warm: the check's thread, BentoML's temporary folder
    before = len(os.listdir("/proc/self/fd"))
    for status, body in cases.items():
        for _ in range(5):
            r, _ = post(client, "/predict", body)
            assert r.status_code == status, r.text
    assert len(os.listdir("/proc/self/fd")) == before


def test_many_parts_are_rejected_without_parsing_them(client) -> None:
    one_byte = part(b"images", b"x", filename=b"a")
    r, seconds = post(client, "/predict_batch", form(*[one_byte] * 150_000))
    assert f"got 150000 images; at most {MAX_IMAGES}" in error_of(r, 413) and seconds < 1.5
    r, seconds = post(client, "/predict", form(*[part(b"image", b"x", filename=b"a")] * 150_000))
    assert "takes one" in error_of(r, 400) and seconds < 1.5
    r, seconds = post(client, "/predict", form(*[part(b"f", b"x", filename=None)] * 150_000))
    assert "text fields" in error_of(r, 400) and seconds < 1.5


def test_pixel_budget_per_image_and_per_request(client) -> None:
    big = encode(Image.new("RGB", (1000, 1000)), "PNG")  # 1 Mpx in a few kB: checked from the header
    r, _ = post(client, "/predict_batch", form(*[part(b"images", big)] * 3))
    assert r.status_code == 200, r.text
    r, _ = post(client, "/predict_batch", form(*[part(b"images", big)] * 4))
    assert "3000000 pixels" in error_of(r, 413)
    r, _ = post(client, "/predict", form(part(b"image", encode(Image.new("RGB", (1500, 1500)), "PNG"))))
    assert "1500x1500 pixels" in error_of(r, 413)


def test_no_input_route_takes_empty_bodies_only(client) -> None:
    for body, ctype in ((b"", "application/json"), (b"{}", "application/json"), (b"null", "application/json")):
        r, _ = post(client, "/model_info", body, ctype)
        assert r.status_code == 200 and r.json() == {"demo": True}, (body, r.text)
    for body, ctype in (
        (b"[null, null]", "application/json"),
        (b"abc", "text/plain"),
        (form(part(b"x", PNG)), MULTIPART),
    ):
        r, _ = post(client, "/model_info", body, ctype)
        assert "takes no input" in error_of(r, 400)


def test_wrong_methods_and_paths_answer_error_objects(client) -> None:
    for method, path, status in (("GET", "/predict", 405), ("PUT", "/predict_batch", 405), ("GET", "/model_info", 405)):
        error_of(client.request(method, path), status)
    error_of(client.post("/nowhere", content=b"x"), 404)
    r, _ = post(client, "/predict", b'{"image": "x"}', "application/json")
    assert "multipart/form-data" in error_of(r, 415)


def test_openapi_requires_bodies_and_documents_error_objects(client) -> None:
    spec = client.get("/docs.json").json()
    for path in ("/predict", "/predict_batch"):
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["required"] is True
        for status in ("400", "408", "413", "415"):
            assert op["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }
    images = spec["paths"]["/predict_batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert images["properties"]["images"]["minItems"] == 1 and images["properties"]["images"]["type"] == "array"
    assert spec["components"]["schemas"]["Error"]["required"] == ["error"]
    assert "'type': 'file'" not in str(spec)


# slow and stalled clients: the guard called directly, its receive() played by hand


async def _call_guard(receive, headers: list | None = None) -> tuple[list[dict], bool]:
    reached = False

    async def app(scope, receive, send):
        nonlocal reached
        reached = True

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    guard = RequestGuard(app, ROUTES, **LIMITS)
    headers = headers or [(b"content-type", b"multipart/form-data; boundary=" + B)]
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    await asyncio.wait_for(guard(scope, receive, send), timeout=5)
    return sent, reached


def _answer(sent: list[dict]) -> tuple[int, dict, str]:
    import json

    start, body = sent[0], sent[-1]
    return start["status"], dict(start["headers"]), json.loads(body["body"])["error"]


def test_stalled_body_answers_408_after_the_idle_timeout() -> None:
    async def receive() -> dict:
        if not receive.calls:
            receive.calls += 1
            return {"type": "http.request", "body": b"--" + B + b"\r\n", "more_body": True}
        await asyncio.Event().wait()  # the client sent the headers and a little, then went quiet

    receive.calls = 0
    start = time.perf_counter()
    sent, reached = asyncio.run(_call_guard(receive))
    status, headers, message = _answer(sent)
    assert status == 408 and "no request body bytes for 0.3 s" in message and not reached
    assert headers[b"connection"] == b"close" and time.perf_counter() - start < 1


def test_slow_body_answers_408_at_the_upload_deadline() -> None:
    async def receive() -> dict:
        await asyncio.sleep(0.05)  # never idle long enough for the idle timeout, 1,000 bytes/s
        return {"type": "http.request", "body": b"x" * 50, "more_body": True}

    start = time.perf_counter()
    sent, reached = asyncio.run(_call_guard(receive))
    status, _, message = _answer(sent)
    assert status == 408 and "longer than 1 s" in message and not reached
    assert time.perf_counter() - start < 2


def test_trickling_body_is_cut_once_its_rate_is_below_the_minimum() -> None:
    async def receive() -> dict:
        await asyncio.sleep(0.05)  # a byte now and then: never idle, 20 bytes/s
        return {"type": "http.request", "body": b"x", "more_body": True}

    start = time.perf_counter()
    sent, reached = asyncio.run(_call_guard(receive))
    status, headers, message = _answer(sent)
    assert status == 408 and "under the minimum of 100 bytes/s" in message and not reached
    assert headers[b"connection"] == b"close" and 0.3 <= time.perf_counter() - start < 0.6


def test_declared_oversized_body_answers_413_before_reading() -> None:
    async def receive() -> dict:
        await asyncio.Event().wait()  # nothing is read: the declared length decides

    headers = [(b"content-type", b"multipart/form-data; boundary=" + B), (b"content-length", b"%d" % 10**9)]
    start = time.perf_counter()
    sent, reached = asyncio.run(_call_guard(receive, headers))
    status, headers_out, message = _answer(sent)
    assert status == 413 and "byte limit" in message and not reached and headers_out[b"connection"] == b"close"
    assert time.perf_counter() - start < 0.2


@pytest.mark.parametrize("times", [1.5, 3.0])
def test_body_somewhat_over_the_limit_is_read_to_its_end_before_its_413(times: float) -> None:
    """A client that writes its whole body before reading the answer (http.client, requests) reads the 413
    only if the body was read: up to DRAIN_UP_TO x max_bytes it is, past that the answer comes at once."""
    chunk, total = 1_000_000, int(times * LIMITS["max_bytes"])
    pieces = total // chunk

    async def receive() -> dict:
        receive.calls += 1
        return {"type": "http.request", "body": b"x" * chunk, "more_body": receive.calls < pieces}

    receive.calls = 0
    sent, reached = asyncio.run(_call_guard(receive))
    status, headers, message = _answer(sent)
    assert status == 413 and "byte limit" in message and not reached and headers[b"connection"] == b"close"
    read_all = receive.calls == pieces
    assert read_all == (times < DRAIN_UP_TO), (receive.calls, pieces)


def test_client_gone_mid_body_is_not_served() -> None:
    messages = iter([{"type": "http.request", "body": b"--" + B, "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(messages)

    sent, reached = asyncio.run(_call_guard(receive))
    assert sent == [] and not reached


def test_uploads_being_received_hold_no_handling_slot() -> None:
    """Two limits: bodies being received (max_uploads) and requests being handled (max_concurrency), the
    second counted from a complete body. Stalled uploads fill the first and leave the second to others;
    past either, 429 at once naming its setting; health checks are never limited."""
    release = asyncio.Event()

    async def app(scope, receive, send) -> None:
        if scope["path"] == "/slow":
            await release.wait()
        await JSONResponse({"ok": True})(scope, receive, send)

    async def stalled() -> dict:  # a client that sent its headers, then nothing
        await asyncio.Event().wait()

    limits = {**LIMITS, "idle_timeout": 5, "upload_timeout": 10, "max_uploads": 2, "max_concurrency": 1}
    guard = RequestGuard(app, ROUTES, **limits)

    async def call(method: str, path: str, body: bytes | None = None) -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def whole() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(b"content-type", b"multipart/form-data; boundary=" + B)]
        scope = {"type": "http", "method": method, "path": path, "headers": headers}
        await guard(scope, stalled if body is None else whole, send)
        return sent

    async def scenario() -> None:
        uploads = [asyncio.create_task(call("POST", "/predict")) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert (await asyncio.wait_for(call("GET", "/docs"), 1))[0]["status"] == 200
        status, headers, message = _answer(await asyncio.wait_for(call("POST", "/predict"), 1))
        assert status == 429 and "2 uploads are being received" in message and "AGE_GENDER_MAX_UPLOADS" in message
        assert headers[b"connection"] == b"close"  # its body was not read
        slow = asyncio.create_task(call("GET", "/slow"))
        await asyncio.sleep(0.05)
        status, headers, message = _answer(await asyncio.wait_for(call("GET", "/docs"), 1))
        assert status == 429 and "AGE_GENDER_MAX_CONCURRENCY" in message and headers[b"retry-after"] == b"1"
        uploads[0].cancel()  # a slot to receive one more body, which is complete: refused once checked
        await asyncio.gather(uploads[0], return_exceptions=True)
        status, _, message = _answer(await asyncio.wait_for(call("POST", "/predict", form(part(b"image", PNG))), 1))
        assert status == 429 and "AGE_GENDER_MAX_CONCURRENCY" in message
        assert (await asyncio.wait_for(call("GET", "/readyz"), 1))[0]["status"] == 200
        release.set()
        await slow
        assert (await asyncio.wait_for(call("GET", "/docs"), 1))[0]["status"] == 200
        uploads[1].cancel()

    asyncio.run(scenario())


# decode_image: every Pillow mode to 8-bit RGB


def _saved(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.uint32)[:, :, None]
    return ((rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _mode_cases() -> dict[str, tuple[bytes, np.ndarray, int]]:
    """name -> (file bytes, expected RGB, tolerance)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1] = 0, 255  # the full range: stretched values map back exactly
    grey = rgb[:, :, 0]
    alpha = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    grey3 = np.repeat(grey[:, :, None], 3, axis=2)
    bits = grey > 127
    palette = Image.fromarray(rgb).quantize(8)
    index = np.asarray(palette)
    lookup = np.asarray(palette.convert("RGB"))
    blocks = np.zeros((24, 32, 3), np.uint8)
    blocks[:, :16] = (255, 0, 0)
    blocks[:, 16:] = (0, 0, 255)
    frames = [Image.fromarray(blocks), Image.new("RGB", (32, 24), (0, 255, 0))]
    return {
        "RGB png": (_saved(Image.fromarray(rgb), "PNG"), rgb, 0),
        "L png": (_saved(Image.fromarray(grey), "PNG"), grey3, 0),
        "1 bmp": (_saved(Image.fromarray(bits), "BMP"), np.repeat(bits[:, :, None] * 255, 3, 2).astype(np.uint8), 0),
        "P png": (_saved(palette, "PNG"), lookup, 0),
        "P png, transparent entry": (
            _saved(palette, "PNG", transparency=int(index[0, 0])),
            np.where((index == index[0, 0])[:, :, None], 255, lookup).astype(np.uint8),
            0,
        ),
        "RGBA png": (_saved(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), _over_white(rgb, alpha), 1),
        "RGBA webp": (
            _saved(Image.fromarray(np.dstack([rgb, alpha])), "WEBP", lossless=True),
            _over_white(rgb, alpha),
            1,
        ),
        "LA png": (_saved(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"), _over_white(grey3, alpha), 1),
        "CMYK tiff": (_saved(Image.fromarray(rgb).convert("CMYK"), "TIFF"), rgb, 0),
        "I;16 png": (_saved(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), grey3, 0),
        "I;16B tiff": (_saved(Image.fromarray((grey.astype(np.uint16) * 257).astype(">u2")), "TIFF"), grey3, 0),
        "I tiff": (_saved(Image.fromarray(grey.astype(np.int32) * 257), "TIFF"), grey3, 0),
        "I tiff, negative": (_saved(Image.fromarray(grey.astype(np.int32) * 1000 - 100_000), "TIFF"), grey3, 1),
        "F tiff, 0..1": (_saved(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"), grey3, 0),
        "animated gif": (_saved(frames[0], "GIF", save_all=True, append_images=frames[1:]), blocks, 0),
        "MPO, first picture": (
            _saved(
                Image.new("RGB", (32, 24), (40, 160, 90)),
                "MPO",
                save_all=True,
                append_images=[Image.new("RGB", (32, 24))],
            ),
            np.full((24, 32, 3), (40, 160, 90), np.uint8),
            3,
        ),
        "multi-page tiff": (_saved(Image.fromarray(rgb), "TIFF", save_all=True, append_images=frames), rgb, 0),
    }


def test_decode_image_converts_every_mode() -> None:
    wrong = {}
    for name, (data, expected, tolerance) in _mode_cases().items():
        out = decode_image(data, 10**6)
        assert out.shape == expected.shape and out.dtype == np.uint8, name
        error = int(np.abs(out.astype(int) - expected.astype(int)).max())
        if error > tolerance:
            wrong[name] = error
    assert not wrong, f"max pixel error per mode: {wrong}"


def test_16_bit_greyscale_photo_finds_the_face_like_8_bit() -> None:
    grey = np.asarray(astronaut().convert("L"))
    eight = decode_image(_saved(Image.fromarray(grey), "PNG"), 10**6)
    sixteen = decode_image(_saved(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), 10**6)
    assert np.array_equal(eight, sixteen)
    detector = FaceDetector()
    assert len(detector.detect(eight)) == 1 and len(detector.detect(sixteen)) == 1


def test_guard_covers_every_api_from_its_signature() -> None:
    """The routes the guard checks come from the API signatures; an API of another kind stops the start."""
    from serving.guard import api_routes

    assert api_routes(StandIn) == (ROUTES, ["/model_info"])

    @bentoml.service
    class WithText:
        @bentoml.api
        def predict(self, image: Path) -> dict:
            return {}

        @bentoml.api
        def search(self, text: str) -> dict:  # a JSON body the guard has no rule for
            return {}

    with pytest.raises(TypeError, match=r"WithText.search takes \[\('text', <class 'str'>\)\]"):
        api_routes(WithText)


def test_the_service_guards_each_of_its_apis() -> None:
    import service  # no model is loaded at import

    every = {api.route for api in service.AgeGender.apis.values()}
    assert set(service.ROUTES) | set(service.NO_INPUT_ROUTES) == every
    assert service.ROUTES["/predict_batch"] == FileField("images", many=True)
    assert service.NO_INPUT_ROUTES == ["/model_info"]
