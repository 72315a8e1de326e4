"""Calls from the public API service to its dependency services: retried once, then a 503 (never a 500)
when a dependency's worker dies (tests/test_faults.py kills them under load); the bytes they carry at
once bounded (ByteBudget)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import bentoml

# a connection refused or reset, or an answer cut off mid-body (a worker killed while it was answering:
# seen in tests/test_faults.py as ClientPayloadError "Response payload is not completed")
BROKEN = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


class DependencyUnavailable(bentoml.exceptions.ServiceUnavailable):
    """503: a dependency service could not be reached (its worker died and is not back yet)."""


async def call_dependency(method, *args):
    """A dependency call, retried once if the local connection was reset: BentoML's pooled inter-service
    connections were seen reset under load (about 1 request in 1,300 at 64 concurrent photos), and a
    killed worker resets its connections (its restarted successor answers the retry). Every dependency
    API here is idempotent, so a retry is safe. If it still fails: 503, never a 500."""
    try:
        return await method(*args)
    except BROKEN:
        pass
    except TimeoutError as exc:  # no answer within the dependency's timeout: do not wait that long again
        raise DependencyUnavailable("a backend service is temporarily unavailable, retry") from exc
    try:
        return await method(*args)
    except (*BROKEN, TimeoutError) as exc:
        raise DependencyUnavailable("a backend service is temporarily unavailable, retry") from exc


class ByteBudget:
    """At most `limit` bytes held at once, granted first come first served; a single holder may exceed
    the limit alone (a file larger than the budget still goes, by itself).

    For files on their way to the detectors: each is in the API process's memory twice while its call is
    in flight (read from BentoML's temporary file, and pickled by BentoML's client), however many
    requests wait for a detector."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        if not self._waiting and self._fits(size):
            self.used += size
        else:
            granted = asyncio.get_running_loop().create_future()
            self._waiting.append((size, granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():  # granted just as its request was cancelled
                    self._release(size)
                elif (size, granted) in self._waiting:  # out of the queue now: those behind it may fit
                    self._waiting.remove((size, granted))
                    self._grant()
                raise
        try:
            yield
        finally:
            self._release(size)

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    def _release(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        # a waiter cancelled since (its task not yet resumed to leave the queue) is passed over
        while self._waiting and (self._waiting[0][1].cancelled() or self._fits(self._waiting[0][0])):
            size, granted = self._waiting.popleft()
            if not granted.cancelled():
                self.used += size
                granted.set_result(None)
