"""The public response contract. Clients (and generated OpenAPI clients) depend on these names."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Box(BaseModel):
    x: int = Field(description="left edge, pixels of the uploaded image (after EXIF rotation)")
    y: int = Field(description="top edge, pixels")
    width: int
    height: int


class FaceAttributes(BaseModel):
    age: float = Field(description="estimated age in years")
    gender: Literal["male", "female"]
    gender_probability: float = Field(description="probability of the reported gender, 0.5-1")


class DetectedFace(FaceAttributes):
    box: Box
    detection_score: float = Field(description="detector confidence, 0-1 (1.0 for the Haar fallback)")


class PhotoResult(BaseModel):
    width: int
    height: int
    faces: list[DetectedFace] = Field(description="largest face first; empty when no face is found")


class BatchResult(BaseModel):
    results: list[PhotoResult] = Field(description="one per uploaded image, in request order")


class FacesResult(BaseModel):
    predictions: list[FaceAttributes] = Field(description="one per uploaded crop, in request order")


class Metrics(BaseModel):
    age_mae: float | None = None
    age_rmse: float | None = None
    age_mse: float | None = None
    gender_acc: float | None = None


class ModelInfo(BaseModel):
    tag: str
    backbone: str
    image_size: int
    dataset: str = Field(description="'utkface', or 'sample' for a demo model trained on generated data")
    demo: bool = Field(description="true when the model was trained on generated sample data")
    test_metrics: Metrics
    detector: str
    device: str
    runtime: str = Field(description="'onnx' (ONNX Runtime) or 'torch'")
