"""Face detection and alignment on real photographs, both detectors; decoding of bad uploads."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.errors import TooLarge, UserError
from models.faces import CROP_SIZE, TEMPLATE, FaceDetector, align_crop, decode_image

from devtools.photos import ASTRONAUT_FACE_CENTRE, astronaut, box_centre, encode, group_photo, no_face


def _centre(face) -> np.ndarray:
    return box_centre(dict(zip(("x", "y", "width", "height"), face.box, strict=True)))


@pytest.mark.parametrize("name", ["yunet", "haar"])
def test_astronaut_found_by_both_detectors(name: str) -> None:
    detector = FaceDetector(name)
    assert detector.name == name
    (face,) = detector.detect(np.asarray(astronaut()))
    assert np.linalg.norm(_centre(face) - ASTRONAUT_FACE_CENTRE) < 20
    assert (face.landmarks is None) == (name == "haar")


def test_yunet_finds_every_face_and_no_false_ones() -> None:
    detector = FaceDetector()
    photo, centres = group_photo()
    faces = detector.detect(np.asarray(photo))
    assert len(faces) == 3 and [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    for face, centre in zip(faces, centres, strict=True):
        assert np.linalg.norm(_centre(face) - centre) < 0.2 * face.box[2]
    for name in ("coffee", "chelsea"):
        assert detector.detect(np.asarray(no_face(name))) == []


def test_min_face_size_and_threshold_are_applied() -> None:
    photo = np.asarray(group_photo()[0])
    assert len(FaceDetector(min_face_size=60).detect(photo)) == 1  # only the largest face is >= 60 px
    assert FaceDetector(score_threshold=0.99).detect(photo) == []


def test_unknown_detector_names_choices() -> None:
    with pytest.raises(UserError, match="unknown detector 'mtcnn'; choose from yunet, haar"):
        FaceDetector("mtcnn")


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
