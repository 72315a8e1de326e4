"""The LightningModule: owns the combined loss, the metrics and the optimiser around AgeGenderNet.

Age losses: for the regression head one of AGE_LOSSES on the number; for the distribution head the
cross-entropy against a Gaussian label distribution around the true age (DLDL / soft labels, width
age_sigma years) plus, optionally, age_l1_weight x L1 of the expected age.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from models.artifact import GENDER_CLASSES
from models.errors import UserError
from models.network import AgeGenderNet, check_age_head
from models.presets import IMAGE_SIZE
from training.utkface import SPLITS

AGE_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}  # adamw: weight decay decoupled from Adam
# plateau: halve the rate when the monitored loss stalls (no fixed length); cosine: linear warm-up over
# warmup_epochs, then a cosine to zero at trainer.max_epochs, stepped every batch (a fixed budget)
SCHEDULES = ("plateau", "cosine")


class AgeGenderModule(L.LightningModule):
    def __init__(
        self,
        backbone: str = "resnet34",
        pretrained: bool = True,
        weights_path: str | None = None,
        head_width: int = 256,
        dropout: float = 0.2,
        image_size: int = IMAGE_SIZE,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        age_loss: str = "mse",
        age_weight: float = 0.1,
        gender_weight: float = 0.99,
        normalize_age: bool = False,
        age_mean: float = 0.0,
        age_std: float = 1.0,
        lr_factor: float = 0.5,
        lr_patience: int = 2,
        monitor: str = "val/loss",
        age_head: str = "regression",
        age_sigma: float = 2.0,
        age_l1_weight: float = 0.0,
        optimizer: str = "adam",
        schedule: str = "plateau",
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        check_age_head(age_head)
        if age_sigma <= 0 or age_l1_weight < 0:
            raise UserError(f"need model.age_sigma > 0 and model.age_l1_weight >= 0; got {age_sigma}, {age_l1_weight}")
        for key, value, allowed in (("optimizer", optimizer, OPTIMIZERS), ("schedule", schedule, SCHEDULES)):
            if value not in allowed:
                raise UserError(f"unknown model.{key} {value!r}; choose from {', '.join(allowed)}")
        if age_loss not in AGE_LOSSES:
            raise UserError(f"unknown age_loss {age_loss!r}; choose from {', '.join(AGE_LOSSES)}")
        for name, value in (("age_weight", age_weight), ("gender_weight", gender_weight)):
            if value < 0:
                raise UserError(f"model.{name} must be >= 0, got {value}")
        if age_weight == 0 and gender_weight == 0:
            raise UserError("model.age_weight and model.gender_weight cannot both be 0")
        if not 0 <= dropout < 1 or lr <= 0 or image_size < 32:
            raise UserError(f"need 0 <= dropout < 1, lr > 0 and image_size >= 32; got {dropout}, {lr}, {image_size}")
        self.save_hyperparameters()
        if not normalize_age:
            age_mean, age_std = 0.0, 1.0
        self.net = AgeGenderNet(backbone, head_width, dropout, age_mean, age_std, pretrained, weights_path, age_head)
        self.age_loss = AGE_LOSSES[age_loss]
        self.metrics = torch.nn.ModuleDict(
            {
                f"{stage}_metrics": torch.nn.ModuleDict(
                    {
                        "age_mae": MeanAbsoluteError(),
                        "age_rmse": MeanSquaredError(squared=False),
                        "gender_acc": MulticlassAccuracy(num_classes=len(GENDER_CLASSES), average="micro"),
                    }
                )
                for stage in SPLITS
            }
        )
        self.training_config: dict[str, Any] | None = None  # set by `fit`, stored in checkpoints
        self.train_split: list[str] | None = None  # hashes of the training images (training.fingerprint), likewise

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x)

    def age_terms(self, age_out: torch.Tensor, true_age: torch.Tensor) -> torch.Tensor:
        # with normalize_age the regression and L1 terms are in standard deviations: one weight fits any data
        scale, age = self.net.age_std, self.net.years(age_out)
        if not self.net.distribution:
            return self.age_loss(age / scale, true_age / scale)
        years = torch.arange(age_out.shape[1], dtype=age_out.dtype, device=age_out.device)  # (K,)
        target = torch.exp(-0.5 * ((years[None] - true_age[:, None]) / self.hparams.age_sigma) ** 2)  # (B, K)
        target = target / target.sum(1, keepdim=True)
        loss = -(target * age_out.log_softmax(1)).sum(1).mean()
        if self.hparams.age_l1_weight:
            loss = loss + self.hparams.age_l1_weight * F.l1_loss(age / scale, true_age / scale)
        return loss

    def losses(self, age_out: torch.Tensor, logits: torch.Tensor, true_age: torch.Tensor, true_gender: torch.Tensor):
        loss_age = self.age_terms(age_out, true_age)
        loss_gender = F.cross_entropy(logits, true_gender)
        loss = self.hparams.age_weight * loss_age + self.hparams.gender_weight * loss_gender
        return loss, loss_age, loss_gender

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, true_age, true_gender = batch
        age_out, logits = self(x)
        loss, loss_age, loss_gender = self.losses(age_out, logits, true_age, true_gender)
        age = self.net.years(age_out)  # (B,) years
        on_step = stage == "train"
        # synced across processes at every stage: under DDP the LR schedule (and `production`, which watches
        # train/loss_epoch) must see the same number in every process
        log = dict(on_step=on_step, on_epoch=True, batch_size=len(x), sync_dist=True)
        self.log(f"{stage}/loss_age", loss_age, **log)
        self.log(f"{stage}/loss_gender", loss_gender, **log)
        self.log(f"{stage}/loss", loss, prog_bar=True, **log)
        metrics = self.metrics[f"{stage}_metrics"]
        for name, metric, args in (
            ("age_mae", metrics["age_mae"], (age, true_age)),
            ("age_rmse", metrics["age_rmse"], (age, true_age)),
            ("gender_acc", metrics["gender_acc"], (logits, true_gender)),
        ):
            metric(*args)
            self.log(f"{stage}/{name}", metric, on_step=on_step, on_epoch=True, prog_bar=name != "age_rmse")
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        opt = OPTIMIZERS[hp.optimizer](self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warmup = min(total - 1, int(total * hp.warmup_epochs / max(1, self.trainer.max_epochs)))

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=hp.lr_factor, patience=hp.lr_patience
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": hp.monitor}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["training_config"] = self.training_config
        checkpoint["train_split"] = self.train_split

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.training_config = checkpoint.get("training_config")
        self.train_split = checkpoint.get("train_split")  # None in checkpoints written before it was recorded
