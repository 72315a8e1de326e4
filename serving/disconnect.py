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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import UserError, as_data

log = logging.getLogger("bentoml").getChild(__name__)  # BentoML shows its own loggers' INFO lines
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
