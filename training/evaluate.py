"""`evaluate`: where does a model err? Metrics overall and by age decade, gender and race, with plots.

The answers are the served ones (models/outputs.py: expected age, interval, P(minor), calibrated gender).
Writes into --out: report.json, predictions.csv (one row per image: the numbers the report is computed
from) and PNG plots (loss curves of the training run, predicted vs true age, MAE by age group, MAE by age
group per gender and per race, the gender reliability diagram, gender confusion matrix). `export` scores
the held-out splits it stores in the model's metadata with the same functions. With the INT8 graph
(`--runtime onnx-int8`, or `auto` where the service would run it) the fp32 graph is scored too and the
report holds the difference (`int8_cost`) next to the one measured at export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from models.artifact import INTERVAL_LEVEL, MINOR_AGE, stored_model
from models.errors import UserError
from models.outputs import COLUMNS, decode, softmax
from models.pipeline import Estimator, load_crops
from models.runtime import TorchRuntime
from training import calibration, fingerprint
from training.atomic import atomic_path
from training.utkface import read_metadata

RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others", -1: "unknown"}


def load_model(model: str, runtime: str = "auto") -> tuple[Estimator, dict[str, Any], set[str] | None]:
    """A store tag (`age_gender:TAG`) or a checkpoint file -> (the serving pipeline's Estimator for it, with
    `runtime` for a stored model and torch for a checkpoint; its metadata; hashes of the images it trained
    on, or None where it was made before they were recorded)."""
    if model.endswith(".ckpt") or Path(model).is_file():
        from training.export import datamodule_for, describe, load_module, train_split_of

        module = load_module(model)
        datamodule = datamodule_for(module)
        train_split = train_split_of(module, datamodule)
        trained = set(train_split[0]) if train_split[1] == "fit" else None
        meta = describe(module, datamodule, Path(model), train_split)
        return Estimator(TorchRuntime(module.net), meta, why="a checkpoint: its torch weights"), meta, trained
    stored = stored_model(model)
    meta = stored.info.metadata
    recorded = (meta.get("dataset") or {}).get("train_split")
    trained = fingerprint.read(Path(stored.path) / fingerprint.FILE, recorded) if recorded else None
    return Estimator.open(stored.path, meta, runtime), meta, trained


def predict(
    estimator: Estimator, frame: pd.DataFrame, batch_size: int = 64, tta: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The network's raw outputs over the frame's face crops, through the serving pipeline (load_crops,
    preprocessing, runtime): age output, gender logits (N, C). With tta, averaged with the mirrored crops'."""
    ages, logits = [], []
    paths = frame.path.tolist()
    for i in tqdm(range(0, len(paths), batch_size), desc=f"predict {len(paths)} faces", unit="batch"):
        crops = load_crops([Path(p).read_bytes() for p in paths[i : i + batch_size]])
        age, logit = estimator.raw(crops, tta)
        ages.append(age)
        logits.append(logit)
    return np.concatenate(ages), np.concatenate(logits)


def with_answers(frame: pd.DataFrame, age_out: np.ndarray, logits: np.ndarray, meta: dict, level: float):
    """The frame plus the served answers for its images (models/outputs.decode) and the uncalibrated
    probability of the predicted gender."""
    rows = decode(age_out, logits, meta, level)
    out = frame.assign(**{("pred_age" if c == "age" else c): rows[:, i] for i, c in enumerate(COLUMNS)})
    probs = rows[:, len(COLUMNS) :]  # (N, C) calibrated
    out["pred_gender"] = probs.argmax(1)
    out["gender_probability"] = probs.max(1)
    out["gender_probability_uncalibrated"] = softmax(logits.astype(np.float64)).max(1)
    out["interval_level"] = level
    return out


def metrics(frame: pd.DataFrame) -> dict[str, float]:
    err = frame.pred_age - frame.age
    correct = (frame.pred_gender == frame.gender).to_numpy()
    out = {
        "n": int(len(frame)),
        "age_mae": float(err.abs().mean()),
        "age_rmse": float(np.sqrt((err**2).mean())),
        "age_mse": float((err**2).mean()),
        "cs5": float((err.abs() <= 5).mean()),  # cumulative score: share within 5 years
        "gender_acc": float(correct.mean()),
        "gender_ece": calibration.ece(frame.gender_probability.to_numpy(), correct),
        "gender_ece_uncalibrated": calibration.ece(frame.gender_probability_uncalibrated.to_numpy(), correct),
    }
    if frame.age_low.notna().all():  # an old regression model has no interval and no P(minor)
        out["interval_level"] = float(frame.interval_level.iloc[0])
        out["interval_coverage"] = float(((frame.age >= frame.age_low) & (frame.age <= frame.age_high)).mean())
        auc = calibration.roc_auc(frame.minor_probability.to_numpy(), (frame.age < MINOR_AGE).to_numpy())
        if auc is not None:
            out["minor_auc"] = auc
    return out


def differences(base: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    """other minus base for every metric both have that is a result (not a count or a setting)."""
    return {k: float(other[k] - base[k]) for k in other if k in base and k not in ("n", "interval_level")}


def age_group(age: int) -> str:
    return "80+" if age >= 80 else f"{age // 10 * 10}-{age // 10 * 10 + 9}"


def build_report(frame: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    groups = {
        "age_group": frame.age.map(age_group),
        "gender": frame.gender.map(dict(enumerate(classes))),
        "race": frame.race.map(RACES),
    }
    report = {"overall": metrics(frame)}
    for name, keys in groups.items():
        report[f"by_{name}"] = {str(k): metrics(g) for k, g in frame.groupby(keys, sort=True)}
    # the fairness figure's numbers: age error by age group within each gender and each race
    for name in ("gender", "race"):
        error = frame.pred_age.sub(frame.age).abs()
        table = error.groupby([groups[name], groups["age_group"]]).mean()  # (group, age group) -> MAE
        report[f"age_mae_by_age_group_and_{name}"] = {
            str(k): {str(a): float(v) for a, v in table[k].items()} for k in table.index.get_level_values(0).unique()
        }
    return report


def evaluate(
    model: str,
    metadata: Path,
    out: Path,
    split: str = "test",
    tta: bool = False,
    batch_size: int = 64,
    level: float = INTERVAL_LEVEL,
    runtime: str = "auto",
) -> dict[str, Any]:
    from training import plots

    frame = read_metadata(metadata)
    frame = frame[frame.split == split].reset_index(drop=True)
    if frame.empty:
        raise UserError(f"{metadata} has no rows in split {split!r}; evaluate needs held-out images")
    estimator, meta, trained = load_model(model, runtime)
    what = f"split {split!r} of {metadata}"
    if trained is None:
        fingerprint.warn(f"{model} does not record the images it was trained on; cannot check that {what} is held out")
    else:
        trained_on = meta["dataset"]["metadata"]
        fix = f"evaluate with the metadata file it was trained with ({trained_on}) or on images it never saw"
        fingerprint.check_held_out(trained, frame.path.tolist(), what, model, fix)
    images, frame = frame, with_answers(frame, *predict(estimator, frame, batch_size, tta), meta, level)
    report = {
        "model": model,
        "metadata": str(metadata),
        "split": split,
        "tta": tta,
        "runtime": estimator.runtime.name,
        "runtime_reason": estimator.why,
        "age_head": meta.get("age_head", "regression"),
        "calibration": meta.get("calibration", {}),
        "int8_cost_at_export": (meta.get("int8") or {}).get("cost"),
        **build_report(frame, meta["gender_classes"]),
    }
    if estimator.runtime.name == "onnx-int8":  # re-measure its cost here: the fp32 graph on the same images
        fp32_graph = Estimator.open(stored_model(model).path, meta, "onnx")
        fp32 = with_answers(images, *predict(fp32_graph, images, batch_size, tta), meta, level)
        report["int8_cost"] = differences(metrics(fp32), report["overall"])

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "predictions.csv") as tmp:
        frame.drop(columns=["split", "interval_level"], errors="ignore").to_csv(tmp, index=False)
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    run_dir = Path(meta["checkpoint"]).parent.parent if meta.get("checkpoint") else None
    plots.write_all(frame, report, meta["gender_classes"], run_dir, out)
    return report
