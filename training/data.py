"""Data: the metadata CSV as datasets of preprocessed face tensors, wrapped in a LightningDataModule."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from models.errors import UserError
from models.presets import eval_preset, load_rgb, train_preset
from training.utkface import SPLITS, read_metadata


class FaceDataset(Dataset):
    def __init__(self, frame: pd.DataFrame, transform: Callable) -> None:
        self.paths = frame.path.tolist()
        self.ages = torch.tensor(frame.age.to_numpy(), dtype=torch.float32)
        self.genders = torch.tensor(frame.gender.to_numpy(), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.transform(load_rgb(self.paths[i])), self.ages[i], self.genders[i]


class UTKFaceDataModule(L.LightningDataModule):
    def __init__(
        self,
        metadata: str,
        batch_size: int = 64,
        num_workers: int = 2,
        image_size: int = 224,
        train_splits: Sequence[str] = ("train",),
    ) -> None:
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

    def split(self, *names: str) -> pd.DataFrame:
        return self.frame[self.frame.split.isin(names)]

    def _loader(self, names: Sequence[str], train: bool) -> DataLoader:
        frame = self.split(*names)
        if frame.empty:
            raise UserError(f"the metadata has no rows in split {'+'.join(names)}")
        size = self.hparams.image_size
        dataset = FaceDataset(frame, train_preset(size) if train else eval_preset(size))
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_splits, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(["val"], train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(["test"], train=False)

    def age_stats(self) -> tuple[float, float]:
        ages = self.split(*self.train_splits).age
        return float(ages.mean()), float(max(ages.std(ddof=0), 1.0))
