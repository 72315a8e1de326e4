"""A request whose caller leaves before its answer (serving/disconnect.py): in-process with clients played
by hand-written ASGI receive() functions, and against the real `bentoml serve` with clients that upload
phone photos and hang up."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import time
from pathlib import Path

import anyio.to_thread
import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.responses import JSONResponse

from devtools.forms import MULTIPART, PNG, form, part
from devtools.launch import arbiter_pid, descendants, pss_kb, service_name
from devtools.photos import encode, group_photo, no_face
from serving.disconnect import ANSWER_CHUNK, SlowReaders, WatchCaller, answer_if_caller_waits
from serving.guard import RequestGuard
from serving.routes import FileField
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


def _post_and_leave(url: str, photo: bytes, request_id: str, path: str = "/predict") -> socket.socket:
    """A whole body sent on a raw socket, the answer not read (the socket takes in at most a few kB of it
    meanwhile); the caller closes the socket, or reads it later."""
    host, port = url.removeprefix("http://").split(":")
    body = form(part(b"image", photo, b"a.jpg", b"image/jpeg"))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-Request-ID: {request_id}\r\n"
        f"Content-Type: {MULTIPART}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting, so that it holds
    sock.connect((host, int(port)))
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


def _through_slow_readers(app, stall_after: int | None = None) -> list[dict]:
    """`app`'s answer through SlowReaders (idle timeout 0.3 s) to a caller that takes in `stall_after` body
    messages, then nothing (uvicorn, its buffer full, waits). -> the messages the caller took in."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and stall_after is not None and len(sent) > stall_after:
            await asyncio.Event().wait()
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/annotate"}
    asyncio.run(asyncio.wait_for(SlowReaders(app, idle_timeout=0.3)(scope, None, send), timeout=10))
    return sent


def _answering(*bodies: bytes, then: Exception | None = None, raised: list | None = None, wrap: bool = False):
    """An ASGI app that answers these body messages (more_body on all but the last), then raises `then`;
    what its send() raised goes to `raised`, and is raised again, or wrapped in another error (`wrap`, as
    Starlette's exception middleware does once an answer has started)."""

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            for k, body in enumerate(bodies):
                await send({"type": "http.response.body", "body": body, "more_body": k < len(bodies) - 1})
        except Exception as exc:
            if raised is not None:
                raised.append(exc)
            if wrap:
                raise RuntimeError("Caught handled exception, but response already started.") from exc
            raise
        if then:
            raise then

    return app


def test_a_large_answer_goes_in_pieces_as_its_caller_takes_them_in(caplog) -> None:
    large = bytes(range(256)) * (ANSWER_CHUNK // 256 * 10 + 1)  # 10 pieces and 256 bytes
    sent = _through_slow_readers(_answering(large, b"end"))
    assert b"".join(m["body"] for m in sent[1:]) == large + b"end"
    assert [len(m["body"]) for m in sent[1:]] == [ANSWER_CHUNK] * 10 + [256, 3]
    assert [m["more_body"] for m in sent[1:]] == [True] * 11 + [False]  # the app's more_body kept
    small = _through_slow_readers(_answering(bytes(ANSWER_CHUNK)))
    assert small[1] == {"type": "http.response.body", "body": bytes(ANSWER_CHUNK), "more_body": False}
    assert "dropped" not in caplog.text


@pytest.mark.parametrize("wrap", [False, True])
def test_an_answer_its_caller_stops_taking_in_is_dropped(wrap: bool, caplog) -> None:
    """The caller takes in 3 pieces, then nothing: within the idle timeout the app's send() raises, the
    rest is not sent, and uvicorn, handed an incomplete answer, closes the connection."""
    raised: list = []
    start = time.monotonic()
    sent = _through_slow_readers(_answering(bytes(40 * ANSWER_CHUNK), raised=raised, wrap=wrap), stall_after=3)
    assert 0.3 <= time.monotonic() - start < 3
    assert raised and len(sent) == 1 + 3 and sent[-1]["more_body"]
    assert "POST /annotate: the caller took in no 64 KiB of its answer in 0.3 s: the rest is dropped" in caplog.text


def test_an_apps_own_error_is_not_taken_for_a_dropped_answer(caplog) -> None:
    with pytest.raises(ValueError, match="the app's own"):
        _through_slow_readers(_answering(bytes(3 * ANSWER_CHUNK), then=ValueError("the app's own")))
    assert "dropped" not in caplog.text


def _dropped_metric(server: str, route: str = "/annotate") -> float:
    """/metrics' count of a route's dropped answers: every API route has the line, at 0 before the first."""
    line = re.search(
        rf'^age_gender_answers_dropped_total\{{endpoint="{route}"\}} (\S+)$', httpx.get(server + "/metrics").text, re.M
    )
    assert line, f"no dropped-answers line for {route} on /metrics"
    return float(line.group(1))


def test_every_api_route_has_a_dropped_answers_count_from_the_start(server: str) -> None:
    """/predict's answers (JSON, under 64 KiB) are never dropped: its count is there, at 0."""
    assert _dropped_metric(server, "/predict") == 0
    assert _dropped_metric(server, "/model_info") == 0


def test_annotated_photos_their_callers_do_not_read_are_dropped(server: str, server_log: Path) -> None:
    """/annotate of a 12 Mpx photo answers a ~17 MB PNG. Callers that send the photo and read none of the
    answer: after the idle timeout (10 s) the rest of each answer is dropped, and the public API process
    holds none of them (uvicorn's buffer held each whole for as long as its caller stayed: +37 MB for
    three); a caller that reads gets its whole answer, and the service answers the next one at once."""
    rng = np.random.default_rng(0)
    coffee = np.asarray(no_face("coffee").resize((4000, 3000), Image.BICUBIC), np.int16)
    grainy = np.clip(coffee + rng.integers(-16, 17, coffee.shape), 0, 255).astype(np.uint8)  # PNG cannot shrink it
    photo = encode(Image.fromarray(grainy), quality=75)  # ~1.7 MB
    files = {"image": ("p.jpg", photo, "image/jpeg")}
    whole = httpx.post(server + "/annotate", files=files, timeout=60)
    assert whole.status_code == 200 and len(whole.content) > 10_000_000
    assert Image.open(io.BytesIO(whole.content)).size == (4000, 3000)
    api = next(pid for pid in descendants(arbiter_pid(server)) if service_name(pid) == "AgeGender")
    before, counted = pss_kb(api), _dropped_metric(server)
    tag = f"unread-{time.time_ns()}"
    sockets = [_post_and_leave(server, photo, f"{tag}-{i}", "/annotate") for i in range(3)]
    try:
        dropped: list[str] = []
        pattern = rf"\[request ({tag}-\d)\] POST /annotate: the caller took in no 64 KiB of its answer in"
        deadline = time.monotonic() + 180  # three 12 Mpx photos on two detector processes, then 10 s
        while len(dropped) < len(sockets) and time.monotonic() < deadline:
            time.sleep(1)
            dropped = re.findall(pattern, server_log.read_text(errors="replace"))
        assert len(dropped) == len(sockets), f"answers dropped: {dropped}"
        assert _dropped_metric(server) == counted + len(sockets)  # where BentoML's request counter misses them
        grown = (pss_kb(api) - before) / 1024
        assert grown < 15, f"the public API process holds {grown:.0f} MB more than before"
        start = time.perf_counter()
        r = httpx.post(
            server + "/predict", files={"image": ("a.jpg", encode(group_photo()[0]), "image/jpeg")}, timeout=30
        )
        assert r.status_code == 200 and time.perf_counter() - start < 5, r.text
    finally:
        for sock in sockets:
            sock.close()
