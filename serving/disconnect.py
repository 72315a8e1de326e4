"""WatchCaller: what is done for a request whose caller disconnects before its answer starts.

Neither uvicorn nor BentoML stops a request whose client has gone: a client that uploads large photos and
hangs up would otherwise leave minutes of detection behind it. This middleware watches the caller's
connection once the request's body has been read (from then on the caller has nothing more to send, so
receive() returns only its disconnect):
- in the public API (cancel=True, inside the request guard, which has read the body already) the
  request's task is cancelled: photos not yet sent to a detector process are never sent, and the calls
  in flight are cancelled, which closes their connections to the detector processes;
- in the detector processes (cancel=False) the request is only marked (answer_if_caller_waits): a call that waited
  for the process's one thread drops its photo when its turn comes. A photo being detected is finished:
  cancelling BentoML's call would let its thread run on beside the next photo's (anyio abandons it),
  two detections where memory is sized for one.
Not in the model process: its calls wait in BentoML's batching queue, and it answers in milliseconds.

SlowReaders: what is done for a caller that does not read its answer. uvicorn takes an answer's body
whole into its connection's buffer and the request ends there, so an answer never read (/annotate's PNG
of a 12 Mpx photo is 10-20 MB) stayed in the public API process for as long as its caller kept the
connection open. This middleware hands a large body on in ANSWER_CHUNK pieces, which uvicorn takes only as
the caller reads (it waits while its buffer is over asyncio's high-water mark, 64 KiB, until it is under
16 KiB): a piece not taken within idle_timeout seconds, a caller that took in no 48-112 KiB in that time
(under ~5-10 KiB/s at the default 10 s), drops the rest of the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from contextvars import ContextVar

import prometheus_client
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import UserError, as_data

log = logging.getLogger("bentoml").getChild(__name__)  # BentoML shows its own loggers' INFO lines
# the most of an answer handed to uvicorn at once: a caller that reads nothing leaves up to about twice this
# in uvicorn's buffer, with the rest of the answer freed
ANSWER_CHUNK = 64 * 1024
# /metrics' age_gender_answers_dropped_total{endpoint}: BentoML's own request counter and access log act on
# an answer's last message, so they never see a dropped answer's request end
DROPPED = prometheus_client.Counter(
    "age_gender_answers_dropped", "answers dropped, their callers reading none", ["endpoint"]
)
# whether the request being handled has lost its caller: a holder the middleware sets, seen by the
# request's tasks and by the threads BentoML runs its sync APIs in (both copy the context)
LEFT: ContextVar[list[bool] | None] = ContextVar("caller_left", default=None)


def answer_if_caller_waits(work: Callable[[], dict]) -> dict:
    """work()'s dict, or a UserError it raised, as data (models.errors.as_data); if the caller of the request
    being handled has left (WatchCaller), work() is not done and a UserError says so."""

    def checked() -> dict:
        holder = LEFT.get()
        if holder and holder[0]:
            raise UserError("the caller left before its answer")
        return work()

    return as_data(checked)


class WatchCaller:
    def __init__(self, app: ASGIApp, cancel: bool) -> None:
        self.app, self.cancel = app, cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read = asyncio.Event()
        started = False

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                body_read.set()
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        async def caller_left() -> None:
            await body_read.wait()  # a request the app never reads (GET) is never watched
            # receive() also resumes reading a connection that uvicorn paused under a large body: else
            # the caller's close would go unnoticed
            while (await receive())["type"] != "http.disconnect":
                pass

        holder = [False]
        LEFT.set(holder)  # in this request's task only: each ASGI request runs in its own
        handling = asyncio.ensure_future(self.app(scope, receiving, sending))
        gone = asyncio.ensure_future(caller_left())
        try:
            await asyncio.wait((handling, gone), return_when=asyncio.FIRST_COMPLETED)
            if not handling.done() and not started:  # once the answer has started, a disconnect is its end
                holder[0] = True
                log.info("%s %s: the caller left before the answer", scope["method"], scope["path"])
                if self.cancel:
                    handling.cancel()
            await asyncio.wait((handling,))
            if not handling.cancelled():
                handling.result()  # the app's own exception, as if it had been awaited directly
        finally:
            gone.cancel()
            # this task cancelled (BentoML's timeout): the request goes with it, left to unwind on its own
            handling.cancel()


class SlowReaders:
    """Large answers handed on as their callers take them in; dropped for callers that stop taking them."""

    def __init__(self, app: ASGIApp, idle_timeout: float, routes: Iterable[str] = ()) -> None:
        self.app, self.idle_timeout = app, idle_timeout
        for route in routes:  # on /metrics at 0 from the start: a rate over a series that appears late misses its first
            DROPPED.labels(endpoint=route)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def paced(message: Message) -> None:
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or len(body) <= ANSWER_CHUNK:
                return await send(message)  # small answers go at once, as uvicorn takes them
            view, more = memoryview(body), message.get("more_body", False)
            for at in range(0, len(view), ANSWER_CHUNK):
                last = at + ANSWER_CHUNK >= len(view)
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        await send(
                            {**message, "body": bytes(view[at : at + ANSWER_CHUNK]), "more_body": more or not last}
                        )
                except TimeoutError:
                    raise _Dropped from None

        try:
            await self.app(scope, receive, paced)
        except Exception as exc:
            if not _dropped(exc):
                raise
            # the rest is not sent: uvicorn closes the connection once the caller has taken in what it holds
            # (up to ~2 x ANSWER_CHUNK) or has gone, and logs "ASGI callable returned without completing response"
            log.warning(
                "%s %s: the caller took in no %d KiB of its answer in %g s: the rest is dropped",
                scope["method"],
                scope["path"],
                ANSWER_CHUNK // 1024,
                self.idle_timeout,
            )
            DROPPED.labels(endpoint=scope["path"]).inc()


class _Dropped(Exception):
    """Raised into the app from send(): the rest of its answer is not wanted (its caller takes in nothing)."""


def _dropped(exc: BaseException | None) -> bool:
    """Whether an exception is _Dropped, or was raised while it unwound (another middleware's own)."""
    while exc is not None:
        if isinstance(exc, _Dropped):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
