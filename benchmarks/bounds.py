"""`python -m benchmarks.bounds [--url URL]`: what the costliest requests cost, in process or end to end.

Each example goes through FaceFinder.find (decode under the upload rules, detection, alignment), as the
service's detector process runs it: the decoding bombs that are refused from their headers, photos of
hundreds of faces (bounded by AGE_GENDER_MAX_FACES), and phone-sized and 50 Mpx photos (the largest the
default limit takes). Printed: a Markdown table of CPU and wall seconds, the answer and the peak memory
the request took (resident memory at its highest during the call, above the level before it: the
peak is reset through /proc/self/clear_refs first); results in benchmarks/results/bounds.json.
With --url, the same examples go to a running service's /predict one at a time, as a client sends them:
printed are the status, the seconds until the answer and its error or its faces (bounds_http.json).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import httpx
from PIL import Image

from benchmarks.run import RESULTS
from devtools.photos import astronaut, encode, face_grid, group_photo, many_scans_jpeg, one_bit_png
from models.errors import UserError
from models.pipeline import FaceFinder


def examples() -> dict[str, bytes]:
    photo = group_photo()[0]  # three faces of 170-380 px on a 960x640 canvas
    return {
        "1-bit PNG, 7071x7071 (50 Mpx)": one_bit_png(7071),
        "progressive JPEG, 2,000 scans, 4 Mpx": many_scans_jpeg(astronaut().resize((2000, 2000)), 2000),
        "progressive JPEG, 100 scans, 4 Mpx": many_scans_jpeg(astronaut().resize((2000, 2000)), 100),
        "400 faces of 100 px, 2000x2000": encode(Image.fromarray(face_grid(20, 100))),
        "400 faces of 200 px, 4000x4000": encode(Image.fromarray(face_grid(20, 200))),
        "group photo, 4000x3000 (12 Mpx)": encode(photo.resize((4000, 3000))),
        "group photo, 8160x6120 (50 Mpx)": encode(photo.resize((8160, 6120))),
    }


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM: its peak), in MB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def run(finder: FaceFinder, data: bytes) -> dict:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    before = status_mb("VmRSS")
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        d = finder.find(data)
        answer = f"{len(d.boxes)} faces answered of {d.found} found"
    except UserError as exc:
        answer = f"refused: {str(exc)[:70]}"
    return {
        "MB": round(len(data) / 1e6, 2),
        "cpu_s": round(time.process_time() - cpu, 2),
        "wall_s": round(time.perf_counter() - wall, 2),
        "peak_mb": round(status_mb("VmHWM") - before),
        "answer": answer,
    }


def over_http(url: str, data: bytes) -> dict:
    start = time.perf_counter()
    r = httpx.post(f"{url}/predict", files={"image": ("photo", data, "application/octet-stream")}, timeout=300)
    body = r.json()
    answer = body.get("error") or f"{len(body['faces'])} faces answered, {body['omitted_faces']} omitted"
    return {
        "MB": round(len(data) / 1e6, 2),
        "status": r.status_code,
        "s": round(time.perf_counter() - start, 2),
        "answer": answer[:70],
    }


def table(measure: Callable[[bytes], dict], columns: dict[str, str]) -> dict:
    """Each example measured, printed as a Markdown row as it comes; columns: result key -> its title."""
    print("| request | " + " | ".join(columns.values()) + " |\n|---|" + "---|" * len(columns))
    results = {}
    for name, data in examples().items():
        r = results[name] = measure(data)
        print(f"| {name} | " + " | ".join(str(r[k]) for k in columns) + " |", flush=True)
    return results


def end_to_end(url: str) -> dict:
    return table(lambda data: over_http(url, data), {"MB": "MB", "status": "status", "s": "s", "answer": "answer"})


def in_process() -> dict:
    finder = FaceFinder()
    finder.find(encode(astronaut()))  # sessions loaded
    columns = {"MB": "MB", "cpu_s": "CPU s", "wall_s": "wall s", "peak_mb": "peak memory MB", "answer": "answer"}
    results = table(lambda data: run(finder, data), columns)
    results["at_rest_mb"] = round(status_mb("VmRSS"))
    print(f"\nresident memory after them: {results['at_rest_mb']} MB")
    return results


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bounds", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running service (`bentoml serve`, an image) instead of this process")
    args = p.parse_args()
    results = end_to_end(args.url) if args.url else in_process()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("bounds_http.json" if args.url else "bounds.json")).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
