"""Scoring a model: its served answers over a frame of face images, and metrics overall and by group.

`evaluate` reports them, `export` stores them in the model's metadata, `quantize` measures INT8's cost with
them: one definition of every number the project publishes. The answers are the served ones
(models/outputs.py: expected age, interval, P(minor), calibrated gender), through the serving pipeline's
crops and preprocessing (models/pipeline.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from models.artifact import MINOR_AGE, ModelMeta
from models.outputs import COLUMNS, decode, softmax
from models.pipeline import Estimator, load_crops
from training import calibration

RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others", -1: "unknown"}


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


def with_answers(frame: pd.DataFrame, age_out: np.ndarray, logits: np.ndarray, meta: ModelMeta, level: float):
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
