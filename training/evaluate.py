"""`evaluate`: where does a model err? Metrics overall and by age decade, gender and race, with plots.

Writes into --out: report.json, predictions.csv (one row per image: the raw numbers the report is
computed from) and PNG plots (loss curves of the training run, predicted vs true age, MAE by age
group, gender confusion matrix).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.artifact import preprocess_for
from models.errors import UserError
from models.network import load_network
from training import fingerprint
from training.atomic import atomic_path
from training.data import FaceDataset
from training.utkface import read_metadata

RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others", -1: "unknown"}


def load_model(model: str) -> tuple[torch.nn.Module, dict[str, Any], set[str] | None]:
    """A store tag (`age_gender:TAG`) or a checkpoint file -> (network in eval mode, stored-model metadata,
    hashes of the images it trained on, or None where it was made before they were recorded)."""
    if model.endswith(".ckpt") or Path(model).is_file():
        from training.export import datamodule_for, describe, load_module, train_split_of

        module = load_module(model)
        datamodule = datamodule_for(module)
        train_split = train_split_of(module, datamodule)
        trained = set(train_split[0]) if train_split[1] == "fit" else None
        return module.net.eval(), describe(module, datamodule, Path(model), train_split), trained
    try:
        stored = bentoml.models.get(model)
    except (bentoml.exceptions.NotFound, ValueError):
        raise UserError(f"model {model!r} is not in the BentoML store; `bentoml models list` shows what is") from None
    meta = stored.info.metadata
    recorded = (meta.get("dataset") or {}).get("train_split")
    trained = fingerprint.read(Path(stored.path) / fingerprint.FILE, recorded) if recorded else None
    return load_network(stored.path, meta), meta, trained


def predict(net: torch.nn.Module, meta: dict, frame: pd.DataFrame, batch_size: int, tta: bool):
    """-> ages (N,), p_female (N,). With tta, outputs are averaged with those of the mirrored image."""
    loader = DataLoader(FaceDataset(frame, preprocess_for(meta)), batch_size=batch_size, num_workers=2)
    ages, probs = [], []
    with torch.inference_mode():
        for x, _, _ in tqdm(loader, desc="evaluate", unit="batch"):
            age, logits = net(x)
            p = logits.softmax(1)
            if tta:
                age_f, logits_f = net(x.flip(-1))  # (B, 3, H, W) mirrored left-right
                age, p = (age + age_f) / 2, (p + logits_f.softmax(1)) / 2
            ages.append(age)
            probs.append(p[:, 1])
    return torch.cat(ages).numpy(), torch.cat(probs).numpy()


def metrics(frame: pd.DataFrame) -> dict[str, float]:
    err = frame.pred_age - frame.age
    return {
        "n": int(len(frame)),
        "age_mae": float(err.abs().mean()),
        "age_rmse": float(np.sqrt((err**2).mean())),
        "age_mse": float((err**2).mean()),
        "cs5": float((err.abs() <= 5).mean()),  # cumulative score: share within 5 years
        "gender_acc": float((frame.pred_gender == frame.gender).mean()),
    }


def age_group(age: int) -> str:
    return "80+" if age >= 80 else f"{age // 10 * 10}-{age // 10 * 10 + 9}"


def build_report(frame: pd.DataFrame) -> dict[str, Any]:
    groups = {
        "age_group": frame.age.map(age_group),
        "gender": frame.gender.map({0: "male", 1: "female"}),
        "race": frame.race.map(RACES),
    }
    report = {"overall": metrics(frame)}
    for name, keys in groups.items():
        report[f"by_{name}"] = {str(k): metrics(g) for k, g in frame.groupby(keys, sort=True)}
    return report


def evaluate(
    model: str, metadata: Path, out: Path, split: str = "test", tta: bool = False, batch_size: int = 64
) -> dict[str, Any]:
    from training import plots

    frame = read_metadata(metadata)
    frame = frame[frame.split == split].reset_index(drop=True)
    if frame.empty:
        raise UserError(f"{metadata} has no rows in split {split!r}; evaluate needs held-out images")
    net, meta, trained = load_model(model)
    what = f"split {split!r} of {metadata}"
    if trained is None:
        fingerprint.warn(f"{model} does not record the images it was trained on; cannot check that {what} is held out")
    else:
        trained_on = meta["dataset"]["metadata"]
        fix = f"evaluate with the metadata file it was trained with ({trained_on}) or on images it never saw"
        fingerprint.check_held_out(trained, frame.path.tolist(), what, model, fix)
    frame["pred_age"], frame["p_female"] = predict(net, meta, frame, batch_size, tta)
    frame["pred_gender"] = (frame.p_female > 0.5).astype(int)
    report = {"model": model, "metadata": str(metadata), "split": split, "tta": tta, **build_report(frame)}

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "predictions.csv") as tmp:
        frame[["path", "age", "gender", "race", "pred_age", "p_female", "pred_gender"]].to_csv(tmp, index=False)
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    run_dir = Path(meta["checkpoint"]).parent.parent if meta.get("checkpoint") else None
    plots.write_all(frame, report, run_dir, out)
    return report
