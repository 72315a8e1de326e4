"""Worker faults under load: `kill -9` the model worker, then a detector worker, while 16 requests are in
flight. Every client gets 200 or a 503 `{"error": ...}` object within its timeout, /readyz always answers
within 2 s, the killed worker is restarted and the service answers again. Prints the recovery times.

Its own `bentoml serve` (from the session's trained model), so the shared `server` is not disturbed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devtools.launch import descendants, running_service, service_name
from devtools.photos import astronaut, encode

CONCURRENCY = 16
CLIENT_TIMEOUT = 30  # s, per request
READYZ_TIMEOUT = 2  # s: /readyz must answer (any status) within this
RECOVERY_LIMIT = 30  # s: the killed worker's service answers 200 again within this
SERVICES = ("AgeGenderModel", "FaceDetection")


def workers(arbiter: int, service: str) -> set[int]:
    """The pids of `service`'s worker processes under the arbiter."""
    found = set()
    for pid in descendants(arbiter):
        try:
            if service_name(pid) == service:
                found.add(pid)
        except OSError:  # the process ended meanwhile
            continue
    return found


@dataclass
class Log:
    requests: list[tuple[float, float, int | str, object]] = field(default_factory=list)  # start, end, status, body
    readyz: list[tuple[float, float, int | str]] = field(default_factory=list)  # start, latency, status


async def load(client: httpx.AsyncClient, url: str, photo: bytes, log: Log, stop: asyncio.Event) -> None:
    while not stop.is_set():
        start = time.monotonic()
        try:
            r = await client.post(f"{url}/predict", files={"image": ("a.jpg", photo, "image/jpeg")})
            try:
                body = r.json()
            except ValueError:
                body = r.text
            log.requests.append((start, time.monotonic(), r.status_code, body))
        except httpx.HTTPError as exc:  # a hang past CLIENT_TIMEOUT or a dropped connection
            log.requests.append((start, time.monotonic(), type(exc).__name__, None))


async def poll_readyz(client: httpx.AsyncClient, url: str, log: Log, stop: asyncio.Event) -> None:
    while not stop.is_set():
        start = time.monotonic()
        try:
            status = (await client.get(f"{url}/readyz", timeout=READYZ_TIMEOUT)).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        log.readyz.append((start, time.monotonic() - start, status))
        await asyncio.sleep(0.2)


async def kill_and_recover(url: str, arbiter: int, service: str, log: Log) -> dict:
    """kill -9 one worker of `service`; wait for a new one, a 200 from a request sent after the kill and
    /readyz 200 again. -> measured times (s after the kill)."""
    before = workers(arbiter, service)
    assert before, f"no {service} worker under {arbiter}"
    victim = max(before)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    out: dict = {"service": service, "killed": victim}
    while time.monotonic() - killed < RECOVERY_LIMIT:
        now = workers(arbiter, service)
        if "restarted_s" not in out and victim not in now and len(now) == len(before):
            out["restarted_s"] = time.monotonic() - killed
        ok = [end for start, end, status, _ in log.requests if start > killed and status == 200]
        if ok and "first_200_s" not in out:
            out["first_200_s"] = min(ok) - killed
        after = [(start + latency, status) for start, latency, status in log.readyz if start > killed]
        down = [t for t, status in after if status != 200]
        up = [t for t, status in after if status == 200 and t > max(down, default=killed)]
        if up and "first_200_s" in out and "restarted_s" in out:
            out["readyz_not_ready"] = len(down)
            out["readyz_200_s"] = min(up) - killed
            return out
        await asyncio.sleep(0.1)
    return out


async def scenario(url: str, arbiter: int) -> tuple[Log, list[dict]]:
    photo = encode(astronaut())
    log, stop = Log(), asyncio.Event()
    limits = httpx.Limits(max_connections=CONCURRENCY + 2)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:
        tasks = [asyncio.create_task(load(client, url, photo, log, stop)) for _ in range(CONCURRENCY)]
        tasks.append(asyncio.create_task(poll_readyz(client, url, log, stop)))
        try:
            warm = time.monotonic()
            while sum(status == 200 for *_, status, _ in log.requests) < CONCURRENCY:  # warmed up, in full flow
                assert time.monotonic() - warm < 60, f"not {CONCURRENCY} answers in 60 s: {log.requests[-3:]}"
                await asyncio.sleep(0.2)
            recoveries = []
            for service in SERVICES:
                recoveries.append(await kill_and_recover(url, arbiter, service, log))
                print(f"\n{service} worker killed: {recoveries[-1]}", flush=True)
                if "readyz_200_s" not in recoveries[-1]:
                    break
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return log, recoveries


def check(log: Log, recoveries: list[dict]) -> None:
    summary = f"recoveries {recoveries}"
    for recovery in recoveries:
        assert "restarted_s" in recovery, f"{recovery['service']} worker not restarted; {summary}"
        assert "first_200_s" in recovery, f"no 200 within {RECOVERY_LIMIT} s after the kill; {summary}"
        assert "readyz_200_s" in recovery, f"/readyz not 200 within {RECOVERY_LIMIT} s after the kill; {summary}"
    statuses = [status for _, _, status, _ in log.requests]
    bad = [(status, body) for _, _, status, body in log.requests if status not in (200, 503)]
    assert not bad, f"{len(bad)} of {len(statuses)} requests neither 200 nor 503: {bad[:3]}; {summary}"
    for _, _, status, body in log.requests:
        if status == 503:
            assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    slow = [(latency, status) for _, latency, status in log.readyz if not isinstance(status, int)]
    assert not slow, f"/readyz gave no answer within {READYZ_TIMEOUT} s {len(slow)} times; {summary}"
    assert max(latency for _, latency, _ in log.readyz) < READYZ_TIMEOUT


def test_worker_kill_under_load(model_tag: str, tmp_path: Path) -> None:
    env = {"AGE_GENDER_MODEL": model_tag}
    started = time.monotonic()
    with running_service(env, tmp_path / "serve.log") as url:
        log, recoveries = asyncio.run(scenario(url, running_service.pid))
    statuses = [status for _, _, status, _ in log.requests]
    print(
        f"\n{len(statuses)} requests: {statuses.count(200)} x 200, {statuses.count(503)} x 503; /readyz polled"
        f" {len(log.readyz)} times, slowest {max(latency for _, latency, _ in log.readyz):.2f} s;"
        f" {time.monotonic() - started:.0f} s in all",
        flush=True,
    )
    check(log, recoveries)


def test_stalled_model_worker_answers_503(model_tag: str, tmp_path: Path) -> None:
    """A model worker that stops answering (SIGSTOP: alive, connections accepted, nothing answered) costs
    the client one dependency timeout, then a 503 `{"error": ...}`, not the API's 120 s; it serves again
    once the worker continues. The dependency timeout is shortened through BentoML's own config."""
    stall_timeout = 3  # s, services.AgeGenderModel.traffic.timeout for this run
    env = {
        "AGE_GENDER_MODEL": model_tag,
        "BENTOML_CONFIG_OPTIONS": f"services.AgeGenderModel.traffic.timeout={stall_timeout}",
    }
    face = encode(astronaut().resize((200, 200)))
    with running_service(env, tmp_path / "serve.log") as url, httpx.Client(timeout=CLIENT_TIMEOUT) as client:

        def predict_faces() -> tuple[httpx.Response, float]:
            start = time.monotonic()
            r = client.post(f"{url}/predict_faces", files={"images": ("face.jpg", face, "image/jpeg")})
            return r, time.monotonic() - start

        assert predict_faces()[0].status_code == 200
        (victim,) = workers(running_service.pid, "AgeGenderModel")
        os.kill(victim, signal.SIGSTOP)
        try:
            stalled, seconds = predict_faces()
        finally:
            os.kill(victim, signal.SIGCONT)
        assert stalled.status_code == 503, stalled.text
        assert "retry" in stalled.json()["error"]  # BentoML hides 5xx texts; the guard words this one
        assert seconds < 3 * stall_timeout, f"503 after {seconds:.1f} s"
        assert predict_faces()[0].status_code == 200
