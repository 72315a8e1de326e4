"""Data: the metadata CSV as face tensors in memory, wrapped in a LightningDataModule.

Each split is decoded once, by the service's own code (models.pipeline.load_crops, then
ArrayPreset.resize to the model's input size): (N, 3, S, S) uint8, 12 kB a face at 64 px, so the whole
of UTKFace fits in memory at any size the recipes use. Batches are augmented (training/augment.py) and
normalised (models.presets.normalize) after they are drawn, in the training process: an epoch costs the
network's time and nothing more.

Training draws nothing from the process's history: each epoch's order comes from (seed, epoch), and each
training step's random numbers (augmentation, dropout) from (seed, step). With the position in the epoch
kept in checkpoints (state_dict), a run resumed from any checkpoint, even one written mid-epoch
(training/resume.py), trains on what the uninterrupted run would have, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from multiprocessing import get_context
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset
from tqdm import tqdm

from models.errors import UserError
from models.pipeline import load_crops
from models.presets import IMAGE_SIZE, ArrayPreset, normalize
from training.augment import Augment
from training.utkface import SPLITS, read_metadata

DECODE_CHUNK = 256  # images per task of a decoding process: large enough that task overhead is noise
# a decoding process costs seconds of imports before its first image: below this many, decode in-process
POOL_MIN_IMAGES = 2000
STEP_SEEDS = 1_000_003  # a run's step seeds are seed * STEP_SEEDS + step: runs of nearby seeds do not share them


def _decode(task: tuple[list[str], int]) -> np.ndarray:
    paths, size = task
    preset = ArrayPreset(size)
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for k, path in enumerate(paths):
        try:
            out[k] = preset.resize(load_crops([Path(path).read_bytes()])[0])
        except (OSError, UserError) as exc:
            raise UserError(f"cannot read training image {path}: {exc}") from exc
    return out


def decode_faces(paths: Sequence[str], size: int, workers: int = 0, desc: str = "decode") -> torch.Tensor:
    """Image files -> (N, 3, S, S) uint8, decoded, made 200x200 and resized exactly as the service does."""
    paths = list(paths)
    tasks = [(paths[i : i + DECODE_CHUNK], size) for i in range(0, len(paths), DECODE_CHUNK)]
    bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False)
    parts = []
    if workers > 0 and len(paths) >= POOL_MIN_IMAGES:
        with get_context("spawn").Pool(workers) as pool:
            for part in pool.imap(_decode, tasks):
                parts.append(part)
                bar.update(len(part))
    else:
        for task in tasks:
            parts.append(_decode(task))
            bar.update(len(parts[-1]))
    bar.close()
    faces = np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)
    return torch.from_numpy(faces).permute(0, 3, 1, 2).contiguous()


class EpochOrder(Sampler[int]):
    """The training split's order in each epoch, a permutation drawn from (seed, epoch) alone, and how far
    training has gone in it: the epoch of a mid-epoch checkpoint restarts after the samples it had already
    trained on."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.position = (0, 0)  # (epoch, samples trained in it): where a checkpoint written now resumes

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before each epoch
        self.epoch = epoch

    def start(self, epoch: int) -> int:
        """Samples of `epoch` already trained on: those of a checkpoint's epoch when resuming into it, else 0."""
        return self.position[1] if self.position[0] == epoch else 0

    def advance(self, epoch: int, samples: int) -> None:
        """A training step of `epoch` used `samples` more."""
        self.position = (epoch, self.start(epoch) + samples)

    def __len__(self) -> int:
        return self.size  # a full epoch's: Lightning counts the resumed epoch's batches from where it stopped

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order[self.start(self.epoch) :].tolist())


class UTKFaceDataModule(L.LightningDataModule):
    def __init__(
        self,
        metadata: str,
        batch_size: int = 64,
        num_workers: int = 2,
        image_size: int = IMAGE_SIZE,
        train_splits: Sequence[str] = ("train",),
        augment: dict | None = None,
        seed: int = 0,
    ) -> None:
        """num_workers: processes that decode the images once at start-up (0: this process). augment: the
        fields of training.augment.Augment to change from their defaults. seed: of the order and of every
        training step's random numbers."""
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
        unknown = set(train_splits) - set(SPLITS)
        if unknown:
            raise UserError(
                f"unknown split {sorted(unknown)[0]!r} in data.train_splits; choose from {', '.join(SPLITS)}"
            )
        self.save_hyperparameters()
        self.frame = read_metadata(metadata)
        self.train_splits = list(train_splits)
        self.augment = Augment.from_config(augment)
        self._faces: dict[tuple[str, ...], TensorDataset] = {}
        self.order = EpochOrder(len(self.split(*self.train_splits)), seed)

    def split(self, *names: str) -> pd.DataFrame:
        return self.frame[self.frame.split.isin(names)]

    def dataset(self, names: Sequence[str]) -> TensorDataset:
        """(faces (N, 3, S, S) uint8, ages (N,) float, genders (N,) long) of the splits, decoded once."""
        key = tuple(names)
        if key not in self._faces:
            frame = self.split(*names)
            if frame.empty:
                raise UserError(f"the metadata has no rows in split {'+'.join(names)}")
            faces = decode_faces(frame.path, self.hparams.image_size, self.hparams.num_workers, "+".join(names))
            ages = torch.tensor(frame.age.to_numpy(), dtype=torch.float32)
            genders = torch.tensor(frame.gender.to_numpy(), dtype=torch.long)
            self._faces[key] = TensorDataset(faces, ages, genders)
        return self._faces[key]

    def _loader(self, names: Sequence[str], train: bool) -> DataLoader:
        dataset = self.dataset(names)
        batch = self.hparams.batch_size
        sampler = self.order if train else None
        return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=train and len(dataset) > batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_splits, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(["val"], train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(["test"], train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 faces -> augmented (while training) and normalised float32, on the batch's device."""
        faces, ages, genders = batch
        x = faces.float() / 255
        if self.trainer is not None and self.trainer.training:
            step = self.trainer.global_step
            self.order.advance(self.trainer.current_epoch, len(faces))  # once per step, when its batch is used
            torch.manual_seed(self.hparams.seed * STEP_SEEDS + step)  # this step's augmentation and dropout
            x = self.augment(x)
        return normalize(x), ages, genders

    def state_dict(self) -> dict:
        epoch, samples = self.order.position
        return {"epoch": epoch, "samples": samples}

    def load_state_dict(self, state: dict) -> None:
        self.order.position = (state["epoch"], state["samples"])

    def age_stats(self) -> tuple[float, float]:
        ages = self.split(*self.train_splits).age
        return float(ages.mean()), float(max(ages.std(ddof=0), 1.0))
