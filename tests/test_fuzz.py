"""Property-based fuzzing from the service's own OpenAPI document (schemathesis): every operation of the
running `server`'s /docs.json gets generated requests, valid and invalid, and every answer must be no 5xx,
a documented status code, a documented content type and a body that matches the documented schema."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = 50  # per operation (9 operations; schemathesis adds its coverage-phase cases): ~10 s here


SEEN: Counter = Counter()  # (operation, status) -> examples sent


@pytest.fixture(scope="module")
def api_schema(server: str):
    yield schemathesis.openapi.from_url(f"{server}/docs.json", wait_for_schema=30)
    for operation in sorted({op for op, _ in SEEN}):
        statuses = ", ".join(f"{n} x {status}" for (op, status), n in sorted(SEEN.items()) if op == operation)
        print(f"\n{operation}: {statuses}", end="")
    print(f"\n{SEEN.total()} examples in all")


@pytest.fixture(autouse=True)
def _nodeid_shim(request) -> None:
    """schemathesis 4.32's lazy loader reads and writes `Node._nodeid`, which pytest 9.2 no longer has."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples on every run: a failure found once is found again
    print_blob=True,
)
def test_openapi_conformance(case) -> None:
    response = case.call(timeout=60)
    SEEN[case.operation.label, response.status_code] += 1
    case.validate_response(response, checks=CHECKS)
