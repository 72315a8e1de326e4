"""`fit`: train AgeGenderModule from a config; TensorBoard logs and the best checkpoint (on val/loss)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from models.presets import IMAGE_SIZE
from training import fingerprint
from training.data import UTKFaceDataModule
from training.module import AgeGenderModule
from training.resume import AtomicCheckpointIO, StopOnSignal, check_same_config, run_to_resume


def build(cfg: dict) -> tuple[AgeGenderModule, UTKFaceDataModule]:
    model_args = dict(cfg["model"])
    datamodule = UTKFaceDataModule(**cfg["data"], image_size=model_args.get("image_size", IMAGE_SIZE), seed=cfg["seed"])
    if model_args.get("normalize_age"):
        # the normalisation statistics belong to the training split; stored in hparams and weights
        model_args["age_mean"], model_args["age_std"] = datamodule.age_stats()
    module = AgeGenderModule(**model_args)
    module.training_config = cfg
    # which images it trains on, recorded in its checkpoints: `export` stores it, `evaluate` checks against it
    module.train_split = fingerprint.image_hashes(datamodule.split(*datamodule.train_splits).path)
    return module, datamodule


def fit(cfg: dict, callbacks: list[L.Callback] = (), resume: bool = False) -> Path | None:
    """Train; return the path of the checkpoint with the lowest validation loss (or the last one). In a
    multi-process run (trainer.strategy=ddp), only the process of global rank 0 returns it, the others None:
    one process goes on to export. resume: continue the latest run of this config's logdir/name from its
    last.ckpt (training/resume.py), which must have been trained with the same config."""
    version, last = run_to_resume(cfg["logdir"], cfg["name"]) if resume else (None, None)
    if last is not None:
        check_same_config(last, cfg)
    L.seed_everything(cfg["seed"], workers=True)
    module, datamodule = build(cfg)
    monitor = module.hparams.monitor
    logger = TensorBoardLogger(cfg["logdir"], name=cfg["name"], version=version)
    checkpoint = ModelCheckpoint(filename="best", monitor=monitor, mode="min", save_last=True)
    all_callbacks = [checkpoint, LearningRateMonitor("epoch"), StopOnSignal(), *callbacks]
    if cfg["early_stopping_patience"]:
        all_callbacks.append(EarlyStopping(monitor, patience=cfg["early_stopping_patience"], mode="min"))
    trainer = L.Trainer(logger=logger, callbacks=all_callbacks, plugins=[AtomicCheckpointIO()], **cfg["trainer"])
    trainer.fit(module, datamodule, ckpt_path=last)
    if not trainer.is_global_zero:
        return None
    return Path(checkpoint.best_model_path or checkpoint.last_model_path)
