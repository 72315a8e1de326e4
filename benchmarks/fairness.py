"""`python -m benchmarks.fairness`: does one heavy request hold other clients hostage?

One client sends a /predict_batch of many large photos; meanwhile another client sends one-face
/predict requests one after another. Reported: that client's latency alone and during the heavy
request, and how long the heavy request took. `--checkout DIR` serves the service of another checkout
(e.g. `git worktree add /tmp/before <commit>`) with the same model, for a before/after comparison.
Limits are raised for the run so the heavy request is admitted.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time

import httpx
import numpy as np

from benchmarks.run import RESULTS, before_after_options, make_model, own_store, photos
from devtools.launch import running_service
from devtools.photos import astronaut


def large_photo(megapixels: float) -> bytes:
    side = int((megapixels * 1e6 / 12) ** 0.5)  # 4:3
    image = astronaut().resize((4 * side, 3 * side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()


def latencies(url: str, photo: bytes, until) -> list[float]:
    out = []
    while not until():
        start = time.perf_counter()
        r = httpx.post(url + "/predict", files={"image": ("a.jpg", photo, "image/jpeg")}, timeout=300)
        assert r.status_code == 200, r.text
        out.append(time.perf_counter() - start)
    return out


def measure(url: str, images: int, megapixels: float) -> dict:
    small = photos()["one_face"]
    alone_until = time.perf_counter() + 5
    alone = latencies(url, small, lambda: time.perf_counter() > alone_until)
    big = [("images", (f"{i}.jpg", large_photo(megapixels), "image/jpeg")) for i in range(images)]
    done = threading.Event()
    heavy: dict = {}

    def heavy_client() -> None:
        start = time.perf_counter()
        r = httpx.post(url + "/predict_batch", files=big, timeout=600)
        heavy.update(status=r.status_code, seconds=time.perf_counter() - start)
        done.set()

    thread = threading.Thread(target=heavy_client)
    thread.start()
    time.sleep(0.5)  # the heavy request is being read and detected
    during = latencies(url, small, done.is_set)
    thread.join()

    def ms(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)) * 1000) if values else float("nan")

    return {
        "heavy_request": {"images": images, "megapixels_each": megapixels, **heavy},
        "alone_ms": {"p50": ms(alone, 50), "max": ms(alone, 100), "n": len(alone)},
        "during_ms": {"p50": ms(during, 50), "max": ms(during, 100), "n": len(during)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--megapixels", type=float, default=12.0)
    before_after_options(p)
    args = p.parse_args()
    own_store()
    tag, _, _ = make_model("resnet34", 224)
    env = {
        "AGE_GENDER_MODEL": tag,
        "AGE_GENDER_MAX_BYTES": str(1 << 30),
        "AGE_GENDER_MAX_REQUEST_PIXELS": str(10**10),
        "AGE_GENDER_MAX_IMAGES": str(args.images),
        "PYTHONPATH": str(args.checkout),
    }
    with running_service(env, RESULTS / f"fairness_{args.label}.log", cwd=args.checkout) as url:
        result = measure(url, args.images, args.megapixels)
    (RESULTS / f"fairness_{args.label}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
