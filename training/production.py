"""`production`: retrain a chosen config on train + val, evaluate on the untouched test split, export.

Validation data is part of training here, so nothing is validated during the run: the LR scheduler
watches the training loss, training runs for the config's max_epochs (the best epoch count found by
`tune`), and the last checkpoint is the one exported.
"""

from __future__ import annotations

from pathlib import Path

import bentoml

from training.config import load_config
from training.export import export
from training.fit import fit


def production(config: Path, overrides: list[str] = ()) -> bentoml.Tag:
    cfg = load_config(config, overrides)
    cfg["name"] = f"{cfg['name']}_production"
    cfg["early_stopping_patience"] = None
    cfg["data"] = {**cfg["data"], "train_splits": ["train", "val"]}
    cfg["model"] = {**cfg["model"], "monitor": "train/loss_epoch"}
    cfg["trainer"] = {**cfg["trainer"], "limit_val_batches": 0, "num_sanity_val_steps": 0}
    checkpoint = fit(cfg)
    return export(checkpoint.parent / "last.ckpt")
