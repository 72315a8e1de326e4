"""Calls from the public API service to its dependency services: retried once, then a 503 (never a 500)
when a dependency's worker dies (tests/test_faults.py kills them under load)."""

from __future__ import annotations

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
