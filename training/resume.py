"""Runs that survive interruption: atomic checkpoints, a checkpoint on SIGTERM / SIGINT, and finding the
checkpoint that `fit --resume` continues from.

A run's folder is <logdir>/<name>/version_N; its checkpoints/last.ckpt is where it stands: written at the
end of every epoch by Lightning's ModelCheckpoint and, when the run is told to stop, after the training
step in progress. Together with training/data.py's order and step seeds (from the seed, the epoch and the
step, never from the process's history) and Lightning's own state (weights, optimizer, LR schedule,
early stopping, best checkpoint, epoch and step counters), a resumed run trains as the uninterrupted one.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from models.errors import Interrupted, UserError
from training.atomic import atomic_path
from training.config import changed_keys, flatten

LAST = "last.ckpt"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what Kubernetes, spot reclaims, batch systems and Ctrl-C send


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed: a kill mid-write leaves the previous one whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class StopOnSignal(L.Callback):
    """SIGTERM and SIGINT let the training step in progress finish, write last.ckpt there, and end the run
    with Interrupted (exit code 128 + the signal's number). A signal during validation takes effect at the
    next training step; one after the last epoch stops the run before anything else starts (export)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handler(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.received is not None:
            trainer.save_checkpoint(self._last(trainer))
            self._stop(trainer, "after step")

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.received is not None:
            self._stop(trainer, "at the end of step")

    @staticmethod
    def _last(trainer: L.Trainer) -> Path:
        return Path(trainer.checkpoint_callback.dirpath) / LAST

    def _stop(self, trainer: L.Trainer, where: str) -> None:
        raise Interrupted(
            f"stopped by {self.received.name} {where} {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"{self._last(trainer)} holds it: run the same command with --resume to continue",
            128 + self.received.value,
        )


def run_to_resume(logdir: str | Path, name: str) -> tuple[int | None, Path | None]:
    """The latest version_N of <logdir>/<name> with a last.ckpt: (N, that checkpoint), or (None, None) where
    there is none: a new run starts, so that one command serves a job's first start and its restarts.
    Temporary files a kill left behind mid-write are removed."""
    folder = Path(logdir) / name
    versions = sorted(
        (int(m.group(1)), p) for p in folder.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))
    )
    for number, path in reversed(versions):
        checkpoints = path / "checkpoints"
        if (checkpoints / LAST).is_file():
            for stale in checkpoints.glob(".*.tmp"):
                stale.unlink()
            return number, checkpoints / LAST
    print(f"nothing to resume (no version_*/checkpoints/{LAST} under {folder}): starting a new run")
    return None, None


def check_same_config(checkpoint: Path, cfg: dict) -> None:
    """UserError naming what differs between the config a checkpoint was trained with and cfg."""
    # mmap: only the pickled dicts are read here; the weights stay on disk until Lightning loads them to resume
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("training_config") or {}
    old, new = flatten(stored), flatten(cfg)
    shown = lambda config, k: repr(config[k]) if k in config else "<unset>"  # noqa: E731
    changed = [f"{k}: {shown(old, k)} -> {shown(new, k)}" for k in changed_keys(old, new)]
    if changed:
        raise UserError(
            f"{checkpoint} was trained with another config ({'; '.join(changed)}); resume with the same "
            "config, or start a new run without --resume"
        )
