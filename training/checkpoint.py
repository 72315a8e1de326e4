"""Loading what training wrote: a checkpoint as its LightningModule, the data it was trained on, the
metadata that describes it for the store, and any model (checkpoint or store tag) as the serving
pipeline's Estimator for scoring.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
import yaml

from models.artifact import Dataset, ModelMeta, architecture, stored_meta, stored_model
from models.errors import UserError
from models.pipeline import Estimator
from models.runtime import TorchRuntime
from training import fingerprint
from training.data import UTKFaceDataModule
from training.module import AgeGenderModule
from training.utkface import SPLITS


def load_module(checkpoint: str | Path) -> AgeGenderModule:
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        # pretrained=False: the checkpoint holds every weight, nothing to download
        module = AgeGenderModule.load_from_checkpoint(path, map_location="cpu", pretrained=False, weights_path=None)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{path} is not a checkpoint of this project's training ({reason})") from exc
    if module.training_config is None:
        raise UserError(f"{path} has no training config; was it written by `python -m training fit`?")
    return module.eval()


def datamodule_for(module: AgeGenderModule) -> UTKFaceDataModule:
    """The data the checkpoint was trained on, as its config describes it."""
    return UTKFaceDataModule(**module.training_config["data"], image_size=module.hparams.image_size)


def held_out_splits(datamodule: UTKFaceDataModule) -> list[str]:
    """val and test, where not trained on and not empty."""
    return [s for s in SPLITS[1:] if s not in datamodule.train_splits and not datamodule.split(s).empty]


def train_split_of(module: AgeGenderModule, datamodule: UTKFaceDataModule) -> tuple[list[str], str]:
    """The hashes of the images the checkpoint trained on, and who recorded them: `fit`, or (for checkpoints
    written before `fit` recorded them) `export`, from the metadata file as it is now."""
    if module.train_split is not None:
        return list(module.train_split), "fit"
    return fingerprint.image_hashes(datamodule.split(*datamodule.train_splits).path), "export"


def describe(
    module: AgeGenderModule, datamodule: UTKFaceDataModule, checkpoint: Path, train_split: tuple[list[str], str]
) -> ModelMeta:
    """The checkpoint's metadata as the store will hold it, before calibration and metrics."""
    hp = module.hparams
    sources = sorted(datamodule.frame.source.unique())
    dataset = "sample" if sources == ["sample"] else "utkface"
    counts = datamodule.frame.split.value_counts()
    return architecture(
        hp.backbone,
        hp.head_width,
        hp.dropout,
        hp.image_size,
        hp.age_head,
        demo=dataset == "sample",
        dataset=Dataset(
            name=dataset,
            metadata=str(Path(datamodule.hparams.metadata).resolve()),
            train_splits=list(datamodule.train_splits),
            **{f"n_{s}": int(counts.get(s, 0)) for s in SPLITS},
            # the training images' fingerprint; their hashes are in the model folder (training.fingerprint)
            train_split={**fingerprint.summary(train_split[0]), "recorded_by": train_split[1]},
        ),
        checkpoint=str(checkpoint.resolve()),
        config=yaml.safe_dump(module.training_config, sort_keys=False),
        versions={"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
    )


def load_model(model: str, runtime: str = "auto") -> tuple[Estimator, ModelMeta, set[str] | None]:
    """A store tag (`age_gender:TAG`) or a checkpoint file -> (the serving pipeline's Estimator for it, with
    `runtime` for a stored model and torch for a checkpoint; its metadata; hashes of the images it trained
    on, or None where it was made before they were recorded)."""
    if model.endswith(".ckpt") or Path(model).is_file():
        module = load_module(model)
        datamodule = datamodule_for(module)
        train_split = train_split_of(module, datamodule)
        trained = set(train_split[0]) if train_split[1] == "fit" else None
        meta = describe(module, datamodule, Path(model), train_split)
        return Estimator(TorchRuntime(module.net), meta, why="a checkpoint: its torch weights"), meta, trained
    stored = stored_model(model)
    meta = stored_meta(stored)
    recorded = meta.dataset.train_split
    trained = fingerprint.read(Path(stored.path) / fingerprint.FILE, recorded) if recorded else None
    return Estimator.open(stored.path, meta, runtime), meta, trained
