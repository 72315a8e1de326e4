"""Face detection and alignment on real photographs, both detectors: faces found, framed, bounded in work."""

from __future__ import annotations

import gc
import io
import os

import numpy as np
import pytest
from PIL import Image

import models.mtcnn
from devtools.launch import smaps_kb
from devtools.photos import (
    ASTRONAUT_FACE_CENTRE,
    astronaut,
    box_centre,
    composite,
    face_grid,
    face_template,
    group_photo,
    no_face,
)
from models.errors import UserError
from models.faces import CROP_SIZE, MAX_FACES, REFINE_BUDGET, DetectorConfig, FaceDetector, align_crop, similarity
from models.images import decode_image
from models.mtcnn import ONET_PER_FACE, RNET_PER_FACE


def _centre(face) -> np.ndarray:
    return box_centre(dict(zip(("x", "y", "width", "height"), face.box, strict=True)))


@pytest.mark.parametrize("name", ["mtcnn", "haar"])
def test_astronaut_found_by_both_detectors(name: str) -> None:
    detector = FaceDetector(DetectorConfig(name))
    assert detector.name == name
    (face,) = detector.detect(np.asarray(astronaut()))
    assert np.linalg.norm(_centre(face) - ASTRONAUT_FACE_CENTRE) < 20
    assert (face.landmarks is None) == (name == "haar")


def test_mtcnn_finds_every_face_and_no_false_ones() -> None:
    detector = FaceDetector()
    photo, centres = group_photo()
    faces = detector.detect(np.asarray(photo))
    assert len(faces) == 3 and [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    for face, centre in zip(faces, centres, strict=True):
        assert np.linalg.norm(_centre(face) - centre) < 0.2 * face.box[2]
    for name in ("coffee", "chelsea"):
        assert detector.detect(np.asarray(no_face(name))) == []


@pytest.mark.parametrize("quality", [75, 92])
def test_jpeg_artefacts_are_not_faces_at_the_default_threshold(quality: int) -> None:
    """MTCNN scored a patch of the astronaut's JPEG-compressed suit 0.90-0.91; faces score 0.99-1.0."""
    out = io.BytesIO()
    astronaut().save(out, format="JPEG", quality=quality)
    (face,) = FaceDetector().detect(decode_image(out.getvalue(), 10**8))
    assert np.linalg.norm(_centre(face) - ASTRONAUT_FACE_CENTRE) < 20
    assert len(FaceDetector(DetectorConfig(score_threshold=0.5)).detect(decode_image(out.getvalue(), 10**8))) == 2


def test_min_face_size_and_threshold_are_applied() -> None:
    photo = np.asarray(group_photo()[0])
    assert len(FaceDetector(DetectorConfig(min_face_size=60)).detect(photo)) == 1  # only the largest face is >= 60 px
    # MTCNN's scores for clear faces are all close to 1: put the threshold between the two lowest
    scores = sorted(face.score for face in FaceDetector().detect(photo))
    assert len(scores) == 3 and 0.5 <= scores[0] < scores[1] <= 1
    above = [f.score for f in FaceDetector(DetectorConfig(score_threshold=(scores[0] + scores[1]) / 2)).detect(photo)]
    assert sorted(above) == scores[1:]
    with pytest.raises(UserError, match="score_threshold must be 0-1, not 1.01"):  # it would never find a face
        DetectorConfig(score_threshold=1.01)


@pytest.mark.parametrize("name", ["mtcnn", "haar"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 640), (640, 1), (2, 5000), (5000, 2), (11, 400), (0, 300), (12, 12)])
def test_thin_and_tiny_images_give_no_faces(name: str, shape: tuple[int, int]) -> None:
    rgb = np.full((*shape, 3), 128, np.uint8)
    assert FaceDetector(DetectorConfig(name)).detect(rgb) == []
    # the same with a real photo squeezed into the shape: still no face, no crash
    squeezed = np.asarray(astronaut().resize((max(shape[1], 1), max(shape[0], 1))))[: shape[0], : shape[1]]
    assert FaceDetector(DetectorConfig(name)).detect(squeezed) == []


def _pss() -> int:
    """This process's anonymous PSS in bytes: the heap, where a leak grows. The file part of PSS moves by
    megabytes as other processes map or unmap the same libraries."""
    sizes = smaps_kb()
    return sizes.get("Pss_Anon", sizes["Pss"]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/self/smaps_rollup")
def test_detector_does_not_leak() -> None:
    """yuface, the previous detector, kept ~35 kB per call (its arrays had an extra reference): 50 MB here."""
    cx, cy = ASTRONAUT_FACE_CENTRE
    head = np.asarray(astronaut().crop((cx - 80, cy - 80, cx + 80, cy + 80)).resize((120, 120)))
    detector = FaceDetector(DetectorConfig(min_face_size=50))  # a small photo and few pyramid levels: fast calls
    assert len(detector.detect(head)) == 1
    for _ in range(100):
        detector.detect(head)
    gc.collect()
    before = _pss()
    for _ in range(1500):
        detector.detect(head)
    gc.collect()
    growth = _pss() - before
    assert growth < 5 * 2**20, f"the process grew by {growth / 2**20:.1f} MB in 1,500 detections"


def test_unknown_detector_names_choices() -> None:
    with pytest.raises(UserError, match="unknown detector 'retina'; choose from mtcnn, haar"):
        FaceDetector(DetectorConfig("retina"))


# Where MTCNN finds the five points (eyes, nose, mouth corners) on UTKFace's aligned chips, in chip pixels:
# the median over 1,482 chips, each padded by 100 px of its edge pixels into a photo. A measurement of the
# data set, kept here so that the framing is guarded where the data set cannot go; `python -m
# benchmarks.utkface` measures the served framing on real chips.
UTKFACE_CHIP_POINTS = np.array(
    [[58.84, 56.82], [137.02, 56.73], [97.36, 104.12], [62.39, 137.76], [133.07, 137.86]], dtype=np.float32
)


def test_served_crop_frames_a_real_face_as_utkface_chips_are_framed() -> None:
    """A real face's served crop, looked at again by the detector, has its five points where UTKFace's chips
    have them: the transform between the two is identity within 3 % of scale and 3 px of shift. A model
    trained on chips then sees served faces at the size and place it learned them."""
    rgb = np.asarray(astronaut())
    crop = align_crop(rgb, FaceDetector().detect(rgb)[0])
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8
    again = FaceDetector(DetectorConfig(min_face_size=10)).detect(
        np.pad(crop, ((100, 100), (100, 100), (0, 0)), mode="edge")
    )
    points = again[0].landmarks - 100  # (5, 2) in crop pixels
    m = similarity(points, UTKFACE_CHIP_POINTS)  # crop -> chip framing
    scale = float(np.hypot(*m[:, 0]))
    centre = np.array([CROP_SIZE / 2, CROP_SIZE / 2])
    shift = float(np.hypot(*(m[:, :2] @ centre + m[:, 2] - centre)))
    assert abs(scale - 1) <= 0.03 and shift <= 3, f"scale {scale:.3f}, shift {shift:.1f} px"


def test_similarity_recovers_a_known_transform_and_never_mirrors() -> None:
    points = np.random.default_rng(0).uniform(0, 200, (5, 2))
    angle = 0.3
    matrix = np.hstack([1.7 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]), [[5], [-7]]])
    assert np.allclose(similarity(points, points @ matrix[:, :2].T + matrix[:, 2]), matrix)
    mirrored = similarity(points, points * [-1, 1])  # no rotation maps points onto their mirror image
    assert np.linalg.det(mirrored[:, :2]) > 0


def _found(detector: FaceDetector, rgb: np.ndarray, truth: list) -> int:
    """How many of the pasted faces (size, x, y, w, h) have a detected box centred inside them."""
    boxes = [f.box for f in detector.detect(rgb)]
    return sum(
        any(x <= bx + bw / 2 <= x + w and y <= by + bh / 2 <= y + h for bx, by, bw, bh in boxes)
        for _, x, y, w, h in truth
    )


def test_small_faces_in_a_large_photo() -> None:
    """Faces 24-48 px wide in a 4000x3000 photo: lost on the 640 px copy alone, found by the second pass."""
    rgb, truth = composite(np.random.default_rng(3), 6)  # face widths 24, 32, 48, 64, 96, 128
    small = [t for t in truth if t[0] <= 48]
    assert _found(FaceDetector(DetectorConfig(small_faces=False)), rgb, small) == 0
    assert _found(FaceDetector(), rgb, small) == len(small) == 3


@pytest.mark.parametrize(
    ("canvas", "width", "config"),
    [
        ((1280, 960), 32, DetectorConfig()),  # 16 px on the 640 px copy: found again at its own size
        ((1280, 960), 48, DetectorConfig()),
        ((4000, 3000), 96, DetectorConfig()),  # 15 px on the copy: found again on a shrunk region of the photo
        ((4000, 3000), 120, DetectorConfig(small_faces=False)),
        ((4000, 3000), 250, DetectorConfig()),  # 40 px on the copy
        ((4000, 3000), 64, DetectorConfig(min_face_size=15)),  # the second pass's, 51 px on its 0.8x copy
    ],
)
def test_a_face_small_on_the_shrunk_copy_gets_landmarks_from_the_photos_pixels(canvas, width, config) -> None:
    """Detection runs on a copy of at most 640 px a side; the crop is framed by the landmarks. A face 8-24 px
    wide on that copy had its landmarks off by 4-8 % of its width; found again on the photo's own pixels
    (or by the second pass), they are as near as on a face of its size in a photo that is not shrunk."""
    template, (_, _, face_width, _) = face_template()
    truth = FaceDetector().detect(np.asarray(template))[0].landmarks  # 90 px wide in a small photo: precise
    s = width / face_width
    photo = no_face("coffee").resize(canvas)
    photo.paste(template.resize((round(template.width * s), round(template.height * s)), Image.LANCZOS), (300, 200))
    faces = FaceDetector(config).detect(np.asarray(photo))
    assert len(faces) == 1
    error = np.linalg.norm(faces[0].landmarks - ((truth + 0.5) * s - 0.5 + (300, 200)), axis=1).mean()
    assert error < 0.02 * width, f"landmarks off by {error / width:.1%} of the face's width"


def test_finding_a_face_again_runs_only_its_best_candidates(monkeypatch) -> None:
    """REFINE_BUDGET: R-Net and O-Net see a third of one face's candidates (4 and 2), not 12 and 6."""
    _, rnet, onet = models.mtcnn.nets()
    batches = {rnet: [], onet: []}
    run = models.mtcnn._run
    monkeypatch.setattr(models.mtcnn, "_run", lambda net, x: batches.get(net, []).append(len(x)) or run(net, x))
    boxes, *_ = models.mtcnn.detect(np.asarray(astronaut()), 0.95, 60, REFINE_BUDGET)
    assert len(boxes) == 1
    assert batches[rnet] == [4] and 0 < max(batches[onet]) <= 2  # RNET_PER_FACE 12, ONET_PER_FACE 6


def test_only_the_answered_faces_are_found_again(monkeypatch) -> None:
    """Faces 100-250 px wide in a 4000x3000 photo are 16-40 px on the 640 px copy, each found again on the
    photo's pixels (with or without the second pass); with a face limit, only the faces answered are."""
    rgb, _ = composite(np.random.default_rng(5), 4, sizes=(100, 150, 200, 250))
    detect, again = models.mtcnn.detect, []

    def counted(image, threshold, min_size, budget, *args, **kwargs):
        if budget == REFINE_BUDGET:
            again.append(image.shape)
        return detect(image, threshold, min_size, budget, *args, **kwargs)

    monkeypatch.setattr(models.mtcnn, "detect", counted)
    for limit, expected in ((10, 4), (2, 2)):
        again.clear()
        faces = FaceDetector(DetectorConfig(small_faces=False, max_faces=limit)).detect(rgb)
        assert len(faces) == len(again) == expected


def test_a_face_is_not_found_again_on_its_neighbours_box() -> None:
    """Finding a face again takes a box overlapping the first one by SAME_FACE (0.3), so in a crowd the face
    found could be a neighbour's, answered twice while the face itself is lost: such a box is not taken."""
    template, (_, _, face_width, _) = face_template()
    photo = no_face("coffee").resize((1280, 960))
    s = 32 / face_width  # 16 px on the 640 px copy: found again
    photo.paste(template.resize((round(template.width * s), round(template.height * s)), Image.LANCZOS), (300, 200))
    rgb, detector = np.asarray(photo), FaceDetector()
    (face,) = detector.detect(rgb)
    x, y, w, h = face.box
    # the face's first box a little off, and a neighbour's overlapping the face by 0.4 of its width, as a
    # first pass might place them
    boxes = np.array([[x + 0.15 * w, y, x + 1.15 * w, y + h], [x + 0.6 * w, y, x + 1.6 * w, y + h]], np.float32)
    marks = np.stack([face.landmarks + (0.15 * w, 0), face.landmarks + (0.6 * w, 0)])
    neighbour = boxes[1].copy()
    detector._refine(rgb, boxes, marks, np.full(2, 0.5))
    assert np.abs(boxes[0] - (x, y, x + w, y + h)).max() < 0.1 * w  # the face's own box: found again in place
    assert np.array_equal(boxes[1], neighbour), "the neighbour's box moved onto the face"


def test_faces_of_16_px_in_a_phone_photo_with_the_smallest_face_size() -> None:
    """MTCNN finds faces from ~1.3x the smallest size it looks for: at 12 px, the second pass works on the
    whole 12 Mpx photo and finds faces of 16 px."""
    rgb, truth = composite(np.random.default_rng(4), 4, sizes=(16,))
    assert _found(FaceDetector(DetectorConfig(min_face_size=12)), rgb, truth) == len(truth)


def test_face_limit_answers_the_largest_and_counts_the_rest() -> None:
    photo, centres = group_photo()  # faces of 380, 240 and 170 px photos, largest first
    faces, found = FaceDetector(DetectorConfig(max_faces=2)).find(np.asarray(photo))
    assert found == 3 and len(faces) == 2
    assert all(np.linalg.norm(_centre(f) - c) < 30 for f, c in zip(faces, centres[:2], strict=True))
    assert len(FaceDetector(DetectorConfig(max_faces=3)).detect(np.asarray(photo))) == 3
    with pytest.raises(UserError, match="max_faces must be at least 1, not 0"):
        FaceDetector(DetectorConfig(max_faces=0))
    with pytest.raises(UserError, match="min_face_size must be at least 1, not 0"):  # divided by
        FaceDetector(DetectorConfig(min_face_size=0))


def test_work_per_photo_is_bounded_by_the_face_limit(monkeypatch) -> None:
    """A photo of 400 faces: R-Net and O-Net see at most their share of candidates per face that may be
    answered (sized for MAX_FACES however low the limit), and neither the second pass nor the finding again
    of faces small on the shrunk copy runs."""
    _, rnet, onet = models.mtcnn.nets()
    batches = {rnet: [], onet: []}
    run = models.mtcnn._run
    monkeypatch.setattr(models.mtcnn, "_run", lambda net, x: batches.get(net, []).append(len(x)) or run(net, x))
    monkeypatch.setattr(FaceDetector, "_with_small_faces", lambda *_: pytest.fail("the second pass ran"))
    faces, found = FaceDetector(DetectorConfig(max_faces=10)).find(face_grid(20, 100))
    assert len(faces) == 10 and found > MAX_FACES
    assert batches[rnet] == [RNET_PER_FACE * MAX_FACES] and len(batches[onet]) == 1
    assert batches[onet][0] <= ONET_PER_FACE * MAX_FACES


@pytest.mark.parametrize("shape", [(160, 160), (161, 203), (75, 140)])
def test_pnet_on_tiles_equals_pnet_on_the_whole_level(shape: tuple[int, int], monkeypatch) -> None:
    """P-Net runs on tiles of a pyramid level for speed; side by side, their outputs are the whole level's,
    at every window (odd sizes included, where P-Net's pooling adds a window at the far edge)."""
    level = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    pnet = models.mtcnn.nets()[0]
    reg, prob = models.mtcnn._run(pnet, models.mtcnn._mtcnn_input(level)[None])
    monkeypatch.setattr(models.mtcnn, "TILE", 32)  # several tiles each way, and a short last one
    tiled_reg, tiled_prob = models.mtcnn._pnet(pnet, level)
    assert tiled_reg.shape == reg[0].shape and tiled_prob.shape == prob[0, :, :, 1].shape
    np.testing.assert_allclose(tiled_reg, reg[0], atol=1e-5)
    np.testing.assert_allclose(tiled_prob, prob[0, :, :, 1], atol=1e-5)


def test_candidates_in_batches_get_the_answers_of_one_run() -> None:
    """R-Net and O-Net run mtcnn.BATCH candidates at a time (bounded memory); the answers are one run's."""
    onet = models.mtcnn.nets()[2]
    crops = np.random.default_rng(0).uniform(-1, 1, (2 * models.mtcnn.BATCH + 5, 48, 48, 3)).astype(np.float32)
    whole = onet.run(None, {onet.get_inputs()[0].name: crops})
    batched = models.mtcnn._run(onet, crops)
    assert [a.shape for a in batched] == [a.shape for a in whole]
    for a, b in zip(batched, whole, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, over_smaller: bool) -> list[int]:
    """Non-maximum suppression as written in the MTCNN papers' code: the best box left is kept and every
    box overlapping it more than threshold dropped, until none is left."""
    x0, y0, x1, y1 = boxes.T
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        i, order = order[0], order[1:]
        keep.append(i)
        rest = np.array(order, dtype=np.int64)
        inter = np.maximum(0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1) * np.maximum(
            0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1
        )
        overlap = inter / (np.minimum(area[i], area[rest]) if over_smaller else area[i] + area[rest] - inter)
        order = [j for j, o in zip(order, overlap, strict=True) if o <= threshold]
    return keep


@pytest.mark.parametrize("pairs", [models.mtcnn.PAIRS, 50])
def test_nms_keeps_what_greedy_suppression_keeps(pairs: int, monkeypatch) -> None:
    """The NMS that looks only at pairs whose x ranges meet (PAIRS at a time) keeps the same boxes, in the
    same order, as the textbook loop: fractional and one-pixel boxes, tied scores, both kinds of overlap."""
    monkeypatch.setattr(models.mtcnn, "PAIRS", pairs)
    rng = np.random.default_rng(0)
    for trial in range(120):
        n = int(rng.integers(0, 300))
        corner = rng.integers(0, 200, (n, 2)) + rng.choice([0, 0.37, -0.5, 0.999], (n, 2))
        side = rng.integers(0, 60, (n, 1)) + rng.choice([0, 0.5], (n, 1))
        boxes, scores = np.hstack([corner, corner + side]), rng.choice(np.linspace(0.6, 1, 30), n)
        threshold, over_smaller = (0.3, 0.5, 0.7)[trial % 3], trial % 4 == 0
        expected = _greedy_nms(boxes, scores, threshold, over_smaller)
        assert models.mtcnn._nms(boxes, scores, threshold, over_smaller).tolist() == expected
