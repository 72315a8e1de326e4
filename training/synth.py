"""Generated sample data in the UTKFace file-name format, for tests and the demo model.

Each 200x200 image (UTKFace's crop size) carries a learnable signal that survives the training
augmentations (flip, scale jitter, brightness/contrast/saturation jitter):
- age    -> hue of a face-like ellipse (hue is untouched by the colour jitter),
- gender -> stripe orientation across the ellipse (horizontal = male, vertical = female; flip-invariant),
- race   -> background grey level (a nuisance variable), plus pixel noise and position jitter.
"""

from __future__ import annotations

import colorsys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from models.artifact import AGE_RANGE
from models.errors import UserError
from training.atomic import atomic_dir

SIZE = 200
MARKER = "SAMPLE_DATA.txt"  # `metadata` reads this to label the data set as generated sample data
_EPOCH = datetime(2017, 1, 1)


def sample_image(age: int, gender: int, race: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx, cy = SIZE / 2 + rng.uniform(-10, 10, size=2)
    rx, ry = rng.uniform(55, 70), rng.uniform(70, 85)
    inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    face = np.array(colorsys.hsv_to_rgb(0.75 * age / AGE_RANGE[1], 0.8, 0.9), dtype=np.float32) * 255
    stripes = np.sin((yy if gender == 0 else xx) * 2 * np.pi / 32) > 0  # survives resizing to 64 px
    img = np.full((SIZE, SIZE, 3), 40.0 + 35.0 * race, dtype=np.float32)
    img[inside] = face
    img[inside & stripes] *= 0.5
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def sample_labels(n: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    # UTKFace-like skew: many young children and twenty-somethings, a long tail to 100
    ages = np.where(rng.random(n) < 0.15, rng.integers(1, 6, n), np.clip(rng.gamma(6.0, 6.0, n), 6, 100))
    genders, races = rng.integers(0, 2, n), rng.integers(0, 5, n)
    return [(int(a), int(g), int(r)) for a, g, r in zip(ages, genders, races, strict=True)]


def write_sample_dataset(out: str | Path, n: int, seed: int = 0) -> Path:
    out = Path(out)
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if out.exists():
        raise UserError(f"{out} already exists; choose a new --out or delete it first")
    rng = np.random.default_rng(seed)
    with atomic_dir(out) as tmp:
        for i, (age, gender, race) in enumerate(tqdm(sample_labels(n, rng), desc="synth", unit="img")):
            stamp = (_EPOCH + timedelta(seconds=i, milliseconds=i % 1000)).strftime("%Y%m%d%H%M%S%f")[:17]
            sample_image(age, gender, race, rng).save(tmp / f"{age}_{gender}_{race}_{stamp}.jpg.chip.jpg", quality=90)
        (tmp / MARKER).write_text(
            f"Generated sample data (python -m training synth --n {n} --seed {seed}): not faces.\n"
            "Models trained on it are demo models; their predictions on real photos mean nothing.\n"
        )
    return out
