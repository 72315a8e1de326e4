"""Tuning (resumable, several workers), production retraining and the evaluation report, on sample data."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from training.config import load_config
from training.scoring import RACES, age_group

from .conftest import assert_one_line_error, run_cli

SPACE = {
    "model.lr": {"low": 1.0e-3, "high": 3.0e-3, "log": True},
    "model.age_weight": {"low": 0.5, "high": 2.0},
    "model.head_width": {"choices": [32, 64]},
}


@pytest.fixture(scope="module")
def tune_files(tiny_config: dict, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tune")
    # few batches per epoch: these tests are about the study mechanics, not about what is learnt
    cfg = {**tiny_config, "trainer": {**tiny_config["trainer"], "max_epochs": 2, "limit_train_batches": 6}}
    (root / "base.yaml").write_text(yaml.safe_dump(cfg))
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return {"root": root, "base": root / "base.yaml", "space": root / "space.yaml"}


def tune(files: dict, study: str, *extra: str):
    root = files["root"]
    args = ["--config", str(files["base"]), "--space", str(files["space"]), "--study", study]
    args += ["--storage", f"sqlite:///{root / study}.db", "--logdir", str(root / "runs")]
    return run_cli("tune", *args, "--out", str(root / f"{study}.yaml"), *extra)


def finished_trials(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT number, state FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchall()


def test_study_resumes_and_writes_best_config(tune_files: dict) -> None:
    first = tune(tune_files, "resume", "--n-trials", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(finished_trials(tune_files["root"] / "resume.db")) == 2
    second = tune(tune_files, "resume", "--n-trials", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(finished_trials(tune_files["root"] / "resume.db")) == 3
    assert "importance" in second.stdout and "best trial" in second.stdout
    runs = tune_files["root"] / "runs" / "resume"
    assert sorted(p.name for p in runs.iterdir()) == ["trial_0", "trial_1", "trial_2"]
    assert all(list(p.rglob("events.out.tfevents.*")) for p in runs.iterdir())
    best = load_config(tune_files["root"] / "resume.yaml")  # loads as a valid training config
    assert 1 <= best["trainer"]["max_epochs"] <= 2
    assert best["model"]["head_width"] in (32, 64) and 1e-3 <= best["model"]["lr"] <= 3e-3


def test_two_worker_processes_share_one_study(tune_files: dict) -> None:
    result = tune(tune_files, "workers", "--n-trials", "2", "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    with sqlite3.connect(tune_files["root"] / "workers.db") as con:
        pids = con.execute("SELECT DISTINCT value_json FROM trial_user_attributes WHERE key = 'pid'").fetchall()
    assert len(finished_trials(tune_files["root"] / "workers.db")) >= 2
    assert len(pids) == 2, "both workers should have run a trial"


def test_tune_bad_input(tune_files: dict) -> None:
    bad = run_cli(
        "tune",
        "--config",
        str(tune_files["base"]),
        "--space",
        str(tune_files["space"]),
        "--storage",
        "nosuchdb://x/y",
        "--logdir",
        str(tune_files["root"] / "bad"),
    )
    assert "cannot open Optuna storage" in assert_one_line_error(bad)
    empty = tune(tune_files, "empty", "--n-trials", "0")
    assert "has no complete trial" in assert_one_line_error(empty)


@pytest.fixture(scope="module")
def production_model(tune_files: dict) -> tuple[str, Path]:
    config = tune_files["root"] / "resume.yaml"
    if not config.exists():
        pytest.fail("needs the tuned config of test_study_resumes_and_writes_best_config")
    home = tune_files["root"] / "store"
    result = run_cli("production", "--config", str(config), BENTOML_HOME=str(home))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("saved model ")[1].split()[0], home


def test_production_trains_on_train_and_val(production_model: tuple[str, Path]) -> None:
    tag, home = production_model
    name, version = tag.split(":")
    meta = yaml.safe_load((home / "models" / name / version / "model.yaml").read_text())["metadata"]
    assert meta["dataset"]["train_splits"] == ["train", "val"]
    assert set(meta["metrics"]) == {"test"}  # validation data was trained on: only test is held out


def test_evaluate_report_and_plots(production_model: tuple[str, Path], metadata_file: Path, tmp_path: Path) -> None:
    tag, home = production_model
    out = tmp_path / "report"
    result = run_cli(
        "evaluate", "--model", tag, "--metadata", str(metadata_file), "--out", str(out), "--tta", BENTOML_HOME=str(home)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    preds = pd.read_csv(out / "predictions.csv")

    # recompute every headline number from the raw predictions
    err = preds.pred_age - preds.age
    overall = report["overall"]
    assert overall["n"] == len(preds) == (pd.read_csv(metadata_file).split == "test").sum()
    assert overall["age_mae"] == pytest.approx(err.abs().mean())
    assert overall["age_mse"] == pytest.approx((err**2).mean())
    assert overall["age_rmse"] == pytest.approx(np.sqrt((err**2).mean()))
    assert overall["cs5"] == pytest.approx((err.abs() <= 5).mean())
    assert overall["gender_acc"] == pytest.approx((preds.pred_gender == preds.gender).mean())
    assert ((preds.age >= preds.age_low) & (preds.age <= preds.age_high)).mean() == overall["interval_coverage"]
    # the breakdowns cover every image once
    for key in ("by_age_group", "by_gender", "by_race"):
        assert sum(g["n"] for g in report[key].values()) == overall["n"], key
    group = preds.age.map(age_group)
    for name, g in report["by_age_group"].items():
        assert g["age_mae"] == pytest.approx(err[group == name].abs().mean())
    assert set(report["by_race"]) <= set(RACES.values())

    for png in ("loss_curves", "age_scatter", "mae_by_age", "fairness", "gender_reliability", "gender_confusion"):
        with Image.open(out / f"{png}.png") as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 300, png


def test_evaluate_bad_input(metadata_file: Path, tmp_path: Path) -> None:
    missing = run_cli(
        "evaluate",
        "--model",
        "age_gender:nosuchversion",
        "--metadata",
        str(metadata_file),
        "--out",
        str(tmp_path / "r"),
        BENTOML_HOME=str(tmp_path / "store"),
    )
    assert "not in the BentoML store" in assert_one_line_error(missing)
    no_test = tmp_path / "no_test.csv"
    frame = pd.read_csv(metadata_file)
    frame[frame.split != "test"].assign(path=lambda f: [str(metadata_file.parent / p) for p in f.path]).to_csv(
        no_test, index=False
    )
    result = run_cli("evaluate", "--model", "x.ckpt", "--metadata", str(no_test), "--out", str(tmp_path / "r"))
    assert "no rows in split 'test'" in assert_one_line_error(result)
    assert not (tmp_path / "r").exists()
