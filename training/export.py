"""`export`: a checkpoint -> model `age_gender` in the BentoML store, self-describing and with metrics.

Validation and test metrics are measured here, on the exact weights being stored, so the numbers in
the store always belong to the model next to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml
import lightning as L
import torch
import torchvision
import yaml

from models.artifact import MODEL_NAME, ONNX_FILE, WEIGHTS_FILE, architecture, export_onnx
from models.errors import UserError
from training.data import UTKFaceDataModule
from training.module import AgeGenderModule


def load_module(checkpoint: str | Path) -> AgeGenderModule:
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        # pretrained=False: the checkpoint holds every weight, nothing to download
        module = AgeGenderModule.load_from_checkpoint(path, map_location="cpu", pretrained=False, weights_path=None)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{path} is not a checkpoint of this project's training ({reason})") from None
    if module.training_config is None:
        raise UserError(f"{path} has no training config; was it written by `python -m training fit`?")
    return module.eval()


def datamodule_for(module: AgeGenderModule) -> UTKFaceDataModule:
    """The data the checkpoint was trained on, as its config describes it."""
    return UTKFaceDataModule(**module.training_config["data"], image_size=module.hparams.image_size)


def measure(module: AgeGenderModule, datamodule: UTKFaceDataModule) -> dict[str, dict[str, float]]:
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False)
    out = {}
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        if datamodule.split(stage).empty or stage in datamodule.train_splits:
            continue  # no held-out data for this stage
        raw = run(module, datamodule=datamodule, verbose=False)[0]
        metrics = {k.split("/", 1)[1]: float(v) for k, v in raw.items()}
        metrics["age_mse"] = metrics["age_rmse"] ** 2  # the original project's headline metric
        out[stage] = metrics
    return out


def describe(module: AgeGenderModule, datamodule: UTKFaceDataModule, checkpoint: Path) -> dict[str, Any]:
    hp = module.hparams
    sources = sorted(datamodule.frame.source.unique())
    dataset = "sample" if sources == ["sample"] else "utkface"
    counts = datamodule.frame.split.value_counts()
    return {
        **architecture(hp.backbone, hp.head_width, hp.dropout, hp.image_size),
        "demo": dataset == "sample",
        "dataset": {
            "name": dataset,
            "metadata": str(Path(datamodule.hparams.metadata).resolve()),
            "train_splits": list(datamodule.train_splits),
            **{f"n_{s}": int(counts.get(s, 0)) for s in ("train", "val", "test")},
        },
        "checkpoint": str(checkpoint.resolve()),
        "config": yaml.safe_dump(module.training_config, sort_keys=False),  # store metadata allows no None
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
    }


def save_model(net: torch.nn.Module, meta: dict[str, Any], name: str = MODEL_NAME) -> bentoml.Tag:
    """Weights and their ONNX graph into the store; committed only if everything was written."""
    labels = {"dataset": meta["dataset"]["name"], "demo": str(meta["demo"]).lower(), "backbone": meta["backbone"]}
    with bentoml.models.create(name, labels=labels, metadata=meta) as ref:
        torch.save(net.state_dict(), ref.path_of(WEIGHTS_FILE))
        export_onnx(net, meta["image_size"], ref.path_of(ONNX_FILE))
    return ref.tag


def export(checkpoint: str | Path, name: str = MODEL_NAME) -> bentoml.Tag:
    module = load_module(checkpoint)
    datamodule = datamodule_for(module)
    meta = describe(module, datamodule, Path(checkpoint))
    meta["metrics"] = measure(module, datamodule)
    return save_model(module.net, meta, name)
