"""Training throughput on this machine: `fit` against the bare forward+backward rate, and the data path.

The data path is decoding once at start-up (images/s) and, per batch, augmentation and normalisation in
the training process (images/s): when both are far above what `fit` consumes, the network is all an
epoch costs. Defaults: the CPU recipe's network (configs/utkface_cpu.yaml). Results:
benchmarks/results/training.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks.run import RESULTS
from models.presets import normalize
from training.data import UTKFaceDataModule
from training.module import AgeGenderModule
from training.synth import write_sample_dataset
from training.utkface import build_metadata


class Throughput(L.Callback):
    """Images/s over the training batches after the first `skip` (start-up and warm-up excluded)."""

    def __init__(self, skip: int = 2) -> None:
        self.skip, self.images, self.start = skip, 0, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if batch_idx == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if batch_idx >= self.skip:
            self.images += len(batch[0])

    def rate(self) -> float:
        return self.images / (time.perf_counter() - self.start)


def bare_rate(module: AgeGenderModule, batch: int, size: int, steps: int) -> float:
    opt = module.configure_optimizers()["optimizer"]
    x, age, gender = torch.randn(batch, 3, size, size), torch.rand(batch) * 80, torch.randint(0, 2, (batch,))
    module.train()
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss = module.losses(*module(x), age, gender)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - start)


def data_rates(datamodule: UTKFaceDataModule, batches: int) -> tuple[float, float]:
    """(images/s decoded at start-up, images/s through augmentation + normalisation per batch)."""
    start = time.perf_counter()
    faces = datamodule.dataset(datamodule.train_splits).tensors[0]
    decoded = len(faces) / (time.perf_counter() - start)
    batch = faces[: datamodule.hparams.batch_size]
    start = time.perf_counter()
    for _ in range(batches):
        normalize(datamodule.augment(batch.float() / 255))
    return decoded, batches * len(batch) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="train-speed-"))
    data = write_sample_dataset(work / "data", n=args.batch_size * (args.batches + 4) * 2, seed=0)
    build_metadata(data, work / "metadata.csv", balance=False, fractions=(0.9, 0.05, 0.05))
    dm = UTKFaceDataModule(str(work / "metadata.csv"), args.batch_size, args.num_workers, args.image_size)
    # no validation here, so the LR schedule watches the training loss (as in `production`)
    module = AgeGenderModule(args.backbone, pretrained=False, image_size=args.image_size, monitor="train/loss_epoch")

    out = {"config": vars(args), "torch_threads": torch.get_num_threads()}
    out["bare_forward_backward"] = bare_rate(module, args.batch_size, args.image_size, args.batches)
    out["decode"], out["augment"] = data_rates(dm, args.batches)
    throughput = Throughput()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=args.batches + 2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[throughput],
    )
    trainer.fit(module, dm)
    out["fit"] = throughput.rate()
    out["fit_vs_bare"] = out["fit"] / out["bare_forward_backward"]
    out["augment_vs_fit"] = out["augment"] / out["fit"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
