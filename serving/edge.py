"""What every request meets first (outermost middlewares): its request ID, the API key, CORS.

- X-Request-ID: the client's (1-128 letters, digits, `.`, `_`, `-`), else a new one; answered in the
  response's X-Request-ID and written in every log line of the request, in the API process and in the
  detector and model processes its calls reach: it travels in the W3C `baggage` header, which BentoML's
  client sends with each call, and CallerRequestId reads it there. (Not from OpenTelemetry's context on
  the receiving side: under BentoML 1.4.40 the model service's access log lines carried the baggage of an
  earlier request on the same connection.)
- API key (AGE_GENDER_API_KEY, off when empty): every route but the health checks and /metrics needs
  `Authorization: Bearer <key>` or `X-API-Key: <key>`; 401 `{"error"}` otherwise, before the body is read.
- CORS (AGE_GENDER_CORS_ORIGINS, off when empty): browsers on those origins may call the API.
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import baggage
from opentelemetry import context as otel
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import UserError

# the ID of the request being handled, in a holder emptied when it ends: tasks started while it is handled
# keep a copy of its context (BentoML's batch dispatcher starts its loop lazily, in the first request's)
# and must not go on naming it
REQUEST_ID: ContextVar[list[str] | None] = ContextVar("request_id", default=None)
BAGGAGE = W3CBaggagePropagator()
VALID_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # what is echoed into headers and logs: nothing to inject
CARRIED = "age_gender.request_id"  # the baggage entry
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})  # probes and scrapers carry no key
# an Origin as browsers send it: scheme://host[:port] with no path (apps' schemes too: capacitor://localhost),
# or `null` (sandboxed pages, file://); `*` in the setting means any, and nowhere else matches
ORIGIN = re.compile(r"\*|null|[a-z][a-z0-9+.-]*://[^/\s?#*]+")


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if VALID_ID.fullmatch(given) else uuid.uuid4().hex
        carried = otel.attach(baggage.set_baggage(CARRIED, request_id))  # sent along with each call

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            with handling(request_id):
                await self.app(scope, receive, with_id)
        finally:
            otel.detach(carried)


class ApiKey:
    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.key or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        bearer = headers.get(b"authorization", b"")
        given = bearer[7:] if bearer[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        if hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        message = "missing or wrong API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
        await JSONResponse({"error": message}, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)


def cors_origins(raw: str) -> list[str]:
    """A comma-separated list of origins -> the origins; a UserError for one no browser sends (with a path,
    a trailing slash, a wildcard in its host) that would never match."""
    origins = [o.strip() for o in raw.split(",") if o.strip()]
    for origin in origins:
        if not ORIGIN.fullmatch(origin):
            raise UserError(
                f"{origin!r} is not an origin: give scheme://host[:port] such as https://app.example.com "
                "(no path, no trailing /, no wildcard), null, or * for any"
            )
    return origins


class JsonCORS(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered as every error is: a JSON {"error"}."""

    def preflight_response(self, request_headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        why = bytes(response.body).decode()  # "Disallowed CORS origin, method, headers", those that apply
        setting = " (the service's AGE_GENDER_CORS_ORIGINS)" if "origin" in why else ""
        message = f"CORS preflight refused: {why}{setting}"
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse({"error": message}, response.status_code, headers)


def cors(app: ASGIApp, origins: str) -> ASGIApp:
    """CORS for a comma-separated list of origins (`*`: any); none: the app as it is."""
    allowed = cors_origins(origins)
    if not allowed:
        return app
    return JsonCORS(
        app,
        allow_origins=allowed,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type"],
        expose_headers=["X-Request-ID"],
    )


class CallerRequestId:
    """In the dependency services: the calling request's ID, from the `baggage` header of the call."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = dict(scope.get("headers", [])).get(b"baggage", b"").decode("latin-1")
        # extracted into an empty context: nothing of this process's own context can stand in for it
        carried = baggage.get_baggage(CARRIED, BAGGAGE.extract({"baggage": header}, otel.Context())) if header else None
        if scope["type"] != "http" or not isinstance(carried, str) or not VALID_ID.fullmatch(carried):
            return await self.app(scope, receive, send)
        with handling(carried):
            await self.app(scope, receive, send)


@contextmanager
def handling(request_id: str) -> Iterator[None]:
    holder = [request_id]
    token = REQUEST_ID.set(holder)
    try:
        yield
    finally:
        holder[0] = "-"
        REQUEST_ID.reset(token)


def current_request_id() -> str:
    holder = REQUEST_ID.get()
    return holder[0] if holder else "-"


def log_request_ids() -> None:
    """Every log record made in this process while a request is handled gets its `request_id` and a
    `[request ID]` prefix, whichever logger makes it (a record factory: logger filters are not inherited)."""
    make = logging.getLogRecordFactory()
    if getattr(make, "request_ids", False):
        return

    def record(*args, **kwargs) -> logging.LogRecord:
        rec = make(*args, **kwargs)
        request_id = current_request_id()
        setattr(rec, "request_id", request_id)  # noqa: B010  # an extra field, as logging's `extra=` adds
        if request_id != "-":
            rec.msg = f"[request {request_id}] {rec.msg}"
        return rec

    record.request_ids = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(record)
