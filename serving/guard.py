"""RequestGuard: an ASGI middleware in front of the public APIs.

BentoML 1.4 answers several kinds of bad upload with a 500 or a hang, fetches URLs given in file fields,
has no body size limit or read timeout, and returns 4xx bodies as JSON arrays.
This guard reads the request body itself (bounded in bytes, time and rate; spooled to disk past 64 KiB by
serving/uploads.py), parses the multipart form strictly with its own parser, checks it against what each
route takes, recognises each image from its bytes and reads its size from its header, and answers every
problem itself with a 4xx `{"error": "..."}` object. What it passes on is a canonical form it wrote
itself (one well-formed part per image, short safe file names, the detected content types), so BentoML's
own parser never sees a client's framing. Errors that still come from further in are rewritten into the
same object shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from python_multipart.multipart import parse_options_header
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from models.errors import NotAnImage, UserError, debugging
from models.images import image_format, open_image
from serving.answers import as_error_object, busy, error, rewrite_response, status_of
from serving.edge import OPEN_PATHS
from serving.multipart import (
    MAX_BOUNDARY,
    ClientGone,
    Part,
    Rejected,
    Segment,
    TooManyFiles,
    build_form,
    label,
    parse_form,
)
from serving.routes import FileField
from serving.settings import SETTINGS
from serving.uploads import SPOOL_BYTES, Spool, drain, length, read_body, replay

log = logging.getLogger(__name__)
# complete bodies checked at once (threads): each maps its spool and copies one file from it (2 x max_bytes
# of memory at most); a check of a 20 MiB body takes milliseconds, so one at a time costs no throughput
CHECKS_AT_ONCE = 1
# a body over max_bytes is read to its end, when it ends within this many times max_bytes, before its 413:
# clients that write the whole body before reading (http.client, requests) otherwise see a reset, not why
DRAIN_UP_TO = 2
GENERIC_TYPE = "application/octet-stream"  # what clients declare for a file whose type they do not know
# a body refused because AGE_GENDER_MAX_UPLOADS are being received, or declared over DRAIN_UP_TO x max_bytes,
# is read (and dropped) for up to this many seconds before its 429 or 413, for the same reason: a photo on a
# fast link has arrived by then, and asyncio clients (httpx) lost most of these answers to resets (the batch
# command retried a 100 MB file as a server gone). A slower or stalled upload is closed on after it.
BUSY_DRAIN_SECONDS = 2.0
# At most this many such bodies are drained at once; past it, and for clients that wait for `100 Continue`
# before sending, the answer comes at once (nothing is invited that would be refused). Each drain holds a
# connection for at most BUSY_DRAIN_SECONDS and no memory (its bytes are dropped): as many as the default
# AGE_GENDER_MAX_UPLOADS, whatever that setting, so that a burst past small limits is still answered.
MAX_DRAINS = 256


class RequestGuard:
    """Upload routes (POST): body read within max_bytes, idle_timeout, upload_timeout and min_upload_rate;
    the form parsed and checked; the request passed on as a canonical form. Routes in no_input_routes
    (POST): an empty body, `null` or `{}` only. Everything else passes through. Every error answer, the
    guard's or from further in, is an `{"error": "..."}` object.

    Two limits per process, in place of BentoML's one (its max_concurrency is counted from before the body
    is read, so slow uploads took every slot): at most max_uploads bodies being received or checked, and
    at most max_concurrency requests being handled, counted from a complete and checked body to the start
    of its answer.
    Past either: 429 (past max_uploads after up to BUSY_DRAIN_SECONDS of reading the body). Health
    checks, /metrics and what is not an API (the page, the docs) are never limited."""

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
        min_upload_rate: float = SETTINGS.min_upload_rate,
        max_uploads: int = SETTINGS.max_uploads,
        max_concurrency: int = SETTINGS.max_concurrency,
        no_input_routes: Iterable[str] = ("/model_info",),
    ) -> None:
        self.app, self.routes, self.max_bytes, self.max_images = app, routes, max_bytes, max_images
        self.max_pixels, self.max_request_pixels = max_pixels, max_request_pixels
        self.idle_timeout, self.upload_timeout, self.min_upload_rate = idle_timeout, upload_timeout, min_upload_rate
        self.max_uploads, self.max_concurrency = max_uploads, max_concurrency
        self.no_input_routes = frozenset(no_input_routes)
        self.uploads = self.handling = self.draining = 0  # one event loop per process: plain counters
        self.checks = ThreadPoolExecutor(CHECKS_AT_ONCE, thread_name_prefix="upload-check")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] != "HEAD":  # a HEAD answer has no body to rewrite
            send = rewrite_response(send, as_error_object, lambda status: status >= 400)
        path = scope["path"]
        field = self.routes.get(path)
        # health checks, /metrics and what is not an API (the page, its scripts, the docs, a 404) take no slot:
        # a browser loading /ui asks for three files at once, and AGE_GENDER_MAX_CONCURRENCY may be 2
        if path in OPEN_PATHS or scope["method"] != "POST" or (field is None and path not in self.no_input_routes):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        raw_length = headers.get(b"content-length", b"")
        declared = int(raw_length) if raw_length.isdigit() else -1  # -1: none (a chunked body)
        if declared > DRAIN_UP_TO * self.max_bytes:  # not worth reading to its end: only for a while
            await self._drain_refused(receive, headers, declared)
            return await error(413, f"request body over the {self.max_bytes} byte limit", close=True)(
                scope, receive, send
            )
        if self.uploads >= self.max_uploads:
            why = f"uploads being received: {self.uploads}, the limit of this server (AGE_GENDER_MAX_UPLOADS)"
            await self._drain_refused(receive, headers, self.max_bytes)
            return await busy(why)(scope, receive, send)
        self.uploads += 1  # until its body is complete and checked
        try:
            outcome = await self._receive(receive, headers, declared, path, field)
        finally:
            self.uploads -= 1
        if not isinstance(outcome, tuple):  # the client left (None), or the answer that says what is wrong
            return None if outcome is None else await outcome(scope, receive, send)
        spool, segments, content_type = outcome
        try:
            body = _with_body(scope, content_type, length(segments))
            await self._handle(body, replay(spool, segments, receive), send)
        finally:
            spool.close()

    async def _drain_refused(self, receive: Receive, headers: dict, most: int) -> None:
        """A refused body read and dropped for up to BUSY_DRAIN_SECONDS, so that clients that write it whole
        before reading (httpx, requests) read its answer; not for clients waiting for `100 Continue` (nothing
        is invited that would be refused), nor past MAX_DRAINS such bodies at once."""
        if self.draining < MAX_DRAINS and headers.get(b"expect", b"").lower() != b"100-continue":
            self.draining += 1
            try:
                await drain(receive, most, self.idle_timeout, BUSY_DRAIN_SECONDS)
            finally:
                self.draining -= 1

    async def _receive(
        self, receive: Receive, headers: dict, declared: int, path: str, field: FileField | None
    ) -> tuple[Spool, list[Segment], bytes] | JSONResponse | None:
        """The body read and checked -> (its spool, the canonical body as segments of it, its content
        type); or the error answer; or None when the client left."""
        try:
            limits = (self.max_bytes, self.idle_timeout, self.upload_timeout, self.min_upload_rate)
            spool = await read_body(receive, *limits, declared)
        except ClientGone:
            return None
        except Rejected as exc:
            if exc.status == 413:  # a body somewhat over the limit: read to its end, so that its client reads this
                await drain(receive, (DRAIN_UP_TO - 1) * self.max_bytes, self.idle_timeout, self.upload_timeout)
            return error(exc.status, exc.message, close=True)
        try:
            if field is None:
                return spool, [_no_input(path, spool)], b"application/json"
            # in the checks' own thread: a request cancelled meanwhile (its client gone, BentoML's timeout)
            # leaves a running check to finish, so no more than CHECKS_AT_ONCE ever run
            check = self.checks.submit(self._check_upload, field, headers, spool)
            segments, boundary = await asyncio.wrap_future(check)
            return spool, segments, b"multipart/form-data; boundary=" + boundary
        except Rejected as exc:
            spool.close()
            return error(exc.status, exc.message)
        except Exception as exc:  # a request this guard did not foresee is still the client's: never a 500
            spool.close()
            if debugging():
                raise
            log.warning("request guard: unexpected %s on %s", type(exc).__name__, path, exc_info=True)
            return error(400, f"malformed request ({type(exc).__name__})")
        except BaseException:  # cancelled
            spool.close()
            raise

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.handling >= self.max_concurrency:
            why = f"requests being handled: {self.handling}, the limit of this server (AGE_GENDER_MAX_CONCURRENCY)"
            return await busy(why)(scope, receive, send)
        self.handling += 1
        held = True

        async def answering(message: Message) -> None:
            nonlocal held
            if held and message["type"] == "http.response.start":  # sending it takes no slot: SlowReaders bounds it
                held = False
                self.handling -= 1
            await send(message)

        try:
            await self.app(scope, receive, answering)
        finally:
            if held:
                self.handling -= 1

    def _check_upload(self, field: FileField, headers: dict, spool: Spool) -> tuple[list[Segment], bytes]:
        """-> (canonical multipart body as segments of the spool, its boundary), or Rejected with the 4xx
        answer that says why."""
        hint = f"send {'one or more image files' if field.many else 'one image file'} as multipart field {field.name!r}"
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        media, params = parse_options_header(content_type)
        if media != b"multipart/form-data":
            raise Rejected(
                415, f"content type {content_type or 'missing'}; send multipart/form-data with field {field.name!r}"
            )
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding != b"identity":  # else its parts are misread: a form without the field
            got = encoding[:40].decode("latin-1")
            raise Rejected(415, f"Content-Encoding {got!r}; send the form uncompressed (images are compressed already)")
        boundary = params.get(b"boundary", b"")
        if not boundary or len(boundary) > MAX_BOUNDARY:
            got = "no boundary parameter" if not boundary else f"a boundary over {MAX_BOUNDARY} characters"
            raise Rejected(400, f"Content-Type multipart/form-data has {got}; {hint}")
        with spool.whole() as body:
            try:
                parts = parse_form(body, boundary, max_files=self.max_images if field.many else 1)
            except TooManyFiles as exc:
                if field.many:
                    raise Rejected(413, f"got {exc.count} images; at most {self.max_images} per request") from exc
                raise Rejected(  # in any fields: a second one may be named otherwise
                    400, f"got {exc.count} files; this endpoint takes one, in field {field.name!r} (use /predict_batch)"
                ) from exc
            except Rejected as exc:
                raise Rejected(exc.status, f"malformed multipart form: {exc.message}; {hint}") from exc
            unknown = sorted({p.name for p in parts} - {field.name})
            if unknown:
                raise Rejected(400, f"unknown field {unknown[0]!r}; {hint}")
            if not parts:
                raise Rejected(400, f"missing field {field.name!r}; {hint}")
            if any(p.filename is None for p in parts):
                raise Rejected(
                    400, f"field {field.name!r} must be a file upload, not text (URLs are not fetched); {hint}"
                )
            files, pixels = [], 0
            for i, part in enumerate(parts):
                # a copy of this one file (body may be a mapped file), dropped once its header is read
                # several files: each error names its file; one file: the decoder's words alone, as the Python
                # API and the batch command's local mode give them
                named = f"file {label(part.filename, i)}: " if field.many else ""
                size, fmt = self._header(part, body[part.start : part.end], named)
                pixels += size
                if pixels > self.max_request_pixels:
                    raise Rejected(
                        413,
                        f"the images hold more than {self.max_request_pixels} pixels together, the limit per request",
                    )
                files.append((part, fmt))
            return build_form(field.name, files, body)

    def _header(self, part: Part, data: bytes, named: str) -> tuple[int, str]:
        """One file's pixels, read from its header (nothing decoded), and its format; or Rejected, its message
        after `named`."""
        try:
            with open_image(data, self.max_pixels) as image:
                # the format from the magic number: Pillow names a JPEG with extra pictures (phones) MPO
                fmt = image_format(data[:16])
                assert fmt is not None  # open_image accepted the file: its magic number names a format
                return image.width * image.height, fmt
        except NotAnImage as exc:
            declared = part.content_type
            # a declared type says what the client thought it sent; the generic one says nothing
            said = f" (declared content type {declared})" if declared not in ("", GENERIC_TYPE) else ""
            raise Rejected(status_of(exc), f"{named}{exc}{said}") from exc
        except UserError as exc:
            raise Rejected(status_of(exc), f"{named}{exc}") from exc


def _no_input(path: str, spool: Spool) -> bytes:
    """A route that takes no input accepts an empty body, `null` or `{}`; it is passed on as `{}`."""
    text = spool.read(0, spool.size).strip() if spool.size <= SPOOL_BYTES else b"?"
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
