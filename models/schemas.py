"""The public response contract: the REST API and the Python API (models/predictor.py) answer these; clients
and generated OpenAPI clients depend on their names."""

from __future__ import annotations

from pydantic import BaseModel, Field

from models.artifact import AgeHead, Gender


class Box(BaseModel):
    x: int = Field(description="left edge, pixels of the uploaded image (after EXIF rotation)")
    y: int = Field(description="top edge, pixels")
    width: int
    height: int


class AgeInterval(BaseModel):
    low: float = Field(description="years")
    high: float = Field(description="years")
    level: float = Field(
        description="nominal level of this central interval (AGE_GENDER_INTERVAL_LEVEL); the coverage measured "
        "on held-out data is /model_info's test_metrics.interval_coverage"
    )


class FaceAttributes(BaseModel):
    age: float = Field(description="estimated age in years, within the model's age range")
    age_interval: AgeInterval | None = Field(
        description="central interval of the estimate at `level` (AGE_GENDER_INTERVAL_LEVEL, default 0.8); "
        "null for regression models exported before intervals were measured"
    )
    minor_probability: float | None = Field(
        description="estimated P(age < 18); an estimate with known error on children, not an age check on its own; "
        "null where age_interval is null"
    )
    gender: Gender
    gender_probability: float = Field(description="calibrated probability of the reported gender, 0.5-1")


class DetectedFace(FaceAttributes):
    box: Box
    detection_score: float = Field(description="detector confidence, 0-1 (1.0 for the Haar fallback)")


class PhotoResult(BaseModel):
    width: int
    height: int
    faces: list[DetectedFace] = Field(description="largest face first; empty when no face is found")
    omitted_faces: int = Field(
        0,
        description="faces found beyond the AGE_GENDER_MAX_FACES largest, not answered (0 unless the photo holds "
        "more faces than that)",
    )


class BatchResult(BaseModel):
    results: list[PhotoResult] = Field(description="one per uploaded image, in request order")


class FacesResult(BaseModel):
    predictions: list[FaceAttributes] = Field(description="one per uploaded crop, in request order")


class Metrics(BaseModel):
    n: int | None = Field(None, description="test faces measured")
    age_mae: float | None = None
    age_rmse: float | None = None
    age_mse: float | None = None
    cs5: float | None = Field(None, description="cumulative score: share of faces whose age is within 5 years")
    gender_acc: float | None = None
    gender_ece: float | None = Field(None, description="expected calibration error of gender_probability")
    gender_ece_uncalibrated: float | None = Field(None, description="the same before temperature scaling")
    interval_level: float | None = Field(None, description="the level of the age_interval measured")
    interval_coverage: float | None = Field(None, description="share of true ages inside their age_interval")
    minor_auc: float | None = Field(None, description="ROC AUC of minor_probability for age < 18")


class ModelInfo(BaseModel):
    tag: str
    backbone: str
    image_size: int
    dataset: str = Field(description="'utkface', or 'sample' for a demo model trained on generated data")
    demo: bool = Field(description="true when the model was trained on generated sample data")
    test_metrics: Metrics
    detector: str
    device: str
    runtime: str = Field(description="'onnx' (ONNX Runtime, fp32 graph), 'onnx-int8' (its INT8 graph) or 'torch'")
    runtime_reason: str = Field(description="why this runtime and graph serve (AGE_GENDER_RUNTIME=auto decides)")
    int8_cost: dict[str, dict[str, float]] | None = Field(
        None, description="per held-out split, INT8 minus fp32 for each metric, measured at export; null: no INT8"
    )
    age_head: AgeHead
    interval_level: float = Field(description="level of every answer's age_interval")
    gender_temperature: float = Field(description="temperature scaling of the gender logits (1.0: none)")
    model_card: str = Field("/model_card", description="route of the model card (Markdown)")
