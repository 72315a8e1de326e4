"""Face detection and alignment: photo in, faces out as UTKFace-like aligned 200x200 crops.

Default detector: YuNet (libfacedetection, PyPI `yuface`): boxes, scores and 5 landmarks, which align
each crop the way UTKFace's crops are aligned. Fallback where `yuface` cannot install (it ships one
wheel: CPython 3.11, x86_64 Linux): OpenCV's Haar cascade, the original project's detector; it gives
no landmarks (crops are then square boxes around the face) and no calibrated score (reported as 1.0).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from models.errors import TooLarge, UserError

CROP_SIZE = 200  # UTKFace's aligned crops are 200x200; the model's eval preset resizes from here
# 5-point template in a 200x200 crop (image-left eye, image-right eye, nose, mouth left, mouth right),
# approximating the framing of UTKFace's dlib-aligned chips (eyes at 36 % height, 30 % apart)
TEMPLATE = np.array([[70, 72], [130, 72], [100, 107], [77, 138], [123, 138]], dtype=np.float32)
DETECTORS = ("yunet", "haar")


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x, y, width, height in pixels of the decoded photo
    score: float
    landmarks: np.ndarray | None  # (5, 2) pixels, or None (Haar)

    @property
    def area(self) -> int:
        return self.box[2] * self.box[3]


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Upload bytes -> (H, W, 3) uint8 RGB, upright per EXIF. UserError for anything that is not one."""
    if not data:
        raise UserError("the file is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise TooLarge(f"the image has far more pixels than the limit of {max_pixels}") from None
    except Exception:
        raise UserError("the file is not an image PIL can read (send JPEG, PNG, WebP, BMP, GIF or TIFF)") from None
    if image.width * image.height > max_pixels:  # checked before decoding: decompression bombs stop here
        raise TooLarge(f"the image is {image.width}x{image.height} pixels; the limit is {max_pixels} pixels")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return np.asarray(image.convert("RGB"))
    except Exception as exc:
        raise UserError(f"the image is corrupt or truncated ({type(exc).__name__})") from None


class FaceDetector:
    def __init__(
        self,
        name: str = "yunet",
        score_threshold: float = 0.5,
        min_face_size: int = 20,
        max_side: int = 640,
    ) -> None:
        if name not in DETECTORS:
            raise UserError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
        if name == "yunet":
            try:
                import yuface  # noqa: F401
            except ImportError:
                name = "haar"  # no wheel for this platform: fall back, as documented
        self.name = name
        self.score_threshold = score_threshold
        self.min_face_size = min_face_size
        self.max_side = max_side  # detectors are run on a copy no larger than this: speed, and YuNet's range
        if name == "haar":
            self._haar = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces in an (H, W, 3) RGB photo, largest first."""
        scale = min(1.0, self.max_side / max(rgb.shape[:2]))
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
        faces = self._yunet(small) if self.name == "yunet" else self._haar_faces(small)
        h, w = rgb.shape[:2]
        out = []
        for box, score, marks in faces:
            x0, y0 = max(0, round(box[0] / scale)), max(0, round(box[1] / scale))
            x1, y1 = min(w, round((box[0] + box[2]) / scale)), min(h, round((box[1] + box[3]) / scale))
            if min(x1 - x0, y1 - y0) >= self.min_face_size:
                out.append(Face((x0, y0, x1 - x0, y1 - y0), score, None if marks is None else marks / scale))
        return sorted(out, key=lambda f: f.area, reverse=True)

    def _yunet(self, rgb: np.ndarray):
        import yuface

        scores, boxes, marks = yuface.detect(np.ascontiguousarray(rgb[:, :, ::-1]), conf=self.score_threshold)
        for s, b, m in zip(scores, boxes, marks, strict=True):
            yield b.astype(np.float32), float(s) / 100, m.astype(np.float32).reshape(5, 2)

    def _haar_faces(self, rgb: np.ndarray):
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        for box in self._haar.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5):
            yield box.astype(np.float32), 1.0, None


def align_crop(rgb: np.ndarray, face: Face, size: int = CROP_SIZE) -> np.ndarray:
    """(H, W, 3) photo -> (size, size, 3) crop framed like a UTKFace chip."""
    if face.landmarks is not None:  # similarity transform: rotation, uniform scale, translation
        matrix = cv2.estimateAffinePartial2D(face.landmarks, TEMPLATE * size / CROP_SIZE, method=cv2.LMEDS)[0]
    if face.landmarks is None or matrix is None:
        x, y, w, h = face.box
        s = size / (1.6 * max(w, h))  # the box covers brows to chin; add the margin UTKFace chips have
        matrix = np.array([[s, 0, size / 2 - s * (x + w / 2)], [0, s, size / 2 - s * (y + h / 2)]])
    scale = float(np.hypot(*matrix[0, :2]))
    if scale < 0.5:  # a large face: shrink first with area averaging so the warp does not alias
        shrink = 2 * scale
        rgb = cv2.resize(rgb, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        matrix = np.hstack([matrix[:, :2] / shrink, matrix[:, 2:]])
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
