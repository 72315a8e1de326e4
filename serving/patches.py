"""Two fixes to BentoML 1.4.40's HTTP server, applied by service.py in every service process, and one
setting of the form parser it uses.

- /readyz of the entry service hung for 5 s, then answered 500, while a dependency's worker restarted.
- Every request left a timer alive for the whole traffic timeout (120 s), holding that request's
  context (tracing span, futures): about 4-7 kB per request per process under load, which read as a
  leak in every worker until the timers fired (tests/test_memory.py).
- BentoML parses forms with Starlette, which keeps every file part of up to 1 MiB in memory until the
  response is sent: up to AGE_GENDER_MAX_BYTES per request being handled. Parts past SPOOL_BYTES
  (64 KiB, serving/uploads.py) go to a temporary file instead.

Both replace private BentoML functions, so they are applied only to the BentoML they were written for:
any other version, or a replaced function whose source changed, stops the service with one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect

import aiohttp
import bentoml

from serving.uploads import SPOOL_BYTES

# s: the longest the entry service's /readyz waits for one dependency's /readyz (they are asked at once)
DEPENDENCY_READY_TIMEOUT = 1.0
BENTOML_VERSION = "1.4.40"  # requirements/serve.txt pins it
# sha256 of the source of each function replaced here, as BentoML 1.4.40 ships it (first 16 hex digits)
PATCHED_SOURCES = {"RemoteProxy.is_ready": "5c649680aaac30ec", "TimeoutMiddleware.__call__": "fd8b9e3da28ed2b4"}


class IncompatibleBentoML(SystemExit):
    """The installed BentoML is not the one these patches were written for (exits with its one line)."""


def apply() -> None:
    if bentoml.__version__ != BENTOML_VERSION:
        raise IncompatibleBentoML(
            f"error: serving/patches.py replaces private functions of BentoML {BENTOML_VERSION}; BentoML "
            f"{bentoml.__version__} is installed: install bentoml=={BENTOML_VERSION} (requirements/serve.txt)"
        )
    bound_dependency_readiness()
    cancel_request_timers()
    spool_form_parts()


def spool_form_parts() -> None:
    from starlette.formparsers import MultiPartParser

    if not isinstance(getattr(MultiPartParser, "spool_max_size", None), int):
        raise IncompatibleBentoML(
            "error: Starlette's MultiPartParser has no spool_max_size (serving/patches.py sets it): install "
            "the Starlette of requirements/serve.txt"
        )
    MultiPartParser.spool_max_size = SPOOL_BYTES


def check_source(function) -> None:
    """IncompatibleBentoML unless the function about to be replaced is the one the patch was written for."""
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    if PATCHED_SOURCES[function.__qualname__] != digest:
        raise IncompatibleBentoML(
            f"error: BentoML's {function.__qualname__} is not the one serving/patches.py replaces (source "
            f"{digest}, expected {PATCHED_SOURCES[function.__qualname__]}): review the patch against it"
        )


def bound_dependency_readiness() -> None:
    """BentoML's /readyz of the entry service asks each dependency's /readyz with a 5 s timeout and catches
    only aiohttp.ServerTimeoutError. While a dependency's worker restarts, the listening socket (held by the
    arbiter) still accepts connections but nobody answers: /readyz hung for 5 s, then answered 500 with the
    TimeoutError. Here a dependency that does not answer /readyz 200 within DEPENDENCY_READY_TIMEOUT, or
    cannot be reached, is simply not ready: /readyz answers 503 in about a second."""
    from _bentoml_impl.client import RemoteProxy

    original = RemoteProxy.is_ready
    if getattr(original, "bounded", False):
        return
    check_source(original)

    async def is_ready(self, timeout: int | None = None) -> bool:
        try:
            return await asyncio.wait_for(original(self, timeout), DEPENDENCY_READY_TIMEOUT)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    is_ready.bounded = True  # type: ignore[attr-defined]  # the mark that this patch is in place
    RemoteProxy.is_ready = is_ready


def cancel_request_timers() -> None:
    """BentoML's TimeoutMiddleware arms `loop.call_later(timeout, ...)` per request and never cancels it:
    the timer handle keeps the request's context (its tracing span, futures) referenced until the timeout
    passes; and a request that ends without sending anything waits there for the timeout. Here the same
    middleware (bentoml/_internal/server/http/traffic.py, 1.4.40) cancels the timer when the request is
    over, however it ends."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.responses import JSONResponse

    if getattr(TimeoutMiddleware.__call__, "cancels_timer", False):
        return
    check_source(TimeoutMiddleware.__call__)

    async def call(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def started(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, started))
        # a request that ends without an answer (its client left: serving/disconnect.py; an exception)
        # ends here too, not at the timeout: its task, context and span are not held for it
        task.add_done_callback(lambda _: None if waiter.done() else waiter.set_result(None))
        try:
            await waiter
        except TimeoutError:
            if task.cancel():
                message = f"Not able to process the request in {self.timeout} seconds"
                await JSONResponse({"error": message}, status_code=504)(scope, receive, send)
        else:
            await task
        finally:
            timer.cancel()

    call.cancels_timer = True  # type: ignore[attr-defined]  # the mark that this patch is in place
    TimeoutMiddleware.__call__ = call  # type: ignore[method-assign]
