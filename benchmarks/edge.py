"""`python -m benchmarks.edge`: do slow and large uploads leave room for everyone else? (fair slots)

Against `bentoml serve` with the default limits (20 MiB per request, 128 requests handled at once):
1. `--tricklers` connections (150) each post an upload and send one byte of it a second; meanwhile one
   honest client sends one-face /predict requests one after another. Reported: the honest client's
   statuses and latency, and how and when the tricklers were answered.
2. `--uploads` (32) photos of just under 20 MiB (random pixels: incompressible) sent to /predict at once.
   Reported: the public API process's PSS before and at its highest (sampled every 20 ms), and the
   statuses. The service runs with AGE_GENDER_SMALL_FACES=false: with the second pass, 32 photos of 7 Mpx
   take two cores about 2 minutes to detect, past the 120 s request timeout (504s), and what is measured
   here is the API process, not detection.
`--checkout DIR` serves another checkout's service (e.g. `git worktree add /tmp/before <commit>`) with the
same model, for a before/after comparison; results in benchmarks/results/edge_<label>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

import httpx

from benchmarks.run import RESULTS, before_after_options, make_model, own_store, photos
from devtools.hostile import Tricklers, noise_png, parallel_uploads, peak_pss
from devtools.launch import arbiter_pid, descendants, running_service, service_name
from serving.settings import Settings

MAX_BYTES = Settings.max_bytes


async def honest_beside_tricklers(url: str, tricklers: int, seconds: float) -> dict:
    photo = {"image": ("a.jpg", photos()["one_face"], "image/jpeg")}
    statuses: Counter = Counter()
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:
        await client.post(url + "/predict", files=photo)  # warm
        start = time.perf_counter()
        async with Tricklers(url, "/predict", tricklers, every=1.0) as slow:
            opened = time.perf_counter() - start
            answered = asyncio.create_task(slow.answers(timeout=90))
            until = time.perf_counter() + seconds
            while time.perf_counter() < until:
                sent = time.perf_counter()
                r = await client.post(url + "/predict", files=photo)
                latencies.append(time.perf_counter() - sent)
                statuses[r.status_code] += 1
            cut = await answered
    return {
        "tricklers": tricklers,
        "opened_s": round(opened, 2),
        "honest_statuses": dict(statuses),
        "honest_latency_s": {"max": round(max(latencies), 3), "mean": round(sum(latencies) / len(latencies), 3)},
        "trickler_answers": dict(cut),
        "tricklers_all_answered_after_s": round(slow.last_answer_s, 1),
    }


def parallel_large(url: str, uploads: int) -> dict:
    api = next(pid for pid in descendants(arbiter_pid(url)) if service_name(pid) == "AgeGender")
    photo = noise_png(MAX_BYTES - 100_000)  # room for the multipart framing
    asyncio.run(parallel_uploads(url, "/predict", photo, 2))  # warm
    start = time.perf_counter()
    with peak_pss(api) as pss:
        statuses = asyncio.run(parallel_uploads(url, "/predict", photo, uploads))
    return {
        "uploads": uploads,
        "mb_each": round(len(photo) / 2**20, 1),
        "statuses": dict(Counter(statuses)),
        "seconds": round(time.perf_counter() - start, 1),
        "api_pss_mb": {"before": round(pss["before"]), "peak": round(pss["peak"])},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tricklers", type=int, default=150)
    p.add_argument("--seconds", type=float, default=20.0, help="of honest requests beside the tricklers")
    p.add_argument("--uploads", type=int, default=32, help="0: skip the second part")
    before_after_options(p)
    args = p.parse_args()
    own_store()
    tag, _, _ = make_model("resnet34", 224)
    env = {"AGE_GENDER_MODEL": tag, "AGE_GENDER_SMALL_FACES": "false", "PYTHONPATH": str(args.checkout)}
    with running_service(env, RESULTS / f"edge_{args.label}.log", cwd=args.checkout) as url:
        result = {"beside_tricklers": asyncio.run(honest_beside_tricklers(url, args.tricklers, args.seconds))}
        if args.uploads:
            result["parallel_large_uploads"] = parallel_large(url, args.uploads)
    (RESULTS / f"edge_{args.label}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
