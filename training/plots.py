"""PNG plots for `evaluate`: what people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from training.atomic import atomic_path  # noqa: E402
from training.calibration import reliability  # noqa: E402

TERMS = ("loss_age", "loss_gender", "loss")


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Epoch-level loss curves from a run's TensorBoard logs: {"train/loss": [(epoch, value), ...], ...}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(run_dir)).Reload()
    tags = scalars.Tags()["scalars"]
    curves = {}
    for stage, suffix in (("train", "_epoch"), ("val", "")):
        for term in TERMS:
            tag = f"{stage}/{term}{suffix}"
            if tag in tags:
                curves[f"{stage}/{term}"] = [(i, e.value) for i, e in enumerate(scalars.Scalars(tag))]
    return curves


def loss_curves(curves: dict, path: Path) -> None:
    """Top row training, bottom row validation; one column per loss term, the combined loss last."""
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    for row, stage in enumerate(("train", "val")):
        for col, term in enumerate(TERMS):
            ax = axes[row, col]
            points = curves.get(f"{stage}/{term}", [])
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
            ax.set_title(f"{stage} {term}")
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    _save(fig, path)


def age_scatter(frame: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(frame.age, frame.pred_age, s=6, alpha=0.4)
    top = max(frame.age.max(), frame.pred_age.max()) + 5
    ax.plot([0, top], [0, top], color="black", linewidth=1, label="perfect")
    ax.set(xlabel="true age", ylabel="predicted age", title="predicted vs true age", xlim=(0, top), ylim=(0, top))
    ax.legend()
    _save(fig, path)


def _age_order(names) -> list[str]:
    return sorted(names, key=lambda g: int(g.split("-")[0].rstrip("+")))


def mae_by_age(report: dict, path: Path) -> None:
    groups = report["by_age_group"]
    names = _age_order(groups)
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, [groups[g]["age_mae"] for g in names])
    ax.bar_label(bars, labels=[f"n={groups[g]['n']}" for g in names], fontsize=8)
    ax.set(xlabel="true age group", ylabel="MAE (years)", title="age error by age group")
    _save(fig, path)


def fairness(report: dict, path: Path) -> None:
    """Age MAE by true age group, one line per gender (left) and per race (right): who the model fails."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, name in zip(axes, ("gender", "race"), strict=True):
        for group, by_age in report[f"age_mae_by_age_group_and_{name}"].items():
            names = _age_order(by_age)
            ax.plot(names, [by_age[a] for a in names], marker="o", label=group)
        ax.set(xlabel="true age group", title=f"age MAE by age group and {name}")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("MAE (years)")
    _save(fig, path)


def gender_reliability(frame: pd.DataFrame, report: dict, path: Path) -> None:
    """Accuracy against confidence of the predicted gender, before and after temperature scaling."""
    correct = (frame.pred_gender == frame.gender).to_numpy()
    overall = report["overall"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0.5, 1], [0.5, 1], color="black", linewidth=1, label="perfectly calibrated")
    for column, label, ece in (
        ("gender_probability_uncalibrated", "uncalibrated", overall["gender_ece_uncalibrated"]),
        ("gender_probability", "temperature-scaled", overall["gender_ece"]),
    ):
        points = reliability(frame[column].to_numpy(), correct)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{label} (ECE {ece:.3f})")
    ax.set(xlabel="predicted probability of the predicted gender", ylabel="accuracy", title="gender reliability")
    ax.legend(fontsize=8)
    _save(fig, path)


def gender_confusion(frame: pd.DataFrame, classes: list[str], path: Path) -> None:
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(matrix, (frame.gender.to_numpy(), frame.pred_gender.to_numpy()), 1)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center")
    ticks = list(range(len(classes)))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes, xlabel="predicted", ylabel="true")
    ax.set_title("gender")
    _save(fig, path)


def write_all(frame: pd.DataFrame, report: dict, classes: list[str], run_dir: Path | None, out: Path) -> None:
    if run_dir is not None and run_dir.is_dir():
        loss_curves(read_curves(run_dir), out / "loss_curves.png")
    age_scatter(frame, out / "age_scatter.png")
    mae_by_age(report, out / "mae_by_age.png")
    fairness(report, out / "fairness.png")
    gender_reliability(frame, report, out / "gender_reliability.png")
    gender_confusion(frame, classes, out / "gender_confusion.png")
