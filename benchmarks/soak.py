"""`make soak` / `python -m benchmarks.soak`: the service under steady load for minutes, a mix of good and
bad requests, watching errors, latency and the memory of every process over time.

32 clients in flight (default) send, in turn: a one-face photo, a photo with no face, a pre-cropped face,
a two-photo batch, a file that is not an image (415 expected) and a truncated JPEG (400 expected). Every
15 s the PSS of each service process is read from /proc. Reported: requests served, 5xx answers, lost
requests (no answer: connection errors, timeouts), unexpected statuses, p50/p99 per minute, and each
process's PSS slope after the warm-up (goal: flat). Results: benchmarks/results/soak.json and soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

import httpx
import numpy as np

from benchmarks.run import RESULTS, crop, make_model, own_store, photos
from devtools.launch import descendants, pss_kb, running_service, service_name
from devtools.photos import encode, no_face


def requests_mix() -> list[tuple[str, list, int]]:
    """(path, multipart files, expected status) in the order the clients cycle through."""
    one, face, empty = photos()["one_face"], crop(), encode(no_face("coffee"))
    return [
        ("/predict", [("image", ("one.jpg", one, "image/jpeg"))], 200),
        ("/predict", [("image", ("none.jpg", empty, "image/jpeg"))], 200),
        ("/predict_faces", [("images", ("face.jpg", face, "image/jpeg"))], 200),
        ("/predict_batch", [("images", ("a.jpg", one, "image/jpeg")), ("images", ("b.jpg", empty, "image/jpeg"))], 200),
        ("/predict", [("image", ("notes.jpg", b"not an image at all", "image/jpeg"))], 415),
        ("/predict", [("image", ("cut.jpg", one[: len(one) // 2], "image/jpeg"))], 400),
    ]


async def soak(url: str, arbiter: int, seconds: float, clients: int) -> dict:
    mix = requests_mix()
    records: list[tuple[float, int, float]] = []  # (seconds since start, status or 0 if lost, latency)
    unexpected: Counter = Counter()
    memory: list[dict] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        i = k
        while time.perf_counter() < deadline:
            path, files, expected = mix[i % len(mix)]
            i += 1
            sent = time.perf_counter()
            try:
                status = (await http.post(url + path, files=files)).status_code
            except httpx.HTTPError as exc:
                status = 0
                unexpected[type(exc).__name__] += 1
            if status and status != expected:
                unexpected[f"{path} {status} (expected {expected})"] += 1
            records.append((sent - start, status, time.perf_counter() - sent))

    async def sampler() -> None:
        while time.perf_counter() < deadline:
            sample = {"t": time.perf_counter() - start}
            for pid in descendants(arbiter):
                name = service_name(pid) or ("arbiter" if pid == arbiter else None)
                if name:
                    sample[f"{name} {pid}"] = pss_kb(pid) / 1024
            memory.append(sample)
            await asyncio.sleep(15)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(sampler(), *(client(k, http) for k in range(clients)))
    return {"records": records, "unexpected": dict(unexpected), "memory": memory}


def summarise(raw: dict, warmup: float) -> dict:
    t, status, latency = (np.array(v) for v in zip(*raw["records"], strict=True))
    minutes = []
    for m in range(int(np.ceil(t.max() / 60))):
        ms = latency[(t >= 60 * m) & (t < 60 * (m + 1)) & (status > 0)] * 1000
        minutes.append(
            {"minute": m + 1, "requests": len(ms), "p50_ms": np.percentile(ms, 50), "p99_ms": np.percentile(ms, 99)}
        )
    slopes = {}
    steady = [s for s in raw["memory"] if s["t"] >= warmup]
    for name in raw["memory"][-1]:
        points = [(s["t"], s[name]) for s in steady if name in s and name != "t"]
        if name != "t" and len(points) >= 3:
            x, y = np.array(points).T
            slopes[name] = {"start_mb": y[0], "end_mb": y[-1], "mb_per_min": float(np.polyfit(x / 60, y, 1)[0])}
    return {
        "requests": len(status),
        "served": int((status > 0).sum()),
        "5xx": int((status >= 500).sum()),
        "lost": int((status == 0).sum()),
        "statuses": {str(k): int(v) for k, v in zip(*np.unique(status, return_counts=True), strict=True)},
        "unexpected": raw["unexpected"],
        "per_minute": minutes,
        "memory_after_warmup": slopes,
    }


def plot(raw: dict, summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    minutes = summary["per_minute"]
    x = [m["minute"] for m in minutes]
    top.plot(x, [m["p50_ms"] for m in minutes], "o-", label="p50")
    top.plot(x, [m["p99_ms"] for m in minutes], "o-", label="p99")
    top.set_ylabel("latency per minute, ms")
    top.set_title(f"{summary['served']} requests served, {summary['5xx']} 5xx, {summary['lost']} lost")
    top.legend()
    for name in summary["memory_after_warmup"]:
        points = [(s["t"] / 60, s[name]) for s in raw["memory"] if name in s]
        bottom.plot(*zip(*points, strict=True), label=name)
    bottom.set_xlabel("minutes")
    bottom.set_ylabel("PSS, MB")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--warmup", type=float, default=120, help="seconds before memory should be flat")
    args = p.parse_args()
    own_store()
    tag, _, _ = make_model("resnet34", 224, int8=True)  # the CPU default since INT8 (AGE_GENDER_RUNTIME=auto)
    with running_service({"AGE_GENDER_MODEL": tag, "AGE_GENDER_RUNTIME": "onnx-int8"}, RESULTS / "soak.log") as url:
        raw = asyncio.run(soak(url, running_service.pid, args.minutes * 60, args.clients))
    summary = summarise(raw, args.warmup)
    (RESULTS / "soak.json").write_text(json.dumps({"summary": summary, "memory": raw["memory"]}, indent=2))
    plot(raw, summary, RESULTS / "soak.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_minute"}, indent=2))
    print("| minute | requests | p50 ms | p99 ms |\n|---|---|---|---|")
    for m in summary["per_minute"]:
        print(f"| {m['minute']} | {m['requests']} | {m['p50_ms']:.0f} | {m['p99_ms']:.0f} |")


if __name__ == "__main__":
    main()
