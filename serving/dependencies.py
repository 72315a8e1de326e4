"""Calls from the public API service to its dependency services, and their readiness: what BentoML
1.4.40 gets wrong when a dependency's worker dies (tests/test_faults.py kills them under load)."""

from __future__ import annotations

import asyncio

import aiohttp
import bentoml

# s: the longest the entry service's /readyz waits for one dependency's /readyz (they are asked at once)
DEPENDENCY_READY_TIMEOUT = 1.0


class DependencyUnavailable(bentoml.exceptions.ServiceUnavailable):
    """503: a dependency service could not be reached (its worker died and is not back yet)."""


async def call_dependency(method, *args):
    """A dependency call, retried once if the local connection was reset: BentoML's pooled inter-service
    connections were seen reset under load (about 1 request in 1,300 at 64 concurrent photos), and a
    killed worker resets its connections (its restarted successor answers the retry). Every dependency
    API here is idempotent, so a retry is safe. If it still fails: 503, never a 500."""
    try:
        return await method(*args)
    except aiohttp.ClientConnectionError:
        pass
    except TimeoutError as exc:  # no answer within the dependency's timeout: do not wait that long again
        raise DependencyUnavailable("a backend service is temporarily unavailable, retry") from exc
    try:
        return await method(*args)
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise DependencyUnavailable("a backend service is temporarily unavailable, retry") from exc


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

    async def is_ready(self, timeout: int | None = None) -> bool:
        try:
            return await asyncio.wait_for(original(self, timeout), DEPENDENCY_READY_TIMEOUT)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    is_ready.bounded = True
    RemoteProxy.is_ready = is_ready
