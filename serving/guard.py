"""RequestGuard: an ASGI middleware in front of the public APIs.

BentoML 1.4 answers several kinds of bad upload with a 500 or a hang, fetches URLs given in file fields,
has no body size limit or read timeout, and returns 4xx bodies as JSON arrays (see docs/bentoml notes).
This guard reads the request body itself (bounded in bytes and in time), parses the multipart form
strictly with its own parser, checks it against what each route takes, recognises each image from its
bytes and reads its size from its header, and answers every problem itself with a 4xx `{"error": "..."}`
object. What it passes on is a canonical form it wrote itself (one well-formed part per image, short
safe file names, the detected content types), so BentoML's own parser never sees a client's framing.
Errors that still come from further in are rewritten into the same object shape.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from python_multipart.multipart import parse_options_header
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from models.errors import TooLarge, UserError, debugging
from models.images import FORMAT_NAMES, NotAnImage, image_format, open_image
from serving.multipart import MAX_BOUNDARY, ClientGone, Rejected, TooManyFiles, build_form, label, parse_form
from serving.settings import SETTINGS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileField:
    name: str
    many: bool


def api_routes(service) -> tuple[dict[str, FileField], list[str]]:
    """A BentoML service's APIs -> (the routes that take files, with their field; the routes that take no
    input): what the guard must cover, read from the API signatures. An API taking anything else stops
    the service from starting (TypeError): the guard would not know how to check its requests."""
    files: dict[str, FileField] = {}
    empty: list[str] = []
    for api in service.apis.values():
        inputs = [(name, kind) for name, kind in typing.get_type_hints(api.func).items() if name != "return"]
        if not inputs:
            empty.append(api.route)
        elif len(inputs) == 1 and inputs[0][1] in (Path, list[Path]):
            files[api.route] = FileField(inputs[0][0], many=inputs[0][1] != Path)
        else:
            raise TypeError(
                f"{service.name}.{api.name} takes {inputs}: serving/guard.py checks APIs of one file, a list of "
                "files or no input; teach it this kind of request before adding the API"
            )
    return files, empty


def error(status: int, message: str, close: bool = False) -> JSONResponse:
    """The error object every 4xx answer has; close=True when the request body was not read to its end."""
    return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)


def answers_user_errors(api):
    """Decorator of an async API: a UserError it raises becomes its 400 (TooLarge: 413) `{"error"}` answer.
    The one place where the pipeline's errors turn into responses."""

    @functools.wraps(api)
    async def wrapper(*args, **kwargs):
        try:
            return await api(*args, **kwargs)
        except UserError as exc:
            return error(413 if isinstance(exc, TooLarge) else 400, str(exc))

    return wrapper


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
    if status == 503 and message.startswith("An unexpected error"):  # BentoML hides every 5xx message
        message = "a backend service is busy or restarting; retry shortly"
    return json.dumps({"error": message}).encode()


class RequestGuard:
    """Upload routes (POST): body read within max_bytes, idle_timeout and upload_timeout; the form parsed
    and checked; the request passed on as a canonical form. Routes in no_input_routes (POST): an empty body,
    `null` or `{}` only. Everything else passes through. Every error answer, the guard's or from further in,
    is an `{"error": "..."}` object."""

    def __init__(
        self,
        app,
        routes: dict[str, FileField],
        max_bytes: int = SETTINGS.max_bytes,
        max_images: int = SETTINGS.max_images,
        *,
        max_pixels: int = SETTINGS.max_pixels,
        max_request_pixels: int = SETTINGS.max_request_pixels,
        idle_timeout: float = SETTINGS.idle_timeout,
        upload_timeout: float = SETTINGS.upload_timeout,
        no_input_routes: Iterable[str] = ("/model_info",),
    ) -> None:
        self.app, self.routes, self.max_bytes, self.max_images = app, routes, max_bytes, max_images
        self.max_pixels, self.max_request_pixels = max_pixels, max_request_pixels
        self.idle_timeout, self.upload_timeout = idle_timeout, upload_timeout
        self.no_input_routes = frozenset(no_input_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] != "HEAD":  # a HEAD answer has no body to rewrite
            send = rewrite_response(send, as_error_object, lambda status: status >= 400)
        path = scope["path"]
        field = self.routes.get(path)
        if scope["method"] != "POST" or (field is None and path not in self.no_input_routes):
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(scope, receive)
        except ClientGone:
            return None
        except Rejected as exc:
            return await error(exc.status, exc.message, close=True)(scope, receive, send)
        try:
            if field is None:
                content, content_type = _no_input(path, body), b"application/json"
            else:
                headers = dict(scope["headers"])
                declared = headers.get(b"content-type", b"").decode("latin-1")
                content, boundary = await asyncio.to_thread(self._check_upload, field, declared, body)
                content_type = b"multipart/form-data; boundary=" + boundary
        except Rejected as exc:
            return await error(exc.status, exc.message)(scope, receive, send)
        except Exception as exc:  # a request this guard did not foresee is still the client's: never a 500
            if debugging():
                raise
            log.warning("request guard: unexpected %s on %s", type(exc).__name__, path, exc_info=True)
            return await error(400, f"malformed request ({type(exc).__name__})")(scope, receive, send)
        del body
        await self.app(_with_body(scope, content_type, len(content)), _replay(content, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise Rejected(413, f"request body over the {self.max_bytes} byte limit")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.upload_timeout
        body = bytearray()
        while True:
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, min(self.idle_timeout, left)))
            except TimeoutError as exc:
                if left <= self.idle_timeout:
                    raise Rejected(408, f"the request body took longer than {self.upload_timeout:g} s") from exc
                raise Rejected(408, f"no request body bytes for {self.idle_timeout:g} s") from exc
            if message["type"] == "http.disconnect":
                raise ClientGone
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                raise Rejected(413, f"request body over the {self.max_bytes} byte limit")
            if not message.get("more_body"):
                return bytes(body)

    def _check_upload(self, field: FileField, content_type: str, body: bytes) -> tuple[bytes, bytes]:
        """-> (canonical multipart body, boundary), or Rejected with the 4xx answer that says why."""
        hint = f"send {'one or more image files' if field.many else 'one image file'} as multipart field {field.name!r}"
        media, params = parse_options_header(content_type)
        if media != b"multipart/form-data":
            raise Rejected(
                415, f"content type {content_type or 'missing'}; send multipart/form-data with field {field.name!r}"
            )
        boundary = params.get(b"boundary", b"")
        if not boundary or len(boundary) > MAX_BOUNDARY:
            got = "no boundary parameter" if not boundary else f"a boundary over {MAX_BOUNDARY} characters"
            raise Rejected(400, f"Content-Type multipart/form-data has {got}; {hint}")
        try:
            parts = parse_form(body, boundary, max_files=self.max_images if field.many else 1)
        except TooManyFiles as exc:
            if field.many:
                raise Rejected(413, f"got {exc.count} images; at most {self.max_images} per request") from exc
            raise Rejected(
                400, f"got {exc.count} files in {field.name!r}; this endpoint takes one (use /predict_batch)"
            ) from exc
        except Rejected as exc:
            raise Rejected(exc.status, f"malformed multipart form: {exc.message}; {hint}") from exc
        unknown = sorted({p.name for p in parts} - {field.name})
        if unknown:
            raise Rejected(400, f"unknown field {unknown[0]!r}; {hint}")
        if not parts:
            raise Rejected(400, f"missing field {field.name!r}; {hint}")
        if any(p.filename is None for p in parts):
            raise Rejected(400, f"field {field.name!r} must be a file upload, not text (URLs are not fetched); {hint}")
        files, pixels = [], 0
        for i, part in enumerate(parts):
            name = label(part.filename, i)
            try:
                with open_image(bytes(part.data), self.max_pixels) as image:  # the header only
                    pixels += image.width * image.height
                # the format from the magic number: Pillow names a JPEG with extra pictures (phones) MPO
                fmt = image_format(bytes(part.data[:16]))
                assert fmt is not None  # open_image accepted the file: its magic number names a format
                files.append((part.data, fmt))
            except NotAnImage as exc:
                declared = part.content_type or "none"
                raise Rejected(
                    415, f"file {name} is not an image (declared content type {declared}); send {FORMAT_NAMES}"
                ) from exc
            except TooLarge as exc:
                raise Rejected(413, f"file {name}: {exc}") from exc
            except UserError as exc:
                raise Rejected(400, f"file {name}: {exc}") from exc
            if pixels > self.max_request_pixels:
                raise Rejected(
                    413,
                    f"the images hold more than {self.max_request_pixels} pixels together, the limit per request",
                )
        return build_form(field.name, files, avoid=body)


def _no_input(path: str, body: bytes) -> bytes:
    """A route that takes no input accepts an empty body, `null` or `{}`; it is passed on as `{}`."""
    text = body.strip()
    if text:
        try:
            value = json.loads(text)
        except ValueError:
            value = ...
        if value is not None and value != {}:
            raise Rejected(400, f"{path} takes no input; send an empty body or {{}}")
    return b"{}"


def _with_body(scope: Scope, content_type: bytes, length: int) -> Scope:
    skip = (b"content-type", b"content-length", b"transfer-encoding")
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in skip]
    return {**scope, "headers": [*headers, (b"content-type", content_type), (b"content-length", str(length).encode())]}


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message; after it, the client's own receive (to see a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def rewrite_response(send: Send, rewrite: Callable[[int, bytes], bytes], when: Callable[[int], bool]) -> Send:
    """Responses whose status passes when(): buffered and their body replaced by rewrite(status, body), sent
    as JSON. Others pass through unbuffered."""
    start: dict = {}
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            if not when(message["status"]):
                return await send(message)
            start.update(message)
            return None
        if message["type"] != "http.response.body" or not start:
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return None
        body = rewrite(start["status"], b"".join(chunks))
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return None

    return wrapped
