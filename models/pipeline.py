"""The one path from a photo to answers: bytes -> decoded RGB -> faces -> aligned crops -> preprocessing ->
runtime -> answers (models/outputs.py) -> PhotoResult (models/schemas.py).

Two halves, because the service runs them in different processes (detection on every core; the network
batched across requests, on a GPU where there is one):
- FaceFinder: photo bytes -> Detection: decoded under the upload rules of models/images.py, faces found
  and aligned like UTKFace's crops.
- Estimator:  aligned crops (N, 200, 200, 3) uint8 -> answer rows (models.outputs.COLUMNS, then P(gender)).
`photo_results` joins them. The service (service.py), the Python API (models/predictor.py), the batch
command (`python -m predict`), the benchmarks and `evaluate` all go through these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.artifact import INTERVAL_LEVEL, ModelMeta, array_preprocess_for
from models.errors import UserError, about
from models.faces import CROP_SIZE, DetectorConfig, FaceDetector, align_crop
from models.images import MAX_PIXELS, decode_image
from models.outputs import answers, decode
from models.runtime import open_runtime
from models.schemas import Box, DetectedFace, PhotoResult


@dataclass
class Detection:
    width: int
    height: int
    boxes: list[tuple[int, int, int, int]]  # x, y, width, height in pixels of the decoded photo; largest first
    scores: list[float]
    crops: np.ndarray  # (N, 200, 200, 3) uint8, aligned
    found: int  # faces found; more than len(boxes) when over the detector's max_faces (the smallest are left out)


class FaceFinder:
    def __init__(self, config: DetectorConfig = DetectorConfig(), max_pixels: int = MAX_PIXELS) -> None:
        self.config, self.max_pixels = config, max_pixels
        self.detector = FaceDetector(config)

    @property
    def name(self) -> str:
        """The detector in use: the configured one, or `haar` where MTCNN's nets cannot load."""
        return self.detector.name

    def find(self, data: bytes) -> Detection:
        """Photo bytes (JPEG, PNG, WebP, BMP, GIF, TIFF) -> Detection; UserError for anything else."""
        return self.find_in(decode_image(data, self.max_pixels))

    def find_in(self, rgb: np.ndarray) -> Detection:
        """(H, W, 3) uint8 RGB -> Detection."""
        faces, found = self.detector.find(rgb)
        crops = [align_crop(rgb, f) for f in faces]
        return Detection(
            width=rgb.shape[1],
            height=rgb.shape[0],
            boxes=[f.box for f in faces],
            scores=[f.score for f in faces],
            crops=np.stack(crops) if crops else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8),
            found=found,
        )


def load_crops(images: list[bytes], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Already-cropped faces -> (N, 200, 200, 3), resized like UTKFace's chips; an error names the image."""
    crops = []
    for i, data in enumerate(images):
        try:
            rgb = decode_image(data, max_pixels)
        except UserError as exc:
            raise about(exc, "file", i, len(images)) from exc
        if rgb.shape[:2] != (CROP_SIZE, CROP_SIZE):
            rgb = cv2.resize(rgb, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
        crops.append(rgb)
    return np.stack(crops)


class Estimator:
    """Aligned crops -> answers, with one stored model's preprocessing, runtime and calibration."""

    def __init__(self, runtime, meta: ModelMeta, level: float = INTERVAL_LEVEL, why: str = "given") -> None:
        """`why`: why this runtime (models.runtime.open_runtime), for the log and /model_info."""
        self.runtime, self.meta, self.level, self.why = runtime, meta, level, why
        self.preprocess = array_preprocess_for(meta)  # numpy: no torch needed for ONNX Runtime
        self.classes = meta.gender_classes

    @classmethod
    def open(cls, model_dir: str | Path, meta: ModelMeta, runtime: str = "auto", level: float = INTERVAL_LEVEL):
        chosen, why = open_runtime(runtime, model_dir, meta)
        return cls(chosen, meta, level, why)

    def raw(self, crops: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(B, 200, 200, 3) uint8 -> the network's outputs: age output, gender logits (B, C). With tta,
        averaged with those of the mirrored crops."""
        x = self.preprocess(crops)  # (B, 3, S, S) normalised float32
        age_out, logits = self.runtime(x)
        if tta:
            age_f, logits_f = self.runtime(np.ascontiguousarray(x[..., ::-1]))
            age_out, logits = (age_out + age_f) / 2, (logits + logits_f) / 2
        return age_out, logits

    def __call__(self, crops: np.ndarray, tta: bool = False) -> np.ndarray:
        """(B, 200, 200, 3) uint8 -> (B, 4 + C) float32 answer rows (models.outputs.decode)."""
        return decode(*self.raw(crops, tta), self.meta, self.level)

    def answers(self, rows: np.ndarray) -> list[dict[str, Any]]:
        return answers(rows, self.classes, self.level)

    def info(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime.name,
            "runtime_reason": self.why,
            "device": self.runtime.device,
            "interval_level": self.level,
            "int8_cost": (self.meta.int8.cost or None) if self.meta.int8 else None,
        }


def photo_results(detections: list[Detection], faces: list[dict[str, Any]]) -> list[PhotoResult]:
    """Detections and the answers for all their crops, in order -> one /predict answer per photo."""
    results, k = [], 0
    for d in detections:
        boxes = zip(d.boxes, d.scores, faces[k : k + len(d.boxes)], strict=True)
        k += len(d.boxes)
        results.append(
            PhotoResult(
                width=d.width,
                height=d.height,
                omitted_faces=d.found - len(d.boxes),
                faces=[
                    DetectedFace(box=Box(x=x, y=y, width=w, height=h), detection_score=round(s, 4), **a)
                    for (x, y, w, h), s, a in boxes
                ],
            )
        )
    return results
