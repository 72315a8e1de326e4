"""The short soak: many requests against the running service must not grow the detection workers' memory.

The detector used before (yuface 2023.5.1) leaked 23-35 kB per /predict inside its C code: 2.6 GB an hour
under load. Not asserted here, and still open: the public API process grows about 4-5 kB per request,
the same on the previous release, inside BentoML's OpenTelemetry request instrumentation (its spans stay
referenced); see the issue's closing note."""

from __future__ import annotations

import asyncio

import httpx

from devtools.launch import arbiter_pid, descendants, pss_kb, service_name
from devtools.photos import astronaut, encode, no_face

REQUESTS = 300


def _workers(url: str) -> dict[int, str]:
    return {pid: name for pid in descendants(arbiter_pid(url)) if (name := service_name(pid))}


async def _traffic(url: str, n: int) -> list[int]:
    """n requests, 8 in flight: one-face and no-face photos, a pre-cropped face, a non-image."""
    bodies = [
        ("/predict", {"image": ("a.jpg", encode(astronaut()), "image/jpeg")}),
        ("/predict", {"image": ("c.png", encode(no_face("coffee"), "PNG"), "image/png")}),
        ("/predict_faces", {"images": ("f.jpg", encode(astronaut().crop((150, 40, 300, 190))), "image/jpeg")}),
        ("/predict", {"image": ("n.jpg", b"not an image at all", "image/jpeg")}),
    ]
    slots = asyncio.Semaphore(8)
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(i: int) -> int:
            path, files = bodies[i % len(bodies)]
            async with slots:
                return (await client.post(url + path, files=files)).status_code

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_workers_memory_stays_flat_under_many_requests(server: str) -> None:
    asyncio.run(_traffic(server, 100))  # warm-up: allocator pools, ONNX Runtime arenas, caches
    workers = _workers(server)
    before = {pid: pss_kb(pid) for pid in workers}
    statuses = asyncio.run(_traffic(server, REQUESTS))
    assert sorted(set(statuses)) == [200, 415], statuses
    assert _workers(server) == workers, "a worker restarted during the run"
    growth = {f"{workers[pid]} {pid}": (pss_kb(pid) - kb) / REQUESTS for pid, kb in before.items()}
    detectors = [kb for name, kb in growth.items() if name.startswith("FaceDetection")]
    # half the requests are /predict: the old detector's leak would show as 10 kB or more per request
    assert detectors and all(kb < 6 for kb in detectors), f"PSS kB per request: {growth}"
