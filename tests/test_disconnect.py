"""A request whose caller leaves before its answer (serving/disconnect.py): in-process with clients played
by hand-written ASGI receive() functions, and against the real `bentoml serve` with clients that upload
phone photos and hang up."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
from starlette.responses import JSONResponse

from devtools.forms import MULTIPART, PNG, form, part
from devtools.photos import encode, group_photo
from serving.disconnect import WatchCaller, answer_if_caller_waits
from serving.guard import FileField, RequestGuard
from serving.settings import DETECTOR_WORKERS

ROUTES = {"/predict": FileField("image", many=False)}
LIMITS = {"max_bytes": 1_000_000, "idle_timeout": 1.0, "upload_timeout": 2.0, "min_upload_rate": 100}


def _request(app, leaves: bool) -> list[dict]:
    """POST a complete one-image form through the guard to `app`; the client then leaves after 50 ms, or
    waits for its answer. -> what was sent to the client."""
    messages = [{"type": "http.request", "body": form(part(b"image", PNG)), "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        if leaves:
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # still there, waiting for its answer

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-type", MULTIPART.encode())]}
    asyncio.run(asyncio.wait_for(RequestGuard(app, ROUTES, **LIMITS)(scope, receive, send), timeout=5))
    return sent


async def _read_body(receive) -> None:
    while (await receive()).get("more_body"):
        pass


@pytest.mark.parametrize("leaves", [True, False])
def test_the_public_api_cancels_a_request_whose_client_left(leaves: bool) -> None:
    """cancel=True (the public API, inside the guard): the request's work stops and nothing is sent."""
    outcome = []

    async def app(scope, receive, send) -> None:
        await _read_body(receive)
        try:
            await asyncio.sleep(0.5)  # waiting for a detector
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        await JSONResponse({"ok": True})(scope, receive, send)
        outcome.append("answered")

    sent = _request(WatchCaller(app, cancel=True), leaves)
    if leaves:
        assert outcome == ["cancelled"] and sent == []
    else:
        assert outcome == ["answered"] and sent[0]["status"] == 200


@pytest.mark.parametrize("leaves", [True, False])
def test_a_detector_call_whose_caller_left_is_dropped_not_cancelled(leaves: bool) -> None:
    """cancel=False (the detector processes): a call that waited for the process's thread finds its caller
    gone there (answer_if_caller_waits, in the thread as BentoML runs sync APIs) and is not cut short."""
    outcome = []

    def work() -> None:
        answer = answer_if_caller_waits(lambda: {"worked": True})
        outcome.append(answer.get("error", "worked"))

    async def app(scope, receive, send) -> None:
        await _read_body(receive)
        await asyncio.sleep(0.2)  # waiting for the thread, busy with another photo
        await anyio.to_thread.run_sync(work, limiter=anyio.CapacityLimiter(1))  # as BentoML runs sync APIs
        await JSONResponse({"ok": True})(scope, receive, send)

    sent = _request(WatchCaller(app, cancel=False), leaves)
    assert outcome == (["the caller left before its answer"] if leaves else ["worked"])
    assert sent[0]["status"] == 200  # answered to nobody when the caller left: the call ran to its end


def _post_and_leave(url: str, photo: bytes, request_id: str) -> socket.socket:
    """A whole /predict body sent on a raw socket, the answer not read; the caller closes the socket."""
    host, port = url.removeprefix("http://").split(":")
    body = form(part(b"image", photo, b"a.jpg", b"image/jpeg"))
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nX-Request-ID: {request_id}\r\n"
        f"Content-Type: {MULTIPART}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode() + body)
    return sock


def test_photos_of_clients_that_left_are_not_detected(server: str, server_log: Path) -> None:
    """Clients upload 12 Mpx photos (2-5 s of detection each here), and hang up before their answers:
    each detector process finishes at most the photo it is working on; the others are never detected,
    and the service answers the next client at once."""
    photo = encode(group_photo()[0].resize((4000, 3000)))
    tag = f"left-{time.time_ns()}"
    ids = [f"{tag}-{i}" for i in range(3 * DETECTOR_WORKERS)]
    sockets = [_post_and_leave(server, photo, request_id) for request_id in ids]
    time.sleep(0.5)  # the photos reach the detector processes
    for sock in sockets:
        sock.close()
    # each photo that reached a detector process is marked there at once, and answered when its turn
    # comes: with a refusal of ~70 bytes if its caller had left by then, with its faces' crops if not
    marked: set[str] = set()
    answers: dict[str, int] = {}  # request ID -> bytes of the detector's answer (0: not a 200)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not marked or not marked <= set(answers)):
        time.sleep(1)
        log = server_log.read_text(errors="replace")
        marked = set(re.findall(rf"\[request ({tag}-\d+)\] POST /detect: the caller left", log))
        for found in re.finditer(rf"\[request ({tag}-\d+)\].*path=/detect,.*\(status=(\d+),[^)]*length=(\d+)\)", log):
            answers[found[1]] = int(found[3]) if found[2] == "200" else 0
    detected = [i for i, size in answers.items() if size > 10_000]
    assert marked and marked <= set(answers) and len(detected) <= DETECTOR_WORKERS, (marked, answers)
    # the photos that reached a detector process were cancelled by the API process (a body still arriving
    # when its client left is the request guard's to drop, unlogged)
    assert all(f"[request {i}] POST /predict: the caller left before the answer" in log for i in marked)
    start = time.perf_counter()
    r = httpx.post(server + "/predict", files={"image": ("a.jpg", encode(group_photo()[0]), "image/jpeg")}, timeout=30)
    assert r.status_code == 200 and time.perf_counter() - start < 5, r.text
