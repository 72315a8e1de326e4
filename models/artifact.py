"""The stored model: what `training export` writes into a BentoML model folder and the service reads.

The folder holds `weights.pt` (the AgeGenderNet state dict, buffers included), `model.onnx` (the
same network as an ONNX graph with a dynamic batch dimension) and, where export quantised it,
`model.int8.onnx` (that graph in INT8; older models lack it). The model's metadata holds everything
needed to rebuild and preprocess it: backbone, head width, input size, normalisation, class names, age range, age head,
calibration (gender temperature, regression residual quantiles), the INT8 graph's measured cost, plus the
data set, config and metrics it came from; MODEL_CARD.md says the same for people. This module imports
no torch: the serving processes read it, and the CPU image has no torch at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import UserError
from models.presets import IMAGENET_MEAN, IMAGENET_STD, ArrayPreset

MODEL_NAME = "age_gender"
WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # the same graph statically quantised at export (training/quantize.py)
CARD_FILE = "MODEL_CARD.md"
Gender = Literal["male", "female"]
GENDER_CLASSES: tuple[Gender, ...] = get_args(Gender)  # index = UTKFace gender field
AGE_RANGE = (0, 116)  # UTKFace labels; answers are clamped to the stored model's range
AgeHead = Literal["regression", "distribution"]  # one number in years | a softmax over whole years 0..AGE_RANGE[1]
AGE_HEADS: tuple[AgeHead, ...] = get_args(AgeHead)
MINOR_AGE = 18  # minor_probability = P(age < MINOR_AGE)
INTERVAL_LEVEL = 0.8  # default level of the central age interval in every answer
# the INT8 graph is the CPU default only while, on every held-out split of export, it is worse than the
# fp32 graph by at most this much: age MAE 0.1 year higher, gender accuracy 0.3 points lower
INT8_MAX_COST = {"age_mae": 0.1, "gender_acc": 0.003}
HIGHER_IS_BETTER = {"gender_acc"}  # of INT8_MAX_COST's metrics; the others are errors (lower is better)


# the metadata's format; 1: every model stored before the version was recorded (0.1.0's and 0.2.0's
# development models alike; ModelMeta.load migrates them)
SCHEMA_VERSION = 2
Metrics = dict[str, int | float]  # metric name -> value; "n" (images) is an int


class Normalisation(BaseModel):
    mean: list[float]
    std: list[float]


class Calibration(BaseModel):
    """Fitted at export on the first held-out split (training/calibration.py); none fitted: the defaults."""

    split: str | None = None
    gender_temperature: float = 1.0
    age_temperature: float = 1.0  # the distribution head's
    residual_quantiles: list[float] | None = None  # the regression head's, at percentiles 1..99


class Dataset(BaseModel):
    name: str
    metadata: str | None = None  # the metadata file, as the training machine knew it
    train_splits: list[str] = ["train"]
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    train_split: dict[str, Any] | None = None  # the training images' fingerprint (training/fingerprint.py)


class Int8(BaseModel):
    file: str
    format: str
    calibration_crops: dict[str, Any]
    metrics: dict[str, Metrics]  # split -> the INT8 graph's metrics
    cost: dict[str, Metrics] = {}  # split -> INT8 minus fp32; empty without held-out data


class ModelMeta(BaseModel):
    """A stored model's metadata: how to rebuild, preprocess and decode its network (the architecture
    part), and where it came from. Stored as plain JSON (BentoML model metadata); read with `load`."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    backbone: str
    head_width: int
    age_head: AgeHead
    dropout: float
    image_size: int
    normalisation: Normalisation
    gender_classes: list[str]
    age_range: tuple[int, int]
    demo: bool = False
    dataset: Dataset = Field(default_factory=lambda: Dataset(name="unknown"))
    checkpoint: str | None = None
    config: str = ""  # the training config, YAML
    versions: dict[str, str] = {}
    calibration: Calibration = Calibration()
    metrics: dict[str, Metrics] = {}  # held-out split -> metrics of the fp32 weights as served
    int8: Int8 | None = None  # models stored before INT8 graphs: None

    @classmethod
    def load(cls, raw: Mapping[str, Any]) -> ModelMeta:
        """Stored metadata of any schema version -> this one; a UserError if it cannot be read."""
        raw = dict(raw)
        version = raw.get("schema_version", 1)
        if version > SCHEMA_VERSION:
            raise UserError(f"this model's metadata is of schema {version}, newer than this release reads; upgrade")
        if version == 1:  # before the distribution head, models had no age_head: all were regression
            raw = {"age_head": "regression", **raw, "schema_version": SCHEMA_VERSION}
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise UserError(f"the model's metadata is not readable: {where}: {first['msg']}") from exc

    def stored(self) -> dict[str, Any]:
        """What BentoML stores: JSON types, no None (its metadata allows none)."""
        return self.model_dump(mode="json", exclude_none=True)


def check_tag(tag: str) -> None:
    """A UserError unless tag is a BentoML tag: BentoML's own error, met where the model is first named
    (a service's class body), stops it without saying which setting."""
    import bentoml

    try:
        bentoml.Tag.from_taglike(tag)
    except (ValueError, bentoml.exceptions.BentoMLException) as exc:
        raise UserError(
            f"{tag!r} is not a BentoML tag: a name, or name:version, of lower-case letters, digits, '_', '-' and '.'"
        ) from exc


def stored_model(tag: str):
    """A model of the BentoML store ($BENTOML_HOME) by tag; a UserError that says where to look if absent."""
    import bentoml

    try:
        return bentoml.models.get(tag)
    except (bentoml.exceptions.NotFound, ValueError) as exc:
        raise UserError(f"model {tag!r} is not in the BentoML store; `bentoml models list` shows what is") from exc


def stored_meta(model) -> ModelMeta:
    """A BentoML model (bentoml.models.get) -> its metadata, migrated to this schema."""
    return ModelMeta.load(model.info.metadata)


def architecture(
    backbone: str, head_width: int, dropout: float, image_size: int, age_head: AgeHead = "regression", **where: Any
) -> ModelMeta:
    """The metadata that rebuilds and preprocesses a network; `where`: the rest (data set, config, ...)."""
    return ModelMeta(
        backbone=backbone,
        head_width=head_width,
        age_head=age_head,
        dropout=dropout,
        image_size=image_size,
        normalisation=Normalisation(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        gender_classes=list(GENDER_CLASSES),
        age_range=AGE_RANGE,
        **where,
    )


def array_preprocess_for(meta: ModelMeta) -> ArrayPreset:
    """The eval preset with this model's input size and normalisation, in numpy (serving needs no torch):
    (B, H, W, 3) uint8 -> (B, 3, S, S) float32."""
    return ArrayPreset(meta.image_size, meta.normalisation.mean, meta.normalisation.std)
