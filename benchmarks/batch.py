"""`python -m benchmarks.batch`: throughput of the batch command (`python -m predict`) on this machine,
locally and through a running service (--url), on the same folder of photos and the same model.

Photos: the test photos (one face; three faces) at 960x640, alternating; the model: ResNet-34 at 224 px
with random weights (speed does not depend on the weights). Each mode runs as a user runs it, as a
subprocess, wall time including start-up. Results: benchmarks/results/batch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import RESULTS, make_model
from devtools.launch import running_service
from devtools.photos import astronaut, group_photo

ROOT = Path(__file__).resolve().parent.parent


def timed(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "predict", *args], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=120)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="bench-home-"))
    tag, model_dir, _ = make_model("resnet34", 224)
    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    pictures = [astronaut().resize((960, 640)), group_photo()[0]]
    for i in range(args.photos):
        pictures[i % 2].save(work / f"{i:04d}.jpg", quality=90)
    results = {"photos": args.photos, "cores": os.cpu_count()}
    seconds = timed(str(work), "--out", str(work / "local.jsonl"), "--model", model_dir)
    results["local_photos_per_s"] = round(args.photos / seconds, 2)
    with running_service({"AGE_GENDER_MODEL": tag}, work / "serve.log") as url:
        remote = ("--url", url, "--concurrency", str(args.concurrency))
        seconds = timed(str(work), "--out", str(work / "remote.jsonl"), *remote)
    results["url_photos_per_s"] = round(args.photos / seconds, 2)
    results["url_concurrency"] = args.concurrency
    print(json.dumps(results, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batch.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
