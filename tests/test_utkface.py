"""Metadata: name parsing, duplicates across folders, corrupt files, balancing, splits, CLI errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from models.errors import UserError
from training.utkface import Label, SkipName, assign_splits, balance_genders, build_metadata, parse_name, read_metadata

from .conftest import assert_one_line_error, run_cli


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("26_0_2_20170116174525125.jpg.chip.jpg", Label(26, 0, 2)),
        ("1_1_4_20161221193016140.jpg", Label(1, 1, 4)),
        # the known malformed names of the public archives
        ("39_1_20170116174525125.jpg.chip.jpg", Label(39, 1, -1)),
        ("61_1_20170109150557335.jpg.chip.jpg", Label(61, 1, -1)),
        ("61_1_20170109142408075.jpg.chip.jpg", Label(61, 1, -1)),
        ("24_0_1_20170116220224657 .jpg.chip.jpg", Label(24, 0, 1)),
        ("55_0_0_20170116232725357jpg.chip.jpg", Label(55, 0, 0)),
        ("14_0_0_2017011022340900.jpg.chip.jpg", Label(14, 0, 0)),  # a 16-digit time stamp
        ("28_1_2_201701161846515488.jpg.chip.jpg", Label(28, 1, 2)),  # an 18-digit one
    ],
)
def test_parse_name_accepts(name: str, label: Label) -> None:
    assert parse_name(name) == label


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("53__0_20170116184028385.jpg", "empty label field"),
        ("117_0_0_20170116174525125.jpg", "age outside 0-116"),
        ("30_2_0_20170116174525125.jpg", "gender not 0 or 1"),
        ("30_1_7_20170116174525125.jpg", "race not 0-4"),
        ("holiday.jpg", "not a UTKFace name"),
        ("30_1_0_2017.jpg", "not a UTKFace name"),
    ],
)
def test_parse_name_rejects(name: str, reason: str) -> None:
    with pytest.raises(SkipName, match=reason):
        parse_name(name)


def _face(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)


def test_scan_dedupes_across_folders_and_drops_corrupt(tmp_path: Path) -> None:
    # the Kaggle layout: the same faces in two folders, plus one truncated file and one bad name
    a, b = tmp_path / "UTKFace", tmp_path / "crop_part1"
    a.mkdir()
    for i in range(20):
        _face(a / f"{20 + i}_{i % 2}_0_201701161745251{i:02d}.png", i)
    shutil.copytree(a, b)
    (b / "30_0_0_20170116174525199.png").write_bytes((a / "20_0_0_20170116174525100.png").read_bytes()[:200])
    _face(b / "53__0_20170116184028385.png", 99)
    df, report = build_metadata(tmp_path, tmp_path / "meta.csv", balance=False)
    assert len(df) == 20
    assert report.skipped == {"duplicate image content": 20, "unreadable or corrupt image": 1, "empty label field": 1}
    # every face once, so no face can be in two splits
    names = [Path(p).name for p in df.path]
    assert len(set(names)) == 20


def test_balance_equalises_genders_per_age() -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"age": rng.integers(1, 30, 2000), "gender": (rng.random(2000) < 0.7).astype(int)})
    df.loc[df.age == 29, "gender"] = 1  # an age with one gender only is dropped
    out = balance_genders(df, seed=0)
    counts = out.groupby(["age", "gender"]).size().unstack(fill_value=0)
    assert (counts[0] == counts[1]).all()
    assert 29 not in counts.index
    # exactly min(male, female) of each gender per age is kept
    expected = df.groupby(["age", "gender"]).size().unstack(fill_value=0).min(axis=1)
    assert counts[0].sum() == expected.sum()


def test_splits_are_deterministic_stratified_and_disjoint(
    metadata_file: Path, sample_dir: Path, tmp_path: Path
) -> None:
    first = read_metadata(metadata_file)
    again, _ = build_metadata(sample_dir, tmp_path / "again.csv")
    assert list(read_metadata(tmp_path / "again.csv").split) == list(first.split)
    assert set(first.split) == {"train", "val", "test"}
    fractions = first.split.value_counts(normalize=True)
    assert fractions["train"] == pytest.approx(0.8, abs=0.03)
    assert first.path.is_unique
    # stratified: every gender appears in every split
    assert (first.groupby("split").gender.nunique() == 2).all()
    other = assign_splits(first, (0.8, 0.1, 0.1), seed=7)
    assert list(other) != list(first.split)


def test_metadata_cli_reports_and_writes(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    result = run_cli("metadata", "--data-dir", str(sample_dir), "--out", str(out), "--no-balance")
    assert result.returncode == 0, result.stderr
    assert "kept 900 images" in result.stdout
    df = pd.read_csv(out)
    assert list(df.columns) == ["path", "age", "gender", "race", "split", "source"]
    assert set(df.source) == {"sample"}


@pytest.mark.parametrize("case", ["missing", "empty", "malformed"])
def test_metadata_cli_bad_input(case: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "malformed":
        _face(data / "holiday.png", 0)
        _face(data / "53__0_20170116184028385.png", 1)
    out = tmp_path / "meta.csv"
    result = run_cli("metadata", "--data-dir", str(data), "--out", str(out))
    assert result.returncode == 2
    error = assert_one_line_error(result)
    assert {"missing": "does not exist", "empty": "no images", "malformed": "not a UTKFace name"}[case] in error
    assert not out.exists() and list(tmp_path.glob(".meta.csv*")) == []


def test_read_metadata_rejects_other_csv(tmp_path: Path) -> None:
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="missing columns"):
        read_metadata(bad)
