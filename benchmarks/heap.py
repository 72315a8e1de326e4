"""`python -m benchmarks.heap` (in `make bench`): detection's CPU and memory under each heap policy.

A detector process runs `FaceFinder.find` in a worker thread (BentoML's pool for sync APIs), so it is
run here the same way, each policy in a fresh process (`--one POLICY`), the policies alternating over
`--rounds`:
- `1 MiB threshold`: what serving/heap.py sets in every service process (`return_large_buffers`);
- `detector`: what a detector process sets on top (`keep_buffers_while_working`), each call through a
  `HeapTrimmer`;
- `glibc defaults`: nothing set.
Printed: CPU ms per photo (the astronaut at 512 px, as benchmarks.int8 sends; a photo of 400 faces; a
12 Mpx photo), the process's resident memory after 70 small photos (what it keeps between them) and the
most that one of the large photos left the process above its level before it (the goal: under 50 MB).
Results: benchmarks/results/heap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

POLICIES = ("1 MiB threshold", "detector", "glibc defaults")


def one(policy: str) -> dict[str, float]:
    """In this (fresh) process: set the policy, then time the photos in a worker thread."""
    from PIL import Image

    from devtools.photos import astronaut, encode, face_grid, group_photo
    from models.pipeline import FaceFinder
    from serving import heap

    if policy != "glibc defaults":
        heap.return_large_buffers()
    if policy == "detector":
        heap.keep_buffers_while_working()
    finder, worker, trimmer = FaceFinder(), ThreadPoolExecutor(1), heap.HeapTrimmer()
    left: list[int] = []  # resident bytes each call left behind, over the level before it

    def find(data: bytes) -> None:
        before = heap.resident_bytes()
        with trimmer.call() if policy == "detector" else nullcontext():
            finder.find(data)
        left.append(heap.resident_bytes() - before)

    def cpu_ms(data: bytes, calls: int) -> float:
        start = time.process_time()
        for _ in range(calls):
            worker.submit(find, data).result()
        return round((time.process_time() - start) / calls * 1000, 1)

    small, crowd = encode(astronaut()), encode(Image.fromarray(face_grid(20, 100)))
    large = encode(group_photo()[0].resize((4000, 3000)))
    out = {"astronaut 512x512, CPU ms": cpu_ms(small, 70)}
    out["resident MB after it"] = round(heap.resident_bytes() / 2**20)
    left.clear()
    out["400 faces 2000x2000, CPU ms"] = cpu_ms(crowd, 2)
    out["group photo 4000x3000, CPU ms"] = cpu_ms(large, 2)
    out["MB a large photo left, at most"] = round(max(left) / 2**20)
    return out


def main() -> None:
    from benchmarks.run import RESULTS  # here, not at the top: it loads torch, which the measured processes must not

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--one", choices=POLICIES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    runs: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    for _ in range(args.rounds):
        for policy in POLICIES:
            cmd = [sys.executable, "-m", "benchmarks.heap", "--one", policy]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"{policy}: {done.stderr.strip()}")
            runs[policy].append(json.loads(done.stdout.splitlines()[-1]))
    columns = list(runs[POLICIES[0]][0])
    print("| heap policy | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for policy, rows in runs.items():
        print(f"| {policy} | " + " | ".join(" / ".join(str(r[c]) for r in rows) for c in columns) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "heap.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
