"""The stored model: what `training export` writes into a BentoML model folder and the service reads.

The folder holds `weights.pt` (the AgeGenderNet state dict, buffers included), `model.onnx` (the
same network as an ONNX graph with a dynamic batch dimension) and, in models exported since INT8 came,
`model.int8.onnx` (that graph quantised). The model's metadata holds everything needed to rebuild and
preprocess it: backbone, head width, input size, normalisation, class names, age range, age head,
calibration (gender temperature, regression residual quantiles), the INT8 graph's measured cost, plus the
data set, config and metrics it came from; MODEL_CARD.md says the same for people. This module imports
no torch: the serving processes read it, and the CPU image has no torch at all.
"""

from __future__ import annotations

from typing import Any

from models.errors import UserError
from models.presets import IMAGENET_MEAN, IMAGENET_STD, ArrayPreset, eval_preset

MODEL_NAME = "age_gender"
WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # the same graph statically quantised at export (training/quantize.py)
CARD_FILE = "MODEL_CARD.md"
GENDER_CLASSES = ("male", "female")  # index = UTKFace gender field
AGE_RANGE = (0, 116)  # UTKFace labels; answers are clamped to the stored model's range
AGE_HEADS = ("regression", "distribution")  # one number in years | a softmax over whole years 0..AGE_RANGE[1]
MINOR_AGE = 18  # minor_probability = P(age < MINOR_AGE)
INTERVAL_LEVEL = 0.8  # default level of the central age interval in every answer
# the INT8 graph is the CPU default only while, on every held-out split of export, it is worse than the
# fp32 graph by at most this much: age MAE 0.1 year higher, gender accuracy 0.3 points lower
INT8_MAX_COST = {"age_mae": 0.1, "gender_acc": 0.003}
HIGHER_IS_BETTER = {"gender_acc"}  # of INT8_MAX_COST's metrics; the others are errors (lower is better)


def stored_model(tag: str):
    """A model of the BentoML store ($BENTOML_HOME) by tag; a UserError that says where to look if absent."""
    import bentoml

    try:
        return bentoml.models.get(tag)
    except (bentoml.exceptions.NotFound, ValueError):
        raise UserError(f"model {tag!r} is not in the BentoML store; `bentoml models list` shows what is") from None


def architecture(
    backbone: str, head_width: int, dropout: float, image_size: int, age_head: str = "regression"
) -> dict[str, Any]:
    """The metadata that rebuilds and preprocesses a network; the rest of a model's metadata says where
    it came from (data set, config, metrics)."""
    return {
        "backbone": backbone,
        "head_width": head_width,
        "age_head": age_head,  # models stored before the distribution head have no key: regression
        "dropout": dropout,
        "image_size": image_size,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "gender_classes": list(GENDER_CLASSES),
        "age_range": list(AGE_RANGE),
    }


def preprocess_for(meta: dict[str, Any]):
    """The torch eval preset (training, evaluation) with this model's input size and normalisation."""
    norm = meta["normalisation"]
    return eval_preset(meta["image_size"], norm["mean"], norm["std"])


def array_preprocess_for(meta: dict[str, Any]) -> ArrayPreset:
    """The same preset in numpy, for serving without torch: (B, H, W, 3) uint8 -> (B, 3, S, S) float32."""
    norm = meta["normalisation"]
    return ArrayPreset(meta["image_size"], norm["mean"], norm["std"])
