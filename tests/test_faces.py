"""Face detection and alignment on real photographs, both detectors; decoding of bad uploads."""

from __future__ import annotations

import gc
import io
import os

import numpy as np
import pytest
from PIL import Image

from devtools.launch import smaps_kb
from devtools.photos import ASTRONAUT_FACE_CENTRE, astronaut, box_centre, encode, group_photo, no_face
from models.errors import TooLarge, UserError
from models.faces import CROP_SIZE, TEMPLATE, FaceDetector, align_crop
from models.images import decode_image


def _centre(face) -> np.ndarray:
    return box_centre(dict(zip(("x", "y", "width", "height"), face.box, strict=True)))


@pytest.mark.parametrize("name", ["mtcnn", "haar"])
def test_astronaut_found_by_both_detectors(name: str) -> None:
    detector = FaceDetector(name)
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
    assert len(FaceDetector(score_threshold=0.5).detect(decode_image(out.getvalue(), 10**8))) == 2


def test_min_face_size_and_threshold_are_applied() -> None:
    photo = np.asarray(group_photo()[0])
    assert len(FaceDetector(min_face_size=60).detect(photo)) == 1  # only the largest face is >= 60 px
    # MTCNN's scores for clear faces are all close to 1: put the threshold between the two lowest
    scores = sorted(face.score for face in FaceDetector().detect(photo))
    assert len(scores) == 3 and 0.5 <= scores[0] < scores[1] <= 1
    above = [f.score for f in FaceDetector(score_threshold=(scores[0] + scores[1]) / 2).detect(photo)]
    assert sorted(above) == scores[1:]
    assert FaceDetector(score_threshold=1.01).detect(photo) == []


@pytest.mark.parametrize("name", ["mtcnn", "haar"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 640), (640, 1), (2, 5000), (5000, 2), (11, 400), (0, 300), (12, 12)])
def test_thin_and_tiny_images_give_no_faces(name: str, shape: tuple[int, int]) -> None:
    rgb = np.full((*shape, 3), 128, np.uint8)
    assert FaceDetector(name).detect(rgb) == []
    # the same with a real photo squeezed into the shape: still no face, no crash
    squeezed = np.asarray(astronaut().resize((max(shape[1], 1), max(shape[0], 1))))[: shape[0], : shape[1]]
    assert FaceDetector(name).detect(squeezed) == []


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
    detector = FaceDetector(min_face_size=50)  # a small photo and few pyramid levels: fast calls
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
        FaceDetector("retina")


def test_aligned_crop_puts_the_eyes_on_the_template() -> None:
    rgb = np.asarray(astronaut())
    face = FaceDetector().detect(rgb)[0]
    crop = align_crop(rgb, face)
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8
    # detect again on the crop: its eyes land near the template's eye points
    again = FaceDetector(min_face_size=10).detect(np.pad(crop, ((100, 100), (100, 100), (0, 0)), mode="edge"))
    eyes = again[0].landmarks[:2] - 100
    assert np.abs(eyes - TEMPLATE[:2]).max() < 12


def test_decode_rotates_by_exif_and_rejects_bad_files() -> None:
    image = astronaut().resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), 10**7).shape == (300, 200, 3)  # upright: height 300, width 200
    with pytest.raises(UserError, match="empty"):
        decode_image(b"", 10**7)
    with pytest.raises(UserError, match="not an image"):
        decode_image(b"GIF89a but not really", 10**7)
    with pytest.raises(UserError, match="corrupt or truncated"):
        decode_image(encode(astronaut())[:1500], 10**7)
    with pytest.raises(TooLarge, match="limit"):
        decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), 9_999)


def test_small_faces_in_a_large_photo() -> None:
    """Faces 24-48 px wide in a 4000x3000 photo: lost on the 640 px copy alone, found by the second pass."""
    from devtools.photos import composite

    rgb, truth = composite(np.random.default_rng(3), 6)  # face widths 24, 32, 48, 64, 96, 128
    small = [t for t in truth if t[0] <= 48]

    def found(detector: FaceDetector) -> int:
        boxes = [f.box for f in detector.detect(rgb)]
        return sum(
            any(x <= bx + bw / 2 <= x + w and y <= by + bh / 2 <= y + h for bx, by, bw, bh in boxes)
            for _, x, y, w, h in small
        )

    assert found(FaceDetector(small_faces=False)) == 0
    assert found(FaceDetector()) == len(small) == 3
