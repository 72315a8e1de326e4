"""`production`: retrain a chosen config on train + val, evaluate on the untouched test split, export.

Validation data is part of training here, so nothing is validated during the run: the LR scheduler
watches the training loss, training runs for the config's max_epochs (the best epoch count found by
`tune`), and the last checkpoint is the one exported. The gender temperature (and a regression head's
residual quantiles) are then fitted on the test split, the only held-out one: the test ECE and interval
coverage stored with the model are measured on the split they were fitted on, and the model card says so.
"""

from __future__ import annotations

from pathlib import Path

import bentoml

from training.config import load_config
from training.export import export
from training.fit import fit


def production(config: Path, overrides: list[str] = (), resume: bool = False) -> bentoml.Tag | None:
    """-> the exported model's tag; None in the processes other than rank 0 of a multi-process run.
    resume: continue the interrupted production run of this config (training.fit.fit)."""
    cfg = load_config(config, overrides)
    cfg["name"] = f"{cfg['name']}_production"
    cfg["early_stopping_patience"] = None
    cfg["data"] = {**cfg["data"], "train_splits": ["train", "val"]}
    cfg["model"] = {**cfg["model"], "monitor": "train/loss_epoch"}
    cfg["trainer"] = {**cfg["trainer"], "limit_val_batches": 0, "num_sanity_val_steps": 0}
    checkpoint = fit(cfg, resume=resume)
    return None if checkpoint is None else export(checkpoint.parent / "last.ckpt")
