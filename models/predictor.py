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
from models.errors import UserError, about
from models.faces import DetectorConfig
from models.images import MAX_PIXELS, image_rgb, read_image_file
from models.outputs import check_level
from models.pipeline import Detection, Estimator, FaceFinder, load_crops, photo_results
from models.schemas import FaceAttributes, PhotoResult

ImageInput = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray
IMAGE_INPUTS = "a path, bytes, a PIL image or an (H, W, 3) uint8 RGB array"
FILE_INPUT = str | Path | bytes | bytearray | memoryview  # a photo's file, or its bytes
ONE_IMAGE = (FILE_INPUT, Image.Image, np.ndarray)  # isinstance: not a list of images


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
        if not isinstance(detection, DetectorConfig):
            raise UserError(f"detection must be a models.faces.DetectorConfig, not {type(detection).__name__}")
        if isinstance(level, bool) or not isinstance(level, int | float):
            raise UserError(f"level must be a number (0.5-0.98), not {type(level).__name__}")
        path = Path(path)
        try:
            raw = yaml.safe_load((path / "model.yaml").read_text())["metadata"]
        except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
            raise UserError(f"{path} is not a stored model folder (no readable model.yaml)") from exc
        try:
            check_level(level)
        except ValueError as exc:
            raise UserError(f"level: {exc}") from exc
        return cls(FaceFinder(detection, max_pixels), Estimator.open(path, ModelMeta.load(raw), runtime, level))

    @classmethod
    def from_store(cls, tag: str = f"{MODEL_NAME}:latest", **options: Any) -> Predictor:
        """A model of the BentoML store ($BENTOML_HOME), by tag; options as for from_folder."""
        if not isinstance(tag, str):
            raise UserError(f"a model tag is a string such as {MODEL_NAME}:latest, not {type(tag).__name__}")
        return cls.from_folder(stored_model(tag).path, **options)

    def detect(self, image: ImageInput) -> Detection:
        """Any supported input -> its faces. Files and bytes go through the upload rules (formats, size); a
        PIL image's pixels are mapped to RGB as its file's would be (models.images.image_rgb)."""
        if isinstance(image, FILE_INPUT):
            return self.finder.find(_file_bytes(image, self.finder.max_pixels))
        if isinstance(image, Image.Image):
            image = image_rgb(image)
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            got = f"a {image.shape} {image.dtype} array" if isinstance(image, np.ndarray) else type(image).__name__
            raise UserError(f"an image must be {IMAGE_INPUTS}, not {got}")
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
        if isinstance(images, ONE_IMAGE):
            raise UserError("predict_many takes a list of images; for one, call predict")
        images = list(images)
        return self.answer([self._detect_nth(i, image, len(images)) for i, image in enumerate(images)])

    def _detect_nth(self, i: int, image: ImageInput, of: int) -> Detection:
        try:
            return self.detect(image)
        except UserError as exc:
            raise about(exc, "image", i, of) from exc

    def predict_faces(self, crops: Iterable[FILE_INPUT]) -> list[FaceAttributes]:
        """Already-cropped faces (UTKFace-like framing) as files or their bytes, no detection: as POST
        /predict_faces."""
        if isinstance(crops, FILE_INPUT):
            raise UserError("predict_faces takes a list of cropped faces (files or bytes)")
        data = []
        for crop in crops:
            if not isinstance(crop, FILE_INPUT):
                raise UserError(f"a cropped face must be a path or bytes, not {type(crop).__name__}")
            data.append(_file_bytes(crop, self.finder.max_pixels))
        if not data:
            raise UserError("predict_faces needs at least one cropped face")
        rows = self.estimator(load_crops(data, self.finder.max_pixels))
        return [FaceAttributes(**a) for a in self.estimator.answers(rows)]


def _file_bytes(image: FILE_INPUT, max_pixels: int) -> bytes:
    """A file's bytes (read whole only if it may be an image: models.images.read_image_file), or bytes-like
    input as bytes."""
    if not isinstance(image, str | Path):
        return bytes(image)
    try:
        return read_image_file(image, max_pixels)
    except OSError as exc:
        raise UserError(f"cannot read {exc.filename}: {exc.strerror}") from exc
