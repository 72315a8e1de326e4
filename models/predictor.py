"""The Python API: the service's answers in your own process, no server.

    from models.predictor import Predictor
    predictor = Predictor.from_store("age_gender:latest")   # or Predictor.from_folder(path)
    result = predictor.predict("photo.jpg")                  # a PhotoResult, as POST /predict answers
    results = predictor.predict_many(["a.jpg", "b.jpg"])     # crops of all photos batched into the network

Same pipeline, same numbers as the REST API (models/pipeline.py); only the process layout differs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from models.artifact import INTERVAL_LEVEL, MODEL_NAME, ModelMeta, stored_model
from models.errors import UserError
from models.faces import DetectorConfig
from models.images import MAX_PIXELS
from models.outputs import check_level
from models.pipeline import Detection, Estimator, FaceFinder, load_crops, photo_results
from models.schemas import FaceAttributes, PhotoResult

ImageInput = str | Path | bytes | Image.Image | np.ndarray


class Predictor:
    def __init__(self, finder: FaceFinder, estimator: Estimator, batch_size: int = 32) -> None:
        self.finder, self.estimator, self.batch_size = finder, estimator, batch_size

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        runtime: str = "auto",
        level: float = INTERVAL_LEVEL,
        detection: DetectorConfig = DetectorConfig(),
        max_pixels: int = MAX_PIXELS,
    ) -> Predictor:
        """A stored model's folder (it holds model.yaml); faces found as `detection` says, in photos of at
        most max_pixels pixels (the service's AGE_GENDER_MAX_PIXELS)."""
        path = Path(path)
        try:
            raw = yaml.safe_load((path / "model.yaml").read_text())["metadata"]
        except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
            raise UserError(f"{path} is not a stored model folder (no readable model.yaml)") from exc
        check_level(level)
        return cls(FaceFinder(detection, max_pixels), Estimator.open(path, ModelMeta.load(raw), runtime, level))

    @classmethod
    def from_store(cls, tag: str = f"{MODEL_NAME}:latest", **options: Any) -> Predictor:
        """A model of the BentoML store ($BENTOML_HOME), by tag; options as for from_folder."""
        return cls.from_folder(stored_model(tag).path, **options)

    def detect(self, image: ImageInput) -> Detection:
        """Any supported input -> its faces. Files and bytes go through the upload rules (formats, size)."""
        if isinstance(image, str | Path):
            try:
                image = Path(image).read_bytes()
            except OSError as exc:
                raise UserError(f"cannot read {exc.filename}: {exc.strerror}") from exc
        if isinstance(image, bytes):
            return self.finder.find(image)
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            raise UserError("an image must be a path, bytes, a PIL image or an (H, W, 3) uint8 RGB array")
        return self.finder.find_in(image)

    def answer(self, detections: list[Detection]) -> list[PhotoResult]:
        """Detections -> results, their crops run through the network together in batches of batch_size."""
        crops = np.concatenate([d.crops for d in detections]) if detections else np.zeros((0,))
        rows = [self.estimator(crops[i : i + self.batch_size]) for i in range(0, len(crops), self.batch_size)]
        return photo_results(detections, self.estimator.answers(np.concatenate(rows)) if rows else [])

    def predict(self, image: ImageInput) -> PhotoResult:
        """Every face in one photo: box, detection score, age, interval, P(minor), gender, probability."""
        return self.answer([self.detect(image)])[0]

    def predict_many(self, images: Iterable[ImageInput]) -> list[PhotoResult]:
        """Several photos, in order; the first unreadable one raises (the batch command records errors
        per photo instead)."""
        return self.answer([self.detect(image) for image in images])

    def predict_faces(self, crops: list[bytes]) -> list[FaceAttributes]:
        """Already-cropped faces (UTKFace-like framing), no detection: as POST /predict_faces."""
        rows = self.estimator(load_crops(crops, self.finder.max_pixels))
        return [FaceAttributes(**a) for a in self.estimator.answers(rows)]
