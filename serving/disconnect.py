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
of a 12 Mpx photo is 10-20 MB) stayed in the public API process for as long as its caller kept the connection
open. This middleware hands a large body on in ANSWER_CHUNK pieces, which uvicorn takes only as the
caller reads, within the limits uploads have (serving/uploads.py): a piece within idle_timeout seconds,
and min_rate bytes/s on average after idle_timeout seconds. Past either the answer is dropped and the
connection closed; until then the request keeps its slot (AGE_GENDER_MAX_CONCURRENCY).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import UserError, as_data

log = logging.getLogger("bentoml").getChild(__name__)  # BentoML shows its own loggers' INFO lines
# the most of an answer handed to uvicorn at once: it stops taking more while its connection's buffer is
# over asyncio's high-water mark (64 KiB), so a caller that reads nothing holds up to about twice this
ANSWER_CHUNK = 64 * 1024
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
    """Large answers handed on as their callers read them; dropped for callers that read too slowly."""

    def __init__(self, app: ASGIApp, idle_timeout: float, min_rate: float) -> None:
        self.app, self.idle_timeout, self.min_rate = app, idle_timeout, min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started, sent, dropped = 0.0, 0, ""  # when the first large piece went, bytes since, why it was dropped

        async def paced(message: Message) -> None:
            nonlocal started, sent, dropped
            body = message.get("body", b"")
            if dropped:
                raise _Dropped  # the app's further pieces go nowhere
            if message["type"] != "http.response.body" or len(body) <= ANSWER_CHUNK:
                return await send(message)  # small answers go at once, as uvicorn takes them
            view, more = memoryview(body), message.get("more_body", False)
            started = started or loop.time()
            for at in range(0, len(view), ANSWER_CHUNK):
                piece = bytes(view[at : at + ANSWER_CHUNK])
                try:
                    last = at + ANSWER_CHUNK >= len(view)
                    await asyncio.wait_for(
                        send({**message, "body": piece, "more_body": more or not last}), self.idle_timeout
                    )
                except TimeoutError:
                    dropped = f"read nothing of its answer for {self.idle_timeout:g} s"
                    raise _Dropped from None
                sent += len(piece)
                elapsed = loop.time() - started
                if elapsed > self.idle_timeout and sent < self.min_rate * elapsed:
                    dropped = f"read its answer at {sent / elapsed:.0f} bytes/s, under {self.min_rate:.0f}"
                    raise _Dropped

        try:
            await self.app(scope, receive, paced)
        except Exception:
            if not dropped:
                raise
            # the response is incomplete: uvicorn closes the connection, which frees what it holds of it
            log.warning("%s %s: the caller %s: answer dropped", scope["method"], scope["path"], dropped)


class _Dropped(Exception):
    """Raised into the app from send(): its answer is not wanted any more (its caller reads too slowly)."""
