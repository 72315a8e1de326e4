"""Real faces through the path users call, next to the peer a user could install instead.

    python -m benchmarks.utkface --data-dir DIR                  # in this process, the store's age_gender:latest
    python -m benchmarks.utkface --data-dir DIR --url URL        # a running service (`bentoml serve`, an image)

The photos: each test-split chip padded by PAD pixels of its own edge pixels (`np.pad(mode="edge")`), a
photo in which the face is exactly where the chip has it. Measured, on the same photos in one run:
1. Framing: the similarity transform from chip to the crop the service cuts (models.faces.alignment):
   identity (scale 1, no shift) means the service frames faces as the model was trained on them.
2. Ours: `/predict` on the photos (detection, alignment, network) and `/predict_faces` on the chips (the
   network alone); age MAE, gender accuracy, faces found, CPU ms per photo (in process).
3. The peer (benchmarks/peer.py) on the same photos: the same numbers.
A photo's answer is the face nearest its centre; MAE and accuracy are over the photos where a face was
found, and again over those where both found one. Results: benchmarks/results/utkface.json + a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pandas as pd
from tqdm import tqdm

from models.artifact import MODEL_NAME, stored_meta, stored_model
from models.errors import UserError
from models.faces import CROP_SIZE, FaceDetector, alignment
from models.predictor import Predictor
from training import fingerprint
from training.utkface import build_metadata, read_metadata

from . import peer

RESULTS = Path(__file__).resolve().parent / "results"
PAD = 100  # pixels of edge around each 200x200 chip: a 400x400 photo
CHUNK = 32  # photos per call of the in-process pipeline, crops per /predict_faces request


def faces_to_measure(args: argparse.Namespace, tag: str) -> pd.DataFrame:
    """The test split of --metadata, or of --data-dir scanned as `python -m training metadata` does; refused
    where any of its images is one the model `tag` (when in the local store) was trained on."""
    if args.data_dir:
        args.metadata = Path(tempfile.mkdtemp()) / "metadata.csv"
        build_metadata(args.data_dir, args.metadata, balance=args.balance)
    frame = read_metadata(args.metadata)
    frame = frame[frame.split == "test"]
    if args.limit and args.limit < len(frame):
        frame = frame.sample(args.limit, random_state=0)
    try:
        model = stored_model(tag)
    except UserError:
        print(f"{tag} is not in the local store: cannot check that the test split was not trained on")
        return frame.reset_index(drop=True)
    recorded = stored_meta(model).dataset.train_split
    if recorded:
        trained = fingerprint.read(Path(model.path) / fingerprint.FILE, recorded)
        fingerprint.check_held_out(
            trained, frame.path.tolist(), "the benchmark's test split", tag, "pass the model's own --metadata"
        )
    return frame.reset_index(drop=True)


def padded(path: str) -> np.ndarray:
    chip = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    return np.pad(chip, ((PAD, PAD), (PAD, PAD), (0, 0)), mode="edge")


def central(faces: list[dict], size: tuple[int, int]) -> dict | None:
    """The face whose box centre is nearest the photo's centre; boxes as {x, y, width, height}."""

    def distance(face: dict) -> float:
        box = face["box"]
        return np.hypot(box["x"] + box["width"] / 2 - size[0] / 2, box["y"] + box["height"] / 2 - size[1] / 2)

    return min(faces, key=distance, default=None)


def framing(frame: pd.DataFrame) -> dict:
    """Quartiles of scale, rotation and centre shift (pixels of the 200x200 crop) of the transform from a
    chip to the crop the service cuts from its padded photo."""
    scales, shifts, angles = [], [], []
    centre = np.array([CROP_SIZE / 2, CROP_SIZE / 2])
    detector = FaceDetector()  # the service's defaults
    for path in tqdm(frame.path, desc="framing", unit="photo"):
        faces = detector.detect(padded(path))
        if not faces:
            continue
        face = min(faces, key=lambda f: np.hypot(*(np.add(f.box[:2], np.divide(f.box[2:], 2)) - PAD - centre)))
        m = alignment(face)  # photo -> crop; chip point p is photo point p + PAD
        a, t = m[:, :2], m[:, :2] @ [PAD, PAD] + m[:, 2]
        scales.append(float(np.hypot(*a[:, 0])))
        angles.append(float(np.degrees(np.arctan2(a[1, 0], a[0, 0]))))
        shifts.append(float(np.hypot(*(a @ centre + t - centre))))
    q = lambda v: [round(float(np.percentile(v, p)), 4) for p in (25, 50, 75)]  # noqa: E731
    return {"n": len(scales), "scale_iqr": q(scales), "shift_px_iqr": q(shifts), "rotation_deg_iqr": q(angles)}


def ours_in_process(predictor: Predictor, frame: pd.DataFrame, photos: list[Path]) -> tuple[list, list, float]:
    """(central face per photo or None, answer per chip, CPU ms per photo for /predict)."""
    faces, cpu = [], 0.0
    for i in tqdm(range(0, len(photos), CHUNK), desc="/predict (in process)", unit="chunk"):
        images = [p.read_bytes() for p in photos[i : i + CHUNK]]
        start = time.process_time()
        results = predictor.predict_many(images)
        cpu += time.process_time() - start
        faces += [central([f.model_dump() for f in r.faces], (r.width, r.height)) for r in results]
    chips = []
    for i in range(0, len(frame), CHUNK):
        crops = [Path(p).read_bytes() for p in frame.path[i : i + CHUNK]]
        chips += [a.model_dump() for a in predictor.predict_faces(crops)]
    return faces, chips, 1000 * cpu / len(photos)


def ours_over_http(url: str, frame: pd.DataFrame, photos: list[Path], clients: int = 4) -> tuple[list, list, float]:
    """The same through a running service; the time is wall ms per photo at `clients` requests in flight."""
    with httpx.Client(base_url=url, timeout=120) as client:

        def predict(path: Path) -> dict | None:
            r = client.post("/predict", files={"image": (path.name, path.read_bytes(), "image/png")})
            r.raise_for_status()
            body = r.json()
            return central(body["faces"], (body["width"], body["height"]))

        def predict_faces(paths: list[str]) -> list[dict]:
            files = [("images", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in paths]
            r = client.post("/predict_faces", files=files)
            r.raise_for_status()
            return r.json()["predictions"]

        with ThreadPoolExecutor(clients) as pool:
            start = time.perf_counter()
            faces = list(tqdm(pool.map(predict, photos), total=len(photos), desc="/predict", unit="photo"))
            wall = time.perf_counter() - start
            groups = [frame.path[i : i + CHUNK].tolist() for i in range(0, len(frame), CHUNK)]
            chips = [a for group in pool.map(predict_faces, groups) for a in group]
    return faces, chips, 1000 * wall / len(photos)


def score(frame: pd.DataFrame, answers: list[dict | None], among: np.ndarray | None = None) -> dict:
    """Age MAE and gender accuracy over the photos with an answer (and in `among`, if given)."""
    found = np.array([a is not None for a in answers])
    keep = found if among is None else found & among
    ages = np.array([a["age"] if a else np.nan for a in answers], float)
    genders = np.array([("male", "female").index(a["gender"]) if a else -1 for a in answers])
    err = np.abs(ages - frame.age.to_numpy())[keep]
    return {
        "found": float(found.mean()),
        "n": int(keep.sum()),
        "age_mae": float(err.mean()),
        "age_mse": float((err**2).mean()),
        "gender_acc": float((genders == frame.gender.to_numpy())[keep].mean()),
    }


def peer_answers(photos: list[Path]) -> tuple[list[dict | None], float]:
    rows = peer.answers(photos)
    out = []
    for row in rows:
        faces = [
            {"age": f["age"], "gender": f["gender"], "box": {"x": l, "y": t, "width": r - l, "height": b - t}}
            for f in row["faces"]
            for l, t, r, b in [f["box"]]  # noqa: E741
        ]
        out.append(central(faces, (CROP_SIZE + 2 * PAD,) * 2))
    return out, float(np.mean([r["cpu_ms"] for r in rows]))


def table(result: dict) -> str:
    f = result["framing"]
    lines = [
        f"framing, chip -> served crop over {f['n']} photos (quartiles): scale {f['scale_iqr']}, "
        f"centre shift px {f['shift_px_iqr']}, rotation deg {f['rotation_deg_iqr']}",
        "",
        "| path | photos | faces found | age MAE | age MSE | gender acc | ms per photo |",
        "|---|---|---|---|---|---|---|",
    ]
    ms = result["ms_per_photo"]
    rows = [
        ("ours: /predict on photos", result["predict"], f"{ms['ours']:.1f} ({ms['ours_kind']})"),
        ("ours: /predict_faces on the same faces' chips", result["predict_faces_same_photos"], ""),
    ]
    if "peer" in result:
        rows += [
            ("peer: predict on photos", result["peer"], f"{ms['peer']:.1f} (CPU)"),
            ("ours, photos both found a face in", result["both_found"]["ours"], ""),
            ("peer, photos both found a face in", result["both_found"]["peer"], ""),
        ]
    for name, r, time_ in rows:
        lines.append(
            f"| {name} | {r['n']} | {r['found']:.3f} | {r['age_mae']:.2f} | {r['age_mse']:.1f} | "
            f"{r['gender_acc']:.3f} | {time_} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.utkface", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", type=Path, help="UTKFace chips, split as `python -m training metadata` would")
    where.add_argument("--metadata", type=Path, help="a metadata CSV: its test split")
    p.add_argument("--balance", action="store_true", help="with --data-dir: balance genders (the recipe does not)")
    p.add_argument("--model", default=f"{MODEL_NAME}:latest", help="store tag (in process; a --url serves its own)")
    p.add_argument("--url", default=None, help="a running service instead of this process")
    p.add_argument("--limit", type=int, default=0, help="a seeded random subset of the test split")
    p.add_argument("--framing-limit", type=int, default=500, help="photos for the framing measurement")
    p.add_argument("--no-peer", dest="peer", action="store_false")
    args = p.parse_args()

    tag = httpx.post(f"{args.url}/model_info", timeout=30).json()["tag"] if args.url else args.model
    frame = faces_to_measure(args, tag)
    work = Path(tempfile.mkdtemp(prefix="utkface-photos-"))
    photos = []
    for i, path in enumerate(tqdm(frame.path, desc="photos", unit="photo")):
        photos.append(work / f"{i:05d}.png")
        cv2.imwrite(str(photos[-1]), cv2.cvtColor(padded(path), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    result = {"model": tag, "n": len(frame), "pad": PAD, "where": args.url or "in process"}
    result["framing"] = framing(frame.head(args.framing_limit))
    if args.url:
        ours, chips, ms = ours_over_http(args.url, frame, photos)
    else:
        ours, chips, ms = ours_in_process(Predictor.from_store(tag), frame, photos)
    result["ms_per_photo"] = {"ours": ms, "ours_kind": "wall, 4 in flight" if args.url else "CPU"}
    found_ours = np.array([a is not None for a in ours])
    result["predict"] = score(frame, ours)
    result["predict_faces_same_photos"] = score(frame, chips, among=found_ours)
    if args.peer:
        theirs, result["ms_per_photo"]["peer"] = peer_answers(photos)
        both = found_ours & np.array([a is not None for a in theirs])
        result["peer"] = score(frame, theirs)
        result["both_found"] = {"ours": score(frame, ours, both), "peer": score(frame, theirs, both)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "utkface.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"raw results: {RESULTS / 'utkface.json'}")


if __name__ == "__main__":
    main()
