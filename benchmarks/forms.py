"""`python -m benchmarks.forms`: the request guard, or Starlette's own form limits?

BentoML can serve a FastAPI or Starlette app (`bentoml.asgi_app`) whose routes parse uploads themselves
with `request.form(max_files=, max_fields=, max_part_size=)`, in place of serving/guard.py,
serving/multipart.py and serving/openapi.py. The same small Starlette route, with the service's limits (32
files, 4 text fields of at most 8 KiB), is called bare and behind `RequestGuard`, in process, with the
hostile requests the guard's tests send (devtools.forms), 150,000 one-byte parts, a body over the byte
limit, a decompression bomb and a trickling upload. Printed: one Markdown table of what each answered
(status; `{"error"}` object or not) and how long it took.
"""

from __future__ import annotations

import asyncio
import time

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from devtools.forms import MALFORMED, MULTIPART, PNG, B, form, part
from devtools.photos import one_bit_png
from serving.guard import RequestGuard
from serving.multipart import MAX_TEXT_BYTES, MAX_TEXT_FIELDS
from serving.routes import FileField
from serving.settings import Settings

LIMITS = {"max_bytes": Settings.max_bytes, "max_images": Settings.max_images, "max_pixels": Settings.max_pixels}
TRICKLE_S = 5.0  # how long a trickling upload is watched
SLOW = {"idle_timeout": 1.0, "upload_timeout": 60.0, "min_upload_rate": Settings.min_upload_rate}


async def predict(request: Request) -> JSONResponse:
    """What a FastAPI/Starlette route would do: Starlette's limits, then the field's files."""
    limits = {"max_files": Settings.max_images, "max_fields": MAX_TEXT_FIELDS, "max_part_size": MAX_TEXT_BYTES}
    async with request.form(**limits) as data:  # HTTPException(400) from Starlette past a limit
        files = data.getlist("image")
        if not files or not all(isinstance(f, UploadFile) for f in files):
            return JSONResponse({"error": "send one image file as field 'image'"}, 400)
        return JSONResponse({"sizes": [len(await f.read()) for f in files]})


def apps() -> dict:
    bare = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
    guarded = RequestGuard(bare, {"/predict": FileField("image", many=False)}, **LIMITS, **SLOW)
    return {"Starlette's form limits": bare, "RequestGuard in front": guarded}


def cases() -> dict[str, tuple[bytes, str]]:
    out = {name: (body, ctype) for name, (body, ctype, _) in MALFORMED.items()}
    out["150,000 one-byte file parts"] = (form(*[part(b"image", b"x", filename=b"a")] * 150_000), MULTIPART)
    out["a body of 40 MiB"] = (form(part(b"image", PNG + bytes(40 * 2**20))), MULTIPART)
    out["50 Mpx 1-bit PNG of 6 kB"] = (form(part(b"image", one_bit_png(7071))), MULTIPART)
    out["well-formed, one PNG"] = (form(part(b"image", PNG)), MULTIPART)
    return out


def answer(client: TestClient, body: bytes, ctype: str) -> str:
    start = time.perf_counter()
    r = client.post("/predict", content=body, headers={"content-type": ctype})
    seconds = time.perf_counter() - start
    try:
        shape = "{error}" if set(r.json()) == {"error"} else "JSON"
    except ValueError:
        shape = "text"
    return f"{r.status_code} {shape}, {seconds:.2f} s"


async def trickle(app) -> str:
    """A part's headers, then one byte of its file every 50 ms, watched for TRICKLE_S seconds."""
    sent: list[dict] = []
    head = bytearray(part(b"image", b"")[:-2])  # the part without its data and the CRLF after it

    async def receive() -> dict:
        await asyncio.sleep(0.05)
        data, head[:] = (bytes(head) or b"x"), b""
        return {"type": "http.request", "body": data, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-type", MULTIPART.encode())]}
    scope |= {"query_string": b"", "app": app}
    start = time.perf_counter()
    try:
        await asyncio.wait_for(app(scope, receive, send), TRICKLE_S)
    except TimeoutError:
        return f"no answer in {TRICKLE_S:g} s (still reading)"
    return f"{sent[0]['status']}, {time.perf_counter() - start:.2f} s"


def main() -> None:
    results: dict[str, dict[str, str]] = {}
    for label, app in apps().items():
        with TestClient(app, raise_server_exceptions=False) as client:
            results[label] = {name: answer(client, body, ctype) for name, (body, ctype) in cases().items()}
        results[label]["a byte every 50 ms"] = asyncio.run(trickle(app))
    labels = list(results)
    print("| request | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for name in results[labels[0]]:
        print(f"| {name} | " + " | ".join(results[label][name] for label in labels) + " |")
    print(f"\nboundary {B.decode()!r}; limits as the service's defaults; the guard's idle timeout 1 s for the trickle")


if __name__ == "__main__":
    main()
