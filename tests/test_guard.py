"""The request guard (serving/guard.py) and the OpenAPI rewriting (serving/openapi.py), in-process: what a
request may hold (tests/test_guard_body.py: how and how fast it arrives).

The guard is wrapped around a tiny stand-in BentoML service with the same API signatures as the real one
(no model): BentoML parses what the guard passes on exactly as in production, in about a second.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import os
import time
from pathlib import Path

import bentoml
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from devtools.forms import MALFORMED, MULTIPART, PNG, B, form, part
from devtools.photos import astronaut, encode
from models.images import image_format
from serving.dependencies import DependencyUnavailable
from serving.guard import RequestGuard
from serving.openapi import StandardOpenAPI
from serving.routes import FileField
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

    @bentoml.api
    def unavailable(self) -> dict:
        raise DependencyUnavailable("a backend service is temporarily unavailable, retry")


StandIn.add_asgi_middleware(RequestGuard, routes=ROUTES, **LIMITS)
StandIn.add_asgi_middleware(StandardOpenAPI, max_images=MAX_IMAGES, api_key=False)


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


def test_a_compressed_body_is_refused_for_what_it_is(client) -> None:
    body = gzip.compress(form(part(b"image", PNG)))  # not "missing field 'image'": the encoding is named
    r = client.post("/predict", content=body, headers={"content-type": MULTIPART, "content-encoding": "gzip"})
    assert "Content-Encoding 'gzip'" in error_of(r, 415)


def test_media_type_is_case_insensitive(client) -> None:
    r, _ = post(client, "/predict", form(part(b"image", PNG)), "Multipart/Form-Data; Boundary=" + B.decode())
    assert r.status_code == 200, r.text


def test_any_file_name_works_and_is_replaced(client) -> None:
    for name in (b"x" * 400 + b".jpg", "ünïcødé ".encode() * 40 + b".png", b"../../etc/passwd", b"a\\b\\c.png", b""):
        r, _ = post(client, "/predict", form(part(b"image", PNG, filename=name)))
        assert r.status_code == 200, (name[:20], r.text)
        assert r.json()["name"].endswith("image-0.png") and r.json()["size"] == len(PNG)
    # RFC 5987's filename* alone (which RFC 7578 forbids, and some clients send): a file, named as meant
    starred = part(b"images", b"junk", filename=None).replace(
        b'"images"', b"\"images\"; filename*=UTF-8''%C3%A9t%C3%A9.png"
    )
    r, _ = post(client, "/predict_batch", form(part(b"images", PNG), starred))
    assert "file #2 ('été.png')" in error_of(r, 415)
    r, _ = post(
        client, "/predict", form(part(b"image", PNG, filename=None).replace(b'"image"', b'"image"; filename*=a'))
    )
    assert r.status_code == 200 and r.json()["size"] == len(PNG), r.text


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
    mpo = encode(photo, "MPO", save_all=True, append_images=[photo])  # a JPEG with a second picture (phones)
    r, _ = post(client, "/predict", form(part(b"image", mpo)))
    assert r.status_code == 200 and r.json()["format"] == "JPEG" and r.json()["name"].endswith("image-0.jpg")
    for data in (b"just some text", encode(photo, "ICO"), encode(photo, "PPM"), b"\x00" * 64):
        r, _ = post(client, "/predict", form(part(b"image", data, ctype=b"image/jpeg")))
        message = error_of(r, 415)
        assert "not an image" in message and "JPEG, PNG, WebP, BMP, GIF or TIFF" in message, message
        assert message.endswith("(declared content type image/jpeg)"), message
    r, _ = post(client, "/predict", form(part(b"image", b"GIF89a but not really")))
    assert "the file starts like GIF but Pillow cannot read it" in error_of(r, 415)  # its format, named


def test_a_bad_file_among_several_is_named_by_place_and_name(client) -> None:
    files = [part(b"images", PNG, b"a.png"), part(b"images", b"plain text", b"notes.png"), part(b"images", PNG, b"")]
    r, _ = post(client, "/predict_batch", form(*files))
    assert error_of(r, 415).startswith("file #2 ('notes.png'): the file is not an image in an accepted format")
    r, _ = post(client, "/predict_batch", form(part(b"images", PNG), part(b"images", b"", b"")))
    assert error_of(r, 400) == "file #2: the file is empty"  # no name given: its place alone


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


def test_a_backend_unavailable_is_a_503_that_says_when_to_retry(client) -> None:
    """As a 429 does: clients that honour Retry-After (python -m predict --url) wait that long."""
    r = client.post("/unavailable")
    assert "retry shortly" in error_of(r, 503) and r.headers["retry-after"] == "1"


def test_openapi_requires_bodies_and_documents_error_objects(client) -> None:
    spec = client.get("/docs.json").json()
    for path in ("/predict", "/predict_batch"):
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["required"] is True
        for status in ("400", "408", "413", "415"):
            assert op["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }
        for status in ("429", "500", "503", "504"):  # under load or a restart, whatever the route
            assert status in op["responses"] and status in spec["paths"]["/model_info"]["post"]["responses"]
        assert "401" not in op["responses"] and "security" not in spec  # this stand-in takes no key
    images = spec["paths"]["/predict_batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    images = images["properties"]["images"]
    assert (images["type"], images["minItems"], images["maxItems"]) == ("array", 1, MAX_IMAGES)
    assert spec["components"]["schemas"]["Error"]["required"] == ["error"]
    assert "'type': 'file'" not in str(spec)
    assert spec["info"]["version"] == importlib.metadata.version("age-gender")  # not BentoML's "None" from source
    assert set(spec["info"]) == {"title", "description", "version"} and "bentoml" not in str(spec["info"]).lower()


def test_openapi_names_the_api_key_where_one_is_set() -> None:
    from serving.openapi import standard_openapi

    api = {"post": {"x-bentoml-name": "predict", "responses": {}}}
    paths = {"/predict": api, "/readyz": {"get": {"responses": {}}}, "/model_card": {"get": {"responses": {}}}}
    spec = standard_openapi({"paths": paths}, max_images=2, api_key=True)
    assert set(spec["paths"]["/model_card"]["get"]["responses"]) == {"200", "404", "401"}  # not an API's
    assert {"401", "429", "503"} <= set(spec["paths"]["/predict"]["post"]["responses"])
    assert spec["paths"]["/predict"]["post"]["responses"]["401"]["content"]["application/json"]
    assert (
        spec["paths"]["/readyz"]["get"]["security"] == [] and "401" not in spec["paths"]["/readyz"]["get"]["responses"]
    )
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert spec["security"] == [{"bearer": []}, {"apiKey": []}]  # either of the two headers


def test_guard_covers_every_api_from_its_signature() -> None:
    """The routes the guard checks come from the API signatures; an API of another kind stops the start."""
    from serving.routes import api_routes

    assert api_routes(StandIn) == (ROUTES, ["/model_info", "/unavailable"])

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
