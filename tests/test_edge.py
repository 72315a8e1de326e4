"""The outermost middlewares (serving/edge.py), in-process around a stand-in service: request IDs, CORS and
the API key, in the order service.py adds them (the first added is the outermost)."""

from __future__ import annotations

import logging

import bentoml
import pytest
from starlette.testclient import TestClient

from serving.edge import ApiKey, RequestId, cors, log_request_ids

KEY = "s3cret-key"
ORIGIN = "https://app.example"


@bentoml.service
class Echo:
    @bentoml.api
    def model_info(self) -> dict:
        logging.getLogger("bentoml").warning("handling model_info")
        return {"ok": True}


Echo.add_asgi_middleware(RequestId)
Echo.add_asgi_middleware(cors, origins=f"{ORIGIN}, https://other.example")
Echo.add_asgi_middleware(ApiKey, key=KEY)


@pytest.fixture(scope="module")
def client():
    with TestClient(Echo.to_asgi(), raise_server_exceptions=False) as c:
        yield c


def test_api_key_is_required_except_for_health_checks(client) -> None:
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = client.post("/model_info", headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"], headers
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"}):
        assert client.post("/model_info", headers=headers).json() == {"ok": True}, headers
    assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200


def test_request_id_is_taken_or_made_and_answered(client, caplog) -> None:
    log_request_ids()
    with caplog.at_level(logging.WARNING, logger="bentoml"):
        r = client.post("/model_info", headers={"X-API-Key": KEY, "X-Request-ID": "order-42.a_b"})
    assert r.headers["X-Request-ID"] == "order-42.a_b"
    assert any(m.startswith("[request order-42.a_b] handling") for m in caplog.messages), caplog.messages
    for given in ({}, {"X-Request-ID": "evil\r\nid"}, {"X-Request-ID": "x" * 129}):
        made = client.post("/model_info", headers=given).headers["X-Request-ID"]  # a 401 carries one too
        assert len(made) == 32 and int(made, 16) >= 0, given


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
    app = object()
    assert cors(app, "") is app and cors(app, " , ") is app  # off by default
