"""An asyncio httpx load driver: N concurrent clients for a fixed time, latency percentiles, errors."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

import httpx
import numpy as np


async def _drive(url: str, files: list, concurrency: int, seconds: float) -> dict:
    latencies, errors = [], Counter()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    r = await client.post(url, files=files)
                    if r.status_code != 200:
                        errors[str(r.status_code)] += 1
                        continue
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": dict(errors),
    }


def drive(url: str, files: list, concurrency: int, seconds: float) -> dict:
    return asyncio.run(_drive(url, files, concurrency, seconds))


def batch_histogram(base_url: str) -> dict[str, float]:
    """Cumulative bucket counts of the model service's adaptive batch size histogram (from /metrics)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    buckets: Counter = Counter()
    pattern = r'bentoml_service_adaptive_batch_size_bucket\{le="([^"]+)"[^}]*method_name="predict"[^}]*\} ([0-9.e+]+)'
    for le, value in re.findall(pattern, text):
        buckets[le] += float(value)
    return dict(buckets)


def histogram_delta(before: dict, after: dict) -> dict[str, int]:
    """Batches per size range between two scrapes: {"1": n, "2": n, "3-4": n, ...} (non-cumulative)."""
    edges = sorted(float(k) for k in after if k != "+Inf")
    out, prev_count, prev_edge = {}, 0.0, 0
    for edge in edges:
        key = f"{edge:g}"
        count = after.get(key, after.get(f"{edge}", 0)) - before.get(key, before.get(f"{edge}", 0))
        label = f"{int(edge)}" if int(edge) == prev_edge + 1 else f"{prev_edge + 1}-{int(edge)}"
        if count - prev_count:
            out[label] = int(count - prev_count)
        prev_count, prev_edge = count, int(edge)
    return out
