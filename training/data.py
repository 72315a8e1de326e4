"""Data: the metadata CSV as face tensors in memory, wrapped in a LightningDataModule.

Each split is decoded once, by the service's own code (models.pipeline.load_crops, then
ArrayPreset.resize to the model's input size): (N, 3, S, S) uint8, 12 kB a face at 64 px, so the whole
of UTKFace fits in memory at any size the recipes use. Batches are augmented (training/augment.py) and
normalised (models.presets.normalize) after they are drawn, in the training process: an epoch costs the
network's time and nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from multiprocessing import get_context
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from models.errors import UserError
from models.pipeline import load_crops
from models.presets import ArrayPreset, normalize
from training.augment import Augment
from training.utkface import SPLITS, read_metadata

DECODE_CHUNK = 256  # images per task of a decoding process: large enough that task overhead is noise
# a decoding process costs seconds of imports before its first image: below this many, decode in-process
POOL_MIN_IMAGES = 2000


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


class UTKFaceDataModule(L.LightningDataModule):
    def __init__(
        self,
        metadata: str,
        batch_size: int = 64,
        num_workers: int = 2,
        image_size: int = 224,
        train_splits: Sequence[str] = ("train",),
        augment: dict | None = None,
    ) -> None:
        """num_workers: processes that decode the images once at start-up (0: this process). augment: the
        fields of training.augment.Augment to change from their defaults."""
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
        return DataLoader(dataset, batch_size=batch, shuffle=train, drop_last=train and len(dataset) > batch)

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
            x = self.augment(x)
        return normalize(x), ages, genders

    def age_stats(self) -> tuple[float, float]:
        ages = self.split(*self.train_splits).age
        return float(ages.mean()), float(max(ages.std(ddof=0), 1.0))
