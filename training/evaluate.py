"""`evaluate`: where does a model err? Metrics overall and by age decade, gender and race, with plots.

The answers are the served ones (models/outputs.py: expected age, interval, P(minor), calibrated gender).
Writes into --out: report.json, predictions.csv (one row per image: the numbers the report is computed
from) and PNG plots (loss curves of the training run, predicted vs true age, MAE by age group, MAE by age
group per gender and per race, the gender reliability diagram, gender confusion matrix). `export` scores
the held-out splits it stores in the model's metadata with the same functions (training/scoring.py). With the INT8 graph
(`--runtime onnx-int8`, or `auto` where the service would run it) the fp32 graph is scored too and the
report holds the difference (`int8_cost`) next to the one measured at export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.artifact import INTERVAL_LEVEL, stored_model
from models.errors import UserError
from models.pipeline import Estimator
from training import fingerprint, plots
from training.atomic import atomic_path
from training.checkpoint import load_model
from training.scoring import build_report, differences, metrics, predict, with_answers
from training.utkface import read_metadata


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
    frame = read_metadata(metadata)
    frame = frame[frame.split == split].reset_index(drop=True)
    if frame.empty:
        raise UserError(f"{metadata} has no rows in split {split!r}; evaluate needs held-out images")
    estimator, meta, trained = load_model(model, runtime)
    what = f"split {split!r} of {metadata}"
    if trained is None:
        fingerprint.warn(f"{model} does not record the images it was trained on; cannot check that {what} is held out")
    else:
        trained_on = meta.dataset.metadata
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
        "age_head": meta.age_head,
        "calibration": meta.calibration.model_dump(exclude_none=True) if meta.calibration.split else {},
        "int8_cost_at_export": (meta.int8.cost or None) if meta.int8 else None,
        **build_report(frame, meta.gender_classes),
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
    run_dir = Path(meta.checkpoint).parent.parent if meta.checkpoint else None
    plots.write_all(frame, report, meta.gender_classes, run_dir, out)
    return report
