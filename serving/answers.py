"""Error answers: every 4xx the public API gives is a JSON object `{"error": "..."}`, whoever made it (the
request guard, a pipeline UserError, BentoML's own validation and overload answers)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import Message, Send

from models.errors import NotAnImage, TooLarge, UserError

# seconds a 429 or 503 asks its client to wait: requests end, and workers restart, within seconds
RETRY_AFTER = b"1"


def error(status: int, message: str, close: bool = False) -> JSONResponse:
    """The error object every 4xx answer has; close=True when the request body was not read to its end."""
    return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)


def status_of(exc: UserError) -> int:
    """The HTTP status of a UserError: 413 over a size limit, 415 not an image, 400 anything else."""
    return 413 if isinstance(exc, TooLarge) else 415 if isinstance(exc, NotAnImage) else 400


def answers_user_errors(api):
    """Decorator of an async API: a UserError it raises becomes its `{"error"}` answer (status_of)."""

    @functools.wraps(api)
    async def wrapper(*args, **kwargs):
        try:
            return await api(*args, **kwargs)
        except UserError as exc:
            return error(status_of(exc), str(exc))

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


def busy(message: str) -> JSONResponse:
    """429: a limit of this server is reached; the connection is closed (a body may be left unread)."""
    return JSONResponse(
        {"error": f"{message}; retry shortly"},
        status_code=429,
        headers={"retry-after": RETRY_AFTER.decode(), "connection": "close"},
    )


def rewrite_response(send: Send, rewrite: Callable[[int, bytes], bytes], when: Callable[[int], bool]) -> Send:
    """Responses whose status passes when(): buffered and their body replaced by rewrite(status, body), sent
    as JSON, a 503 with Retry-After. Others pass through unbuffered."""
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
        if start["status"] == 503 and all(k.lower() != b"retry-after" for k, _ in headers):  # as 429s say it
            headers.append((b"retry-after", RETRY_AFTER))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return None

    return wrapped
