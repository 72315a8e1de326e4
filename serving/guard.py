"""RequestGuard: an ASGI middleware in front of the public APIs.

BentoML 1.4 answers several kinds of bad upload with a 500, fetches URLs given in file fields, has no
body size limit and returns 4xx bodies as JSON arrays (see docs/bentoml notes). This guard buffers the
request (up to the byte limit), checks the multipart form against what each route takes, and answers
problems itself with `{"error": "..."}` objects; errors that still come from further in are rewritten
into the same object shape. It also makes the published OpenAPI document standard (for generators).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ACCEPTED_TYPES = "image/jpeg, image/png, image/webp, image/bmp, image/gif, image/tiff"


@dataclass(frozen=True)
class FileField:
    name: str
    many: bool


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def check_form(form, field: FileField, max_images: int) -> JSONResponse | None:
    """None when the form holds exactly what the route takes, else the 4xx response that says why."""
    hint = f"send {'one or more image files' if field.many else 'one image file'} as multipart field {field.name!r}"
    unknown = sorted(set(form.keys()) - {field.name})
    if unknown:
        return error(400, f"unknown field {unknown[0]!r}; {hint}")
    values = form.getlist(field.name)
    if not values:
        return error(400, f"missing field {field.name!r}; {hint}")
    if not all(isinstance(v, UploadFile) for v in values):
        return error(400, f"field {field.name!r} must be a file upload, not text (URLs are not fetched); {hint}")
    if not field.many and len(values) > 1:
        return error(400, f"got {len(values)} files in {field.name!r}; this endpoint takes one (use /predict_batch)")
    if len(values) > max_images:
        return error(413, f"got {len(values)} images; at most {max_images} per request")
    for i, v in enumerate(values):
        name = v.filename or f"#{i}"
        ctype = (v.content_type or "").split(";")[0].strip().lower()
        if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            return error(415, f"file {name!r} has content type {ctype}; send an image ({ACCEPTED_TYPES})")
        if v.size == 0:
            return error(400, f"file {name!r} is empty")
    return None


def as_error_object(status: int, body: bytes) -> bytes:
    """Any error body -> {"error": "..."}: BentoML's [{"error": ...}] arrays and plain-text errors alike."""
    try:
        data = json.loads(body)
    except ValueError:
        data = body.decode(errors="replace").strip()
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        message = data["error"]
    else:
        message = data if isinstance(data, str) and data else f"request failed with HTTP {status}"
    return json.dumps({"error": message}).encode()


def standard_openapi(spec: dict) -> dict:
    """Make BentoML's spec standard and generator-friendly: OpenAPI 3.0 types instead of "file" and
    "tensor", operation ids named after the APIs (`predict`, not `AgeGender__predict`), schema names
    without BentoML's `IODescriptor` suffix or unused `__Input` copies, and the 413 / 415 answers."""

    def fix(node):
        if isinstance(node, dict):
            if node.get("type") == "file":
                node = {**node, "type": "string", "format": "binary"}
            elif node.get("type") == "tensor":
                node = {k: v for k, v in node.items() if k not in ("type", "format")} | {"type": "array", "items": {}}
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    # "PhotoResultIODescriptor" and "PhotoResult" describe the same model: merging them is safe
    spec = fix(json.loads(json.dumps(spec).replace("IODescriptor", "")))
    # unreferenced copies of the inline request bodies; generators name both alike and then clash
    schemas = spec.get("components", {}).get("schemas", {})
    for name in [n for n in schemas if n.endswith("__Input")]:
        del schemas[name]
    error_schema = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    for operations in spec.get("paths", {}).values():
        for op in operations.values():
            if "x-bentoml-name" in op:
                op["operationId"] = op["x-bentoml-name"]
            if "multipart/form-data" in op.get("requestBody", {}).get("content", {}):
                for status, text in (("413", "Request Too Large"), ("415", "Unsupported Media Type")):
                    op["responses"][status] = {
                        "description": text,
                        "content": {"application/json": {"schema": error_schema}},
                    }
    return spec


class RequestGuard:
    def __init__(self, app, routes: dict[str, FileField], max_bytes: int, max_images: int) -> None:
        self.app, self.routes, self.max_bytes, self.max_images = app, routes, max_bytes, max_images

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == "/docs.json":
            return await self.app(scope, receive, _rewrite_body(send, _openapi_body))
        field = self.routes.get(path)
        if field is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)

        body, too_big = await self._read_body(scope, receive)
        if too_big:
            return await error(413, f"request body over the {self.max_bytes} byte limit")(scope, receive, send)
        replay = _replay(body)
        request = Request(scope, replay)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            msg = f"send multipart/form-data with field {field.name!r}"
            return await error(415, f"content type {request.headers.get('content-type') or 'missing'}; {msg}")(
                scope, receive, send
            )
        try:
            # any file count parses (the byte limit bounds the body): check_form answers 413 past max_images
            form = await request.form(max_files=2**31 - 1, max_fields=16)
        except MultiPartException as exc:
            return await error(400, f"malformed multipart form ({exc.message}); send field {field.name!r}")(
                scope, receive, send
            )
        try:
            problem = check_form(form, field, self.max_images)
        finally:
            await form.close()
        if problem is not None:
            return await problem(scope, receive, send)
        await self.app(scope, _replay(body), _rewrite_body(send, _error_body))

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, bool]:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return b"", True
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks), False


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _error_body(status: int, body: bytes) -> bytes | None:
    return as_error_object(status, body) if status >= 400 else None


def _openapi_body(status: int, body: bytes) -> bytes | None:
    return json.dumps(standard_openapi(json.loads(body))).encode() if status == 200 else None


def _rewrite_body(send: Send, rewrite: Callable[[int, bytes], bytes | None]) -> Send:
    """Buffer the response; if rewrite() returns new bytes, send those with a JSON content type."""
    start: dict = {}
    chunks: list[bytes] = []

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if message["type"] != "http.response.body" or not start:
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        new = rewrite(start["status"], body)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        if new is not None:
            body = new
            headers.append((b"content-type", b"application/json"))
        else:
            headers += [(k, v) for k, v in start.get("headers", []) if k.lower() == b"content-type"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped
