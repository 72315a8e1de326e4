"""UTKFace metadata: scan a folder, parse names, drop bad and duplicate images, balance, split.

Name format: `[age]_[gender]_[race]_[yyyymmddHHMMSSfff].jpg`, aligned crops end in `.jpg.chip.jpg`.
The known malformed names in the public archives are handled like this:
- race field missing (`39_1_20170116174525125.jpg.chip.jpg`, two `61_1_...`): kept, race = -1 (unknown);
  age and gender, which we train on, are intact.
- a space before the extension (`24_0_1_20170116220224657 .jpg.chip.jpg`): kept, the space is ignored.
- no dot before `jpg` (`55_0_0_20170116232725357jpg.chip.jpg`): kept, parsed the same.
- a time stamp of 16 or 18 digits (`14_0_0_2017011022340900`, `28_1_2_201701161846515488`,
  `38_0_1_201701162330572788`): kept, the labels are intact.
- an empty field (`53__0_...` in the in-the-wild set): skipped, since it cannot be told whether gender
  or race is missing.
Every skip is counted by reason and reported.

Balancing rule (on by default): for every age in whole years, the more frequent gender is randomly
(seeded) downsampled to the count of the less frequent one, so that both genders have the same age
distribution and gender carries no information about age. Ages present for one gender only are dropped.

Split: per stratum (age decade, 80+ pooled) x gender, rows are shuffled with the seed and cut into
train / val / test by the requested fractions. Duplicates are removed first (by decoded pixels), so the
Kaggle archive's copies of one face in several folders can never land in two splits.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from models.artifact import AGE_RANGE
from models.errors import UserError
from models.images import IMAGE_SUFFIXES, MAX_PIXELS, decode_image
from training.atomic import atomic_path
from training.synth import MARKER

COLUMNS = ["path", "age", "gender", "race", "split", "source"]
SPLITS = ("train", "val", "test")
_SUFFIX = "|".join(suffix[1:] for suffix in IMAGE_SUFFIXES)  # jpg|jpeg|png|...: models.images.IMAGE_FORMATS
_NAME = re.compile(
    rf"^(?P<age>\d+)_(?P<gender>\d+)_(?:(?P<race>\d+)_)?(?P<stamp>\d{{16,18}})\s*\.?(?:{_SUFFIX})(?:\.chip\.jpg)?$"
)


class SkipName(ValueError):
    """A file name that cannot be used; the message is the reason, used for counting."""


@dataclass(frozen=True)
class Label:
    age: int
    gender: int
    race: int  # -1 = unknown


def parse_name(name: str) -> Label:
    if "__" in name:
        raise SkipName("empty label field")
    m = _NAME.match(name)
    if not m:
        raise SkipName("not a UTKFace name")
    age, gender = int(m["age"]), int(m["gender"])
    race = int(m["race"]) if m["race"] is not None else -1
    if not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise SkipName(f"age outside {AGE_RANGE[0]}-{AGE_RANGE[1]}")
    if gender not in (0, 1):
        raise SkipName("gender not 0 or 1")
    if not -1 <= race <= 4:
        raise SkipName("race not 0-4")
    return Label(age, gender, race)


@dataclass
class ScanReport:
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [f"kept {self.kept} images"]
        out += [f"skipped {n}: {reason}" for reason, n in sorted(self.skipped.items())]
        return out


def _pixel_hash(path: Path) -> str:
    """The image's pixels as training and serving decode them (models.images.decode_image), hashed."""
    rgb = decode_image(path.read_bytes(), MAX_PIXELS)  # (H, W, 3) uint8; UserError if unreadable
    return hashlib.sha1(rgb.tobytes() + repr(rgb.shape).encode()).hexdigest()


def scan(data_dir: Path) -> tuple[pd.DataFrame, ScanReport]:
    """All usable, distinct images under data_dir with their labels; the rest counted by reason."""
    if not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} does not exist or is not a folder")
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise UserError(f"no images (*{', *'.join(IMAGE_SUFFIXES)}) under {data_dir}")
    sample_roots = {m.parent for m in data_dir.rglob(MARKER)}
    report, seen, rows = ScanReport(), set(), []
    for path in tqdm(files, desc="scan", unit="img"):
        try:
            label = parse_name(path.name)
        except SkipName as why:
            report.skipped[str(why)] += 1
            continue
        try:
            digest = _pixel_hash(path)
        except (UserError, OSError):  # OSError: the file itself cannot be read
            report.skipped["unreadable or corrupt image"] += 1
            continue
        if digest in seen:
            report.skipped["duplicate image content"] += 1
            continue
        seen.add(digest)
        source = "sample" if any(r == path.parent or r in path.parents for r in sample_roots) else "utkface"
        rows.append((path, label.age, label.gender, label.race, source))
    report.kept = len(rows)
    if not rows:
        raise UserError(f"no usable UTKFace images under {data_dir} ({'; '.join(report.lines()[1:])})")
    return pd.DataFrame(rows, columns=["path", "age", "gender", "race", "source"]), report


def balance_genders(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    keep = []
    for _, group in df.groupby("age", sort=True):
        by_gender = [group[group.gender == g] for g in (0, 1)]
        n = min(len(g) for g in by_gender)
        for g in by_gender:
            keep.extend(g.index[np.sort(rng.choice(len(g), size=n, replace=False))])
    return df.loc[sorted(keep)].reset_index(drop=True)


def assign_splits(df: pd.DataFrame, fractions: tuple[float, float, float], seed: int) -> pd.Series:
    rng = np.random.default_rng(seed)
    split = pd.Series("", index=df.index)
    stratum = df.age.clip(upper=80) // 10 * 2 + df.gender
    for _, idx in df.groupby(stratum, sort=True).groups.items():
        idx = np.asarray(sorted(idx))
        idx = idx[rng.permutation(len(idx))]
        cut1 = int(round(fractions[0] * len(idx)))
        cut2 = cut1 + int(round(fractions[1] * len(idx)))
        split[idx[:cut1]], split[idx[cut1:cut2]], split[idx[cut2:]] = SPLITS
    return split


def build_metadata(
    data_dir: str | Path,
    out: str | Path,
    balance: bool = True,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 42,
) -> tuple[pd.DataFrame, ScanReport]:
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    out = Path(out)
    df, report = scan(Path(data_dir))
    if balance:
        before = len(df)
        df = balance_genders(df, seed)
        report.skipped["dropped by gender balancing"] = before - len(df)
        if df.empty:
            raise UserError(
                "gender balancing left no images: every age has images of one gender only (try --no-balance)"
            )
    df = df.sort_values("path", kind="stable").reset_index(drop=True)
    df["split"] = assign_splits(df, fractions, seed)
    # paths relative to the metadata file, so the pair can be moved together
    df["path"] = [Path(os.path.relpath(Path(p).resolve(), out.parent.resolve())).as_posix() for p in df.path]
    with atomic_path(out) as tmp:
        df[COLUMNS].to_csv(tmp, index=False)
    return df[COLUMNS], report


def read_metadata(path: str | Path) -> pd.DataFrame:
    """The metadata CSV with `path` made absolute again."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metadata file {path} does not exist; create it with `python -m training metadata`")
    df = pd.read_csv(path)
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise UserError(f"{path} is not a metadata file: missing columns {', '.join(sorted(missing))}")
    df["path"] = [str((path.parent / p).resolve()) for p in df.path]
    return df
