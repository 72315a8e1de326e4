"""Where the batch command's photos are answered: in this machine's processes, or by a running service.

Both yield (photo, PhotoResult or None, error text or None) as photos finish, in any order; an error
never stops the run.
- local: one FaceFinder per worker process (detection is the CPU-bound step: every core gets one), the
  network in this process, crops of several photos batched into it (models/pipeline.py).
- remote (--url): POST /predict to a service, or a Kubernetes Service in front of many replicas, with at
  most `concurrency` requests in flight; 429, 502, 503, 504 and dropped connections are retried with
  exponential backoff and jitter (TRANSIENT marks a photo that still failed: a rerun tries it again);
  any other answer is that photo's error.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import queue
import random
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import cv2

from models.errors import UserError, debugging
from models.faces import DetectorConfig
from models.images import read_image_file
from models.pipeline import Detection, FaceFinder
from models.predictor import Predictor
from models.schemas import PhotoResult

Outcome = tuple[Path, PhotoResult | None, str | None]
RETRY_STATUSES = (429, 502, 503, 504)
PHOTO_ERRORS = (400, 413, 415)  # the service's answers about the photo itself: not an image, broken, too large
MAX_RETRY_AFTER = 60.0  # seconds: a Retry-After longer than this is waited this long (a job does not stall for hours)
# how the error of a photo that failed for a while starts (every retry busy or dropped, or its detection
# process killed): a rerun tries it again
TRANSIENT = "gave up after"
# Local mode's flow control. Photos in flight per detection process: enough that a process never waits
# for its next photo while the network runs, few enough that decoded photos (up to 150 MB each at 50 Mpx)
# stay bounded however slow the network is.
IN_FLIGHT_PER_WORKER = 4
PR_SET_PDEATHSIG = 1  # Linux prctl(2): the signal a process gets when its parent dies
# Detected photos per network call, per detection process, when their faces do not fill a batch first:
# photos of one or two faces still reach the network in batches, and answers are not held back long.
ANSWER_EVERY_PER_WORKER = 2

_finder: FaceFinder | None = None  # one per worker process


def _start_worker(config: DetectorConfig, max_pixels: int) -> None:
    global _finder
    # Ctrl-C reaches every process of the terminal's group: the command answers it, its workers finish quietly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":  # and a command killed alone (kill PID, the OOM killer) takes its workers along
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    cv2.setNumThreads(1)  # one detection per core: no thread teams on top
    _finder = FaceFinder(config, max_pixels)


def _detect(path: Path) -> Detection | str:
    """A photo's detection, or the text of whatever went wrong with it (nothing here may stop the run)."""
    assert _finder is not None, "runs in the pool's processes, which _start_worker set up"
    try:
        return _finder.find(read_image_file(path, _finder.max_pixels))
    except UserError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror}"
    except Exception as exc:  # a bug or a library failure on one odd photo: that photo's error row
        if debugging():
            raise
        return f"{type(exc).__name__}: {exc}"


def run_local(predictor: Predictor, paths: list[Path], workers: int) -> Iterator[Outcome]:
    """Detection in `workers` processes (with the predictor's settings), at most IN_FLIGHT_PER_WORKER photos
    per process in flight; whenever a batch of faces or ANSWER_EVERY_PER_WORKER photos per process are
    detected, their crops go through the network together. A detection process that dies (the OOM killer)
    costs the photos then in flight their answers, marked TRANSIENT so that a rerun tries them again; the
    run goes on in new processes, unless twice in a row they die before detecting any photo."""
    todo, fruitless = deque(paths), 0  # pools in a row that died before detecting any photo
    while todo:
        settings = (predictor.finder.config, predictor.finder.max_pixels)
        with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=settings) as pool:
            window: deque[tuple[Path, Future]] = deque()  # submitted, not collected
            pending: list = []
            try:
                while todo or window:
                    while todo and len(window) < IN_FLIGHT_PER_WORKER * workers:
                        window.append((todo[0], pool.submit(_detect, todo[0])))
                        todo.popleft()
                    yield from _collect(predictor, window[0], pending, workers)
                    window.popleft()
                    fruitless = 0
                yield from _answer(predictor, pending)
            except BrokenProcessPool:
                lost = [(path, future) for path, future in window if future.exception() is not None]
                for path, future in window:  # detected before the process died: answered
                    if future.exception() is None:
                        fruitless = 0
                        yield from _collect(predictor, (path, future), pending, workers)
                yield from _answer(predictor, pending)
                died = f"a detection process died (out of memory?) with this photo among {len(lost)} in flight"
                yield from ((path, None, f"{TRANSIENT} {died}") for path, _ in lost)
                fruitless += 1
                if fruitless == 2 and todo:
                    raise UserError(
                        "detection processes died twice in a row before detecting a photo (out of memory?): "
                        "run again with fewer --workers, or on smaller photos"
                    ) from None
            except BaseException:  # Ctrl-C: the photos still queued are not detected first
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _collect(predictor: Predictor, item, pending: list, workers: int) -> Iterator[Outcome]:
    path, future = item
    detection = future.result()
    if isinstance(detection, str):
        yield path, None, detection
        return
    pending.append((path, detection))
    faces = sum(len(d.boxes) for _, d in pending)
    if faces >= predictor.batch_size or len(pending) >= ANSWER_EVERY_PER_WORKER * workers:
        yield from _answer(predictor, pending)
        pending.clear()


def _answer(predictor: Predictor, pending: list[tuple[Path, Detection]]) -> Iterator[Outcome]:
    if not pending:
        return
    results = predictor.answer([d for _, d in pending])
    yield from ((path, result, None) for (path, _), result in zip(pending, results, strict=True))


def run_remote(
    url: str, paths: list[Path], concurrency: int, retries: int, timeout: float, api_key: str = ""
) -> Iterator[Outcome]:
    """The photos sent to `url`'s /predict from a background event loop; outcomes as they arrive. A 401 (the
    API key), 404 or 405 (not the service's address) stops the run: every photo would get it."""
    outcomes: queue.Queue = queue.Queue()
    done = object()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def loop() -> None:
        try:
            asyncio.run(_send_all(url.rstrip("/"), paths, concurrency, retries, timeout, headers, outcomes.put))
        except BaseException as exc:  # a UserError (a 401); with --debug, anything: raised in the caller's thread
            outcomes.put(exc)
        finally:
            outcomes.put(done)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    while (item := outcomes.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


async def _send_all(
    url: str, paths: list[Path], concurrency: int, retries: int, timeout: float, headers: dict, put
) -> None:
    import httpx

    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:

        async def one(path: Path) -> None:
            async with slots:
                try:
                    put((path, *await _send(client, url, path, retries)))
                except UserError:
                    raise
                except Exception as exc:  # e.g. a 200 that is not our JSON (a proxy's page): that photo's error
                    if debugging():
                        raise
                    put((path, None, f"{type(exc).__name__}: {exc}"))

        try:  # the first 401 cancels every other photo's task before the client closes: none gets a row
            async with asyncio.TaskGroup() as tasks:
                for p in paths:
                    tasks.create_task(one(p))
        except* UserError as group:
            raise group.exceptions[0] from None


async def _send(client, url: str, path: Path, retries: int) -> tuple[PhotoResult | None, str | None]:
    import httpx

    try:
        data = read_image_file(path, None)  # the service's pixel limit is its own
    except OSError as exc:
        return None, f"cannot read the file: {exc.strerror}"
    except UserError as exc:  # not an image: the row the service's 415 would give, nothing sent
        return None, str(exc)
    name = os.fsencode(path.name).decode(errors="replace")  # a header holds text: bytes not UTF-8 are replaced
    problem, asked = "", 0.0
    for attempt in range(retries + 1):
        if attempt:  # 0.5, 1, 2, 4 ... s, +-25 % so that many clients do not retry in step; or what the server asked
            await asyncio.sleep(max(asked, min(30.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25)))
        try:
            r = await client.post(f"{url}/predict", files={"image": (name, data, "application/octet-stream")})
        except httpx.HTTPError as exc:  # refused, reset, timed out: the service may be restarting
            problem, asked = f"{type(exc).__name__} {exc}".strip(), 0.0
            continue
        if r.status_code == 200:
            return PhotoResult.model_validate(r.json()), None
        said = _service_error(r)
        if r.status_code in PHOTO_ERRORS and said is not None:  # the row says what local mode's says
            return None, said
        problem = f"HTTP {r.status_code}: {r.text[:200] if said is None else said}"
        if r.status_code == 401:
            raise UserError(f"{url} refused the API key ({problem}): give the service's key with --api-key")
        if r.status_code in (404, 405):  # the service has a POST /predict: this address is something else
            raise UserError(f"{url}/predict answered {problem}: give the service's address, without a path, with --url")
        if r.status_code not in RETRY_STATUSES:
            return None, problem
        retry_after = r.headers.get("retry-after", "")
        seconds = retry_after.isascii() and retry_after.isdigit()  # its date form is not taken
        asked = min(MAX_RETRY_AFTER, float(retry_after)) if seconds else 0.0
    return None, f"{TRANSIENT} {retries + 1} tries: {problem}"


def _service_error(r) -> str | None:
    """The message of the service's JSON {"error"} answer; None for anything else (a proxy's page)."""
    try:
        return str(r.json()["error"])
    except (ValueError, KeyError, TypeError):
        return None
