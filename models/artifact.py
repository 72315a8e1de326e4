"""The stored model: what `training export` writes into a BentoML model folder and the service reads.

The folder holds `weights.pt` (the AgeGenderNet state dict, buffers included) and `model.onnx` (the
same network as an ONNX graph with a dynamic batch dimension); the model's metadata
holds everything needed to rebuild and preprocess it: backbone, head width, input size, normalisation,
class names, age range, plus the data set, config and metrics it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.network import AGE_RANGE, GENDER_CLASSES, AgeGenderNet
from models.presets import IMAGENET_MEAN, IMAGENET_STD, eval_preset

MODEL_NAME = "age_gender"
WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"


def architecture(backbone: str, head_width: int, dropout: float, image_size: int) -> dict[str, Any]:
    """The metadata that rebuilds and preprocesses a network; the rest of a model's metadata says where
    it came from (data set, config, metrics)."""
    return {
        "backbone": backbone,
        "head_width": head_width,
        "dropout": dropout,
        "image_size": image_size,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "gender_classes": list(GENDER_CLASSES),
        "age_range": list(AGE_RANGE),
    }


def load_network(model_dir: str | Path, meta: dict[str, Any], device: str | torch.device = "cpu") -> AgeGenderNet:
    net = AgeGenderNet.from_metadata(meta)
    net.load_state_dict(torch.load(Path(model_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return net.eval().to(device)


def preprocess_for(meta: dict[str, Any]):
    """The eval preset with the input size and normalisation that this model was trained with."""
    norm = meta["normalisation"]
    return eval_preset(meta["image_size"], norm["mean"], norm["std"])


def export_onnx(net: AgeGenderNet, image_size: int, path: str | Path) -> None:
    """(B, 3, S, S) normalised float -> age (B,), logits (B, 2); B is dynamic."""
    example = torch.zeros(1, 3, image_size, image_size)
    batch = {0: "batch"}
    torch.onnx.export(
        net.eval(),
        (example,),
        str(path),
        input_names=["image"],
        output_names=["age", "logits"],
        dynamic_axes={"image": batch, "age": batch, "logits": batch},
        dynamo=False,
    )
