"""The request guard (serving/guard.py) with slow, stalled, oversized and departing clients: the guard called
directly, its receive() played by hand-written ASGI functions."""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.responses import JSONResponse

from devtools.forms import PNG, B, form, part
from serving.guard import BUSY_DRAIN_SECONDS, DRAIN_UP_TO, MAX_DRAINS, RequestGuard
from tests.test_guard import LIMITS, ROUTES


async def _call_guard(receive, headers: list | None = None) -> tuple[list[dict], bool]:
    reached = False

    async def app(scope, receive, send):
        nonlocal reached
        reached = True

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    guard = RequestGuard(app, ROUTES, **LIMITS)
    headers = headers or [(b"content-type", b"multipart/form-data; boundary=" + B)]
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    await asyncio.wait_for(guard(scope, receive, send), timeout=5)
    return sent, reached


def _answer(sent: list[dict]) -> tuple[int, dict, str]:
    import json

    start, body = sent[0], sent[-1]
    return start["status"], dict(start["headers"]), json.loads(body["body"])["error"]


def test_stalled_body_answers_408_after_the_idle_timeout() -> None:
    async def receive() -> dict:
        if not receive.calls:
            receive.calls += 1
            return {"type": "http.request", "body": b"--" + B + b"\r\n", "more_body": True}
        await asyncio.Event().wait()  # the client sent the headers and a little, then went quiet

    ctype = (b"content-type", b"multipart/form-data; boundary=" + B)
    for length, why in [(None, ""), (b"1000", ": 12 of the 1000 bytes its Content-Length declares arrived")]:
        receive.calls = 0
        start = time.perf_counter()
        sent, reached = asyncio.run(_call_guard(receive, [ctype] + ([(b"content-length", length)] if length else [])))
        status, headers, message = _answer(sent)
        assert status == 408 and not reached
        assert message == "no request body bytes for 0.3 s" + why  # chunked: no length to compare with
        assert headers[b"connection"] == b"close" and time.perf_counter() - start < 1


def test_slow_body_answers_408_at_the_upload_deadline() -> None:
    async def receive() -> dict:
        await asyncio.sleep(0.05)  # never idle long enough for the idle timeout, 1,000 bytes/s
        return {"type": "http.request", "body": b"x" * 50, "more_body": True}

    start = time.perf_counter()
    sent, reached = asyncio.run(_call_guard(receive))
    status, _, message = _answer(sent)
    assert status == 408 and "longer than 1 s" in message and not reached
    assert time.perf_counter() - start < 2


def test_trickling_body_is_cut_once_its_rate_is_below_the_minimum() -> None:
    async def receive() -> dict:
        await asyncio.sleep(0.05)  # a byte now and then: never idle, 20 bytes/s
        return {"type": "http.request", "body": b"x", "more_body": True}

    start = time.perf_counter()
    sent, reached = asyncio.run(_call_guard(receive))
    status, headers, message = _answer(sent)
    assert status == 408 and "under the minimum of 100 bytes/s" in message and not reached
    assert headers[b"connection"] == b"close" and 0.3 <= time.perf_counter() - start < 0.6


@pytest.mark.parametrize("times", [1.5, 3.0])
def test_body_somewhat_over_the_limit_is_read_to_its_end_before_its_413(times: float) -> None:
    """A client that writes its whole body before reading the answer (http.client, requests) reads the 413
    only if the body was read: up to DRAIN_UP_TO x max_bytes it is, past that the answer comes at once."""
    chunk, total = 1_000_000, int(times * LIMITS["max_bytes"])
    pieces = total // chunk

    async def receive() -> dict:
        receive.calls += 1
        return {"type": "http.request", "body": b"x" * chunk, "more_body": receive.calls < pieces}

    receive.calls = 0
    sent, reached = asyncio.run(_call_guard(receive))
    status, headers, message = _answer(sent)
    assert status == 413 and "byte limit" in message and not reached and headers[b"connection"] == b"close"
    read_all = receive.calls == pieces
    assert read_all == (times < DRAIN_UP_TO), (receive.calls, pieces)


@pytest.mark.parametrize("expect", [False, True])
def test_body_declared_far_over_the_limit_is_read_for_a_while_before_its_413(expect: bool) -> None:
    """Declared past DRAIN_UP_TO x max_bytes: read (and dropped) for up to BUSY_DRAIN_SECONDS, so that a
    client on a fast link that writes it whole first (httpx: the batch command) reads the 413, not a reset;
    a client waiting for `100 Continue` gets it at once."""
    declared = 50 * DRAIN_UP_TO * LIMITS["max_bytes"]
    headers = [(b"content-type", b"multipart/form-data; boundary=" + B), (b"content-length", str(declared).encode())]
    if expect:
        headers.append((b"expect", b"100-continue"))

    async def receive() -> dict:  # 1 MB every 0.1 s, for longer than anybody waits
        receive.calls += 1
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b"x" * 1_000_000, "more_body": True}

    receive.calls = 0
    sent, reached = asyncio.run(_call_guard(receive, headers))
    status, headers_sent, message = _answer(sent)
    assert status == 413 and "byte limit" in message and not reached and headers_sent[b"connection"] == b"close"
    read_for = receive.calls * 0.1
    assert read_for == 0 if expect else BUSY_DRAIN_SECONDS - 0.5 <= read_for <= BUSY_DRAIN_SECONDS + 0.5


def test_client_gone_mid_body_is_not_served() -> None:
    messages = iter([{"type": "http.request", "body": b"--" + B, "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(messages)

    sent, reached = asyncio.run(_call_guard(receive))
    assert sent == [] and not reached


def test_uploads_being_received_hold_no_handling_slot() -> None:
    """Two limits: bodies being received (max_uploads) and requests being handled (max_concurrency), the
    second counted from a complete body. Stalled uploads fill the first and leave the second to others;
    past either, 429 at once naming its setting; health checks and what is not an API (the page's files,
    the docs) are never limited."""
    release = asyncio.Event()

    async def app(scope, receive, send) -> None:
        if scope["path"] == "/predict":
            await release.wait()
        await JSONResponse({"ok": True})(scope, receive, send)

    async def stalled() -> dict:  # a client that sent its headers, then nothing
        await asyncio.Event().wait()

    limits = {**LIMITS, "idle_timeout": 5, "upload_timeout": 10, "max_uploads": 2, "max_concurrency": 1}
    guard = RequestGuard(app, ROUTES, **limits)
    read: list[bool] = []  # more_body of each message a whole body's receive gave

    async def call(method: str, path: str, body: bytes | None = None, extra: tuple = ()) -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def whole() -> dict:
            read.append(False)
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(b"content-type", b"multipart/form-data; boundary=" + B), *extra]
        scope = {"type": "http", "method": method, "path": path, "headers": headers}
        await guard(scope, stalled if body is None else whole, send)
        return sent

    async def handling(n: int) -> None:
        while guard.handling != n:
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        slow = asyncio.create_task(call("POST", "/predict", form(part(b"image", PNG))))  # held until released
        await asyncio.wait_for(handling(1), 5)  # the one handling slot is taken
        uploads = [asyncio.create_task(call("POST", "/predict")) for _ in range(2)]
        await asyncio.sleep(0.05)
        for path in ("/docs", "/ui/app.js", "/readyz"):
            assert (await asyncio.wait_for(call("GET", path), 1))[0]["status"] == 200, path
        started = time.monotonic()  # a stalled body is waited for BUSY_DRAIN_SECONDS, then closed on
        status, headers, message = _answer(await asyncio.wait_for(call("POST", "/predict"), BUSY_DRAIN_SECONDS + 1))
        assert status == 429 and "uploads being received: 2," in message and "AGE_GENDER_MAX_UPLOADS" in message
        assert headers[b"connection"] == b"close" and time.monotonic() - started >= BUSY_DRAIN_SECONDS
        read.clear()  # a whole body is read before its 429: closed on unread, a client sees a reset instead
        status, _, _ = _answer(await asyncio.wait_for(call("POST", "/predict", form(part(b"image", PNG))), 1))
        assert status == 429 and read == [False]
        # a client waiting for `100 Continue` is not invited to send what would be refused: 429 at once
        waiting = call("POST", "/predict", form(part(b"image", PNG)), ((b"expect", b"100-continue"),))
        read.clear()
        assert _answer(await asyncio.wait_for(waiting, 0.5))[0] == 429 and read == []
        # and at most MAX_DRAINS refused bodies are drained at once: past that, 429 at once
        draining = [asyncio.create_task(call("POST", "/predict")) for _ in range(MAX_DRAINS)]
        await asyncio.sleep(0.2)
        assert _answer(await asyncio.wait_for(call("POST", "/predict"), 0.5))[0] == 429
        assert {_answer(await d)[0] for d in draining} == {429}
        uploads[0].cancel()  # a slot to receive one more body, which is complete: refused once checked
        await asyncio.gather(uploads[0], return_exceptions=True)
        status, headers, message = _answer(
            await asyncio.wait_for(call("POST", "/predict", form(part(b"image", PNG))), 1)
        )
        assert status == 429 and "AGE_GENDER_MAX_CONCURRENCY" in message and headers[b"retry-after"] == b"1"
        release.set()
        await slow
        assert (await asyncio.wait_for(call("POST", "/predict", form(part(b"image", PNG))), 5))[0]["status"] == 200
        uploads[1].cancel()

    asyncio.run(scenario())


def test_an_answer_being_sent_holds_no_handling_slot() -> None:
    """A request's slot (max_concurrency) is given back when its answer starts: a caller slow to read its
    answer (serving/disconnect.py bounds how slow) does not hold a slot that a request ready to run needs."""
    finish, first = asyncio.Event(), [True]

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        if first and first.pop():  # the first request's answer is still being sent
            await finish.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    guard = RequestGuard(app, ROUTES, **{**LIMITS, "max_concurrency": 1})

    async def call(sent: list[dict]) -> list[dict]:
        async def receive() -> dict:
            return {"type": "http.request", "body": form(part(b"image", PNG)), "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [(b"content-type", b"multipart/form-data; boundary=" + B)]
        await guard({"type": "http", "method": "POST", "path": "/predict", "headers": headers}, receive, send)
        return sent

    async def scenario() -> None:
        started: list[dict] = []
        sending = asyncio.create_task(call(started))
        while len(started) < 2:
            await asyncio.sleep(0.01)
        assert guard.handling == 0 and not sending.done()
        assert (await asyncio.wait_for(call([]), 5))[0]["status"] == 200  # not 429
        finish.set()
        await sending
        assert guard.handling == 0

    asyncio.run(scenario())
