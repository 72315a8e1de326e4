"""The outermost middlewares (serving/edge.py), in-process around a stand-in app: request IDs, CORS and the
API key, nested as service.py adds them (BentoML: the first added is the outermost)."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from opentelemetry import baggage, propagate
from opentelemetry import context as otel
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from models.errors import UserError
from serving.edge import ApiKey, CallerRequestId, RequestId, cors, cors_origins, handling, log_request_ids

KEY = "s3cret-key"
ORIGIN = "https://app.example"


async def model_info(request) -> JSONResponse:
    logging.getLogger("bentoml").warning("handling model_info")
    return JSONResponse({"ok": True})


async def livez(request) -> PlainTextResponse:
    return PlainTextResponse("")


# a plain Starlette app (a second BentoML app in one process collides in its Prometheus registry), wrapped
# as service.py's add_asgi_middleware order nests them: RequestId outermost, then CORS, then the key
APP = RequestId(
    cors(
        ApiKey(Starlette(routes=[Route("/model_info", model_info, methods=["POST"]), Route("/livez", livez)]), key=KEY),
        f"{ORIGIN}, https://other.example",
    )
)


@pytest.fixture(scope="module")
def client():
    with TestClient(APP, raise_server_exceptions=False) as c:
        yield c


def test_api_key_is_required_except_for_health_checks(client) -> None:
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = client.post("/model_info", headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"], headers
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"}):
        assert client.post("/model_info", headers=headers).json() == {"ok": True}, headers
    assert client.get("/livez").status_code == 200


def test_request_id_is_taken_or_made_and_answered(client, caplog) -> None:
    log_request_ids()
    with caplog.at_level(logging.WARNING, logger="bentoml"):
        r = client.post("/model_info", headers={"X-API-Key": KEY, "X-Request-ID": "order-42.a_b"})
    assert r.headers["X-Request-ID"] == "order-42.a_b"
    assert any(m.startswith("[request order-42.a_b] handling") for m in caplog.messages), caplog.messages
    for given in ({}, {"X-Request-ID": "evil\r\nid"}, {"X-Request-ID": "x" * 129}):
        made = client.post("/model_info", headers=given).headers["X-Request-ID"]  # a 401 carries one too
        assert len(made) == 32 and int(made, 16) >= 0, given


def test_request_id_is_carried_to_the_dependency_services(caplog) -> None:
    """Calls made while a request is handled carry its ID as baggage (BentoML's client injects it with
    the trace context); a dependency service reads it from that header and logs it."""
    log_request_ids()
    injected: dict = {}

    async def call_dependency(request) -> JSONResponse:
        propagate.inject(injected)  # what BentoML's client does for each call to a dependency
        return JSONResponse({})

    async def detect(request) -> JSONResponse:
        logging.getLogger("bentoml").warning("detecting")
        return JSONResponse({})

    api = RequestId(Starlette(routes=[Route("/call", call_dependency, methods=["POST"])]))
    with TestClient(api) as c:
        c.post("/call", headers={"X-Request-ID": "order-43"})
    assert "age_gender.request_id=order-43" in injected.get("baggage", ""), injected
    dependency = CallerRequestId(Starlette(routes=[Route("/detect", detect, methods=["POST"])]))
    stale = otel.attach(baggage.set_baggage("age_gender.request_id", "stale"))  # only the header may count
    try:
        with TestClient(dependency) as c, caplog.at_level(logging.INFO, logger="bentoml"):
            c.post("/detect", headers=injected)
            c.post("/detect", headers={"baggage": "age_gender.request_id=bad%0Aid"})  # not a valid ID: none
            c.post("/detect", headers={"baggage": "other=1"})
            c.post("/detect")
    finally:
        otel.detach(stale)
    assert caplog.messages == ["[request order-43] detecting"] + ["detecting"] * 3, caplog.messages


def test_tasks_started_while_a_request_is_handled_stop_naming_it(caplog) -> None:
    """BentoML's batch dispatcher starts its loop in the first request's context; once that request is
    answered, the loop's log lines must not go on carrying its ID."""
    log_request_ids()

    async def scenario() -> None:
        answered = asyncio.Event()

        async def dispatcher() -> None:
            logging.getLogger("bentoml").warning("batch during")
            await answered.wait()
            logging.getLogger("bentoml").warning("batch after")

        with handling("first"):
            loop = asyncio.create_task(dispatcher())
            await asyncio.sleep(0)
        answered.set()
        await loop

    with caplog.at_level(logging.INFO, logger="bentoml"):
        asyncio.run(scenario())
    assert caplog.messages == ["[request first] batch during", "batch after"], caplog.messages


def test_cors_only_for_the_configured_origins(client) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    r = client.options("/model_info", headers={"Origin": ORIGIN, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = client.post("/model_info", headers={"Origin": ORIGIN, "X-API-Key": KEY})
    assert (
        r.headers["access-control-allow-origin"] == ORIGIN
        and "x-request-id" in r.headers["access-control-expose-headers"].lower()
    )
    r = client.post("/model_info", headers={"Origin": "https://elsewhere.example", "X-API-Key": KEY})
    assert "access-control-allow-origin" not in r.headers
    r = client.options("/model_info", headers={"Origin": "https://elsewhere.example", **preflight})
    assert r.status_code == 400 and "Disallowed CORS origin" in r.json()["error"]  # as every error: JSON
    assert "AGE_GENDER_CORS_ORIGINS" in r.json()["error"]
    r = client.options("/model_info", headers={"Origin": ORIGIN, **preflight, "Access-Control-Request-Method": "PUT"})
    assert r.status_code == 400 and "AGE_GENDER_CORS_ORIGINS" not in r.json()["error"]  # the method, not the origin
    for never in ("https://app.example/", "https://*.example.com", "app.example.com"):  # none would ever match
        with pytest.raises(UserError, match=re.escape(f"{never!r} is not an origin")):
            cors(object(), never)
    assert cors_origins("null, capacitor://localhost, http://localhost:8080, *") == [
        "null",
        "capacitor://localhost",
        "http://localhost:8080",
        "*",
    ]  # origins browsers do send
    app = object()
    assert cors(app, "") is app and cors(app, " , ") is app  # off by default
