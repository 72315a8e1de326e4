"""Decoding uploads (models/images.py): every format and mode to upright 8-bit RGB as Pillow sees it, and bad,
cut-short or costly files refused with a clear error."""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

import models.images
from devtools.photos import (
    astronaut,
    encode,
    many_scans_jpeg,
    one_bit_png,
)
from models.errors import NotAnImage, TooLarge, UserError
from models.faces import FaceDetector
from models.images import MAX_JPEG_MARKERS, MAX_JPEG_SCANS, MAX_PIXELS, decode_image, jpeg_scans, scan_end
from tests.conftest import ROOT

# decode_image: every Pillow mode to 8-bit RGB


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.uint32)[:, :, None]
    return ((rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _signed_16_bit_tiff(values: np.ndarray) -> bytes:
    """A little-endian TIFF of one strip of signed 16-bit samples (Pillow writes none; it reads them as "I")."""
    h, w = values.shape
    tags = [(256, w), (257, h), (258, 16), (259, 1), (262, 1), (273, 8 + 2 + 10 * 12 + 4), (277, 1), (278, h)]
    tags += [(279, values.nbytes), (339, 2)]  # 339 SampleFormat: 2, signed integers
    ifd = b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in tags)  # every value a LONG
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + struct.pack("<I", 0) + values.tobytes()


def _mode_cases() -> dict[str, tuple[bytes, np.ndarray, int]]:
    """name -> (file bytes, expected RGB, tolerance)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1] = 0, 255  # the full range: stretched values map back exactly
    grey = rgb[:, :, 0]
    alpha = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    grey3 = np.repeat(grey[:, :, None], 3, axis=2)
    bits = grey > 127
    palette = Image.fromarray(rgb).quantize(8)
    index = np.asarray(palette)
    lookup = np.asarray(palette.convert("RGB"))
    blocks = np.zeros((24, 32, 3), np.uint8)
    blocks[:, :16] = (255, 0, 0)
    blocks[:, 16:] = (0, 0, 255)
    frames = [Image.fromarray(blocks), Image.new("RGB", (32, 24), (0, 255, 0))]
    return {
        "RGB png": (encode(Image.fromarray(rgb), "PNG"), rgb, 0),
        "L png": (encode(Image.fromarray(grey), "PNG"), grey3, 0),
        "1 bmp": (encode(Image.fromarray(bits), "BMP"), np.repeat(bits[:, :, None] * 255, 3, 2).astype(np.uint8), 0),
        "P png": (encode(palette, "PNG"), lookup, 0),
        "P png, transparent entry": (
            encode(palette, "PNG", transparency=int(index[0, 0])),
            np.where((index == index[0, 0])[:, :, None], 255, lookup).astype(np.uint8),
            0,
        ),
        "RGBA png": (encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), _over_white(rgb, alpha), 1),
        "RGBA webp": (
            encode(Image.fromarray(np.dstack([rgb, alpha])), "WEBP", lossless=True),
            _over_white(rgb, alpha),
            1,
        ),
        "LA png": (encode(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"), _over_white(grey3, alpha), 1),
        "CMYK tiff": (encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"), rgb, 0),
        "I;16 png": (encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), grey3, 0),
        "I;16B tiff": (encode(Image.fromarray((grey.astype(np.uint16) * 257).astype(">u2")), "TIFF"), grey3, 0),
        "I tiff": (encode(Image.fromarray(grey.astype(np.int32) * 257), "TIFF"), grey3, 0),
        "I tiff, 8-bit values": (encode(Image.fromarray(grey.astype(np.int32)), "TIFF"), grey3, 0),
        "I;16 png, dark": (encode(Image.fromarray(grey.astype(np.uint16) // 4), "PNG"), np.zeros_like(grey3), 0),
        "I;16S tiff, dark": (_signed_16_bit_tiff(grey.astype("<i2") // 4), np.zeros_like(grey3), 0),
        "I tiff, negative": (encode(Image.fromarray(grey.astype(np.int32) * 1000 - 100_000), "TIFF"), grey3, 1),
        "F tiff, 0..1": (encode(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"), grey3, 0),
        "animated gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), blocks, 0),
        "MPO, first picture": (
            encode(
                Image.new("RGB", (32, 24), (40, 160, 90)),
                "MPO",
                save_all=True,
                append_images=[Image.new("RGB", (32, 24))],
            ),
            np.full((24, 32, 3), (40, 160, 90), np.uint8),
            3,
        ),
        "multi-page tiff": (encode(Image.fromarray(rgb), "TIFF", save_all=True, append_images=frames), rgb, 0),
    }


def test_decode_image_converts_every_mode() -> None:
    wrong = {}
    for name, (data, expected, tolerance) in _mode_cases().items():
        out = decode_image(data, 10**6)
        assert out.shape == expected.shape and out.dtype == np.uint8, name
        error = int(np.abs(out.astype(int) - expected.astype(int)).max())
        if error > tolerance:
            wrong[name] = error
    assert not wrong, f"max pixel error per mode: {wrong}"


def test_16_bit_greyscale_photo_finds_the_face_like_8_bit() -> None:
    grey = np.asarray(astronaut().convert("L"))
    eight = decode_image(encode(Image.fromarray(grey), "PNG"), 10**6)
    sixteen = decode_image(encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), 10**6)
    assert np.array_equal(eight, sixteen)
    detector = FaceDetector()
    assert len(detector.detect(eight)) == 1 and len(detector.detect(sixteen)) == 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_turns_photos_upright_as_pillow_does(orientation: int, fmt: str) -> None:
    """Every EXIF orientation, on both decoders' paths (simplejpeg for the JPEG, Pillow for the PNG)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    astronaut().resize((300, 200)).save(buf, format=fmt, exif=exif)
    pillows = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
    assert np.array_equal(decode_image(buf.getvalue(), 10**7), pillows)
    assert pillows.shape == ((200, 300, 3) if orientation < 5 else (300, 200, 3))


def test_decode_rejects_bad_files() -> None:
    with pytest.raises(UserError, match="empty"):
        decode_image(b"", 10**7)
    with pytest.raises(NotAnImage, match="starts like GIF but Pillow cannot read it"):
        decode_image(b"GIF89a but not really", 10**7)
    with pytest.raises(UserError, match="corrupt or truncated"):
        decode_image(encode(astronaut())[:1500], 10**7)
    with pytest.raises(TooLarge, match="limit"):
        decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), 9_999)


def test_a_jpeg_cut_short_and_closed_is_refused_and_camera_quirks_are_not() -> None:
    """A JPEG cut short then closed with an end marker (EOI): libjpeg only warns and fills the missing rows
    with grey, which Pillow answered as a photo. Extraneous bytes before a marker, which some cameras
    write, are a warning too, and keep their pixels."""
    photo = encode(astronaut())
    with pytest.raises(UserError, match="corrupt or truncated: its JPEG data ends before the last rows"):
        decode_image(photo[: len(photo) * 2 // 3] + b"\xff\xd9", 10**7)
    inflated = bytearray(photo)  # the header claims 60000 rows, the data holds 512: refused, not decoded grey
    frame = inflated.index(b"\xff\xc0")
    inflated[frame + 5 : frame + 7] = (60000).to_bytes(2, "big")
    with pytest.raises(UserError, match="data ends before the last rows"):
        decode_image(bytes(inflated), 10**8)
    tables = photo.index(b"\xff\xdb")
    quirk = photo[:tables] + b"\x00\x00" + photo[tables:]  # 2 extraneous bytes before marker 0xdb: a warning
    assert np.array_equal(decode_image(quirk, 10**7), decode_image(photo, 10**7))
    cmyk = encode(astronaut().convert("CMYK"))  # Pillow converts CMYK's colours; the check is libjpeg's still
    with pytest.raises(UserError, match="data ends before the last rows"):
        decode_image(cmyk[: len(cmyk) * 2 // 3] + b"\xff\xd9", 10**7)
    mpo = io.BytesIO()  # a JPEG with an index of more pictures after it, which phones write: the same check
    astronaut().save(mpo, "MPO", save_all=True, append_images=[astronaut().resize((64, 64))])
    with pytest.raises(UserError, match="data ends before the last rows"):
        decode_image(mpo.getvalue()[: len(mpo.getvalue()) // 3] + b"\xff\xd9", 10**7)
    padded = photo[:-2] + bytes(512)  # every row, then zeros where the end marker belongs: a warning too
    assert np.array_equal(decode_image(padded, 10**7), decode_image(photo, 10**7))
    with pytest.raises(UserError, match="corrupt or truncated"):  # cut short without an end marker
        decode_image(photo[: len(photo) * 2 // 3], 10**7)


def test_a_jpeg_of_more_than_8_bits_a_sample_is_named_as_such() -> None:
    photo = bytearray(encode(astronaut()))
    frame = photo.index(b"\xff\xc0")
    photo[frame + 4] = 12  # the frame header's precision: a 12-bit JPEG (medical, raw-camera), which Pillow cannot read
    with pytest.raises(NotAnImage, match="the JPEG has 12-bit samples: send an 8-bit JPEG"):
        decode_image(bytes(photo), 10**7)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("subsampling", [0, 2])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_pixels_are_pillows(mode: str, subsampling: int, progressive: bool) -> None:
    """simplejpeg decodes JPEGs for its speed and its strictness, to exactly the pixels Pillow gives (the
    network was trained on Pillow's): colour, grey and CMYK (Pillow's path), 4:4:4 and 4:2:0, progressive,
    at an odd size."""
    buf = io.BytesIO()
    astronaut().resize((333, 517)).convert(mode).save(buf, "JPEG", subsampling=subsampling, progressive=progressive)
    pillows = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(decode_image(buf.getvalue(), 10**7), pillows)
    if mode != "CMYK":  # simplejpeg's own pixels, not Pillow's fallback's
        assert np.array_equal(models.images._jpeg_rgb(buf.getvalue(), ""), pillows)


def test_a_huge_header_is_refused_without_pillows_warning() -> None:
    """100 Mpx: over Pillow's warning level (89 Mpx), under its error level. The 413 says what is wrong;
    Pillow's warning would reach stderr outside the request's log lines. A fresh interpreter: warning
    filters are process-wide, and pytest's own would hide the difference."""
    script = """
import io, sys
from PIL import Image
from models.errors import TooLarge
from models.images import decode_image
buf = io.BytesIO()
Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
try:
    decode_image(buf.getvalue(), 50_000_000)
except TooLarge as exc:
    print(exc)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "the image is 10000x10000 pixels; the limit is 50000000 pixels"
    assert result.stderr == ""


# ValueError: a type that also means a corrupt file when the decoder raises it, not when our conversion does
@pytest.mark.parametrize("failure", [ValueError("a conversion bug"), MemoryError()])
def test_unexpected_decode_failures_are_logged_and_kept_apart(failure: Exception, monkeypatch, caplog) -> None:
    """A failure no file fault explains is logged with its traceback and answered as undecodable (not as
    "corrupt"); running out of memory is the server's trouble and goes on up; AGE_GENDER_DEBUG=1 re-raises."""

    def broken(image):
        raise failure

    monkeypatch.setattr(models.images, "_to_rgb", broken)  # Pillow's path: every format but (most) JPEGs
    photo = encode(astronaut(), "PNG")
    if isinstance(failure, MemoryError):
        with pytest.raises(MemoryError):
            decode_image(photo, 10**7)
        monkeypatch.setattr(models.images.simplejpeg, "decode_jpeg", lambda *_, **__: broken(None))
        with pytest.raises(MemoryError):
            decode_image(encode(astronaut()), 10**7)
        return
    with caplog.at_level("ERROR", logger="models.images"), pytest.raises(UserError, match="could not be decoded"):
        decode_image(photo, 10**7)
    (record,) = caplog.records
    assert "decoding a PNG image of 512x512 failed" in record.getMessage() and record.exc_info[1] is failure
    monkeypatch.setenv("AGE_GENDER_DEBUG", "1")
    with pytest.raises(ValueError, match="a conversion bug"):
        decode_image(photo, 10**7)


def test_decoding_cost_is_bounded_before_decoding() -> None:
    """Files whose decoding costs far more CPU than their size suggests are refused from their headers."""
    with pytest.raises(TooLarge, match="pixels per byte"):
        decode_image(one_bit_png(7071), MAX_PIXELS)  # 50 Mpx in ~6 kB: 6 s of CPU to decode
    with pytest.raises(TooLarge, match="progressive scans"):
        decode_image(many_scans_jpeg(astronaut(), MAX_JPEG_SCANS + 1), MAX_PIXELS)
    assert decode_image(many_scans_jpeg(astronaut(), MAX_JPEG_SCANS), MAX_PIXELS).shape == (512, 512, 3)
    # what encoders write passes, and scans are counted only where scans can be
    assert jpeg_scans(encode(astronaut(), "JPEG")) == 1
    assert jpeg_scans(encode(astronaut(), "JPEG", progressive=True)) == 10
    assert jpeg_scans(encode(astronaut(), "JPEG", comment=b"\xff\xda" * 500)) == 1  # SOS markers in a comment
    motion = encode(astronaut(), "JPEG") + np.random.default_rng(0).bytes(8 << 20)  # a phone's video after EOI
    assert jpeg_scans(motion) == 1 and decode_image(motion, MAX_PIXELS).shape == (512, 512, 3)
    # what libjpeg steps over on its way to the next marker hides no scans: an APP segment of length 0, a
    # stray byte between segments, a stuffed zero there
    bomb = many_scans_jpeg(astronaut(), MAX_JPEG_SCANS + 1)
    tables = bomb.index(b"\xff\xdb")
    for stray in (b"\x00", b"\xff\x00"):
        assert jpeg_scans(bomb[:tables] + stray + bomb[tables:]) == MAX_JPEG_SCANS + 1
    with pytest.raises(TooLarge, match="progressive scans"):
        decode_image(bomb[:2] + b"\xff\xef\x00\x00" + bomb[2:], MAX_PIXELS)
    photo = encode(astronaut(), "JPEG")  # markers enough to keep the checks' loop busy: refused after a bound
    end = scan_end(photo, photo.index(b"\xff\xda"))
    assert jpeg_scans(photo[:end] + b"\xff\x01" * MAX_JPEG_MARKERS + photo[end:]) == MAX_JPEG_SCANS + 1
    assert decode_image(encode(Image.new("RGB", (4000, 3000)), "PNG"), MAX_PIXELS).shape == (3000, 4000, 3)


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"", "not an image in an accepted format"),  # zeros, as `truncate -s 4G` leaves
        (b"\x89PNG\r\n\x1a\n", "more than any image of at most 1000000 pixels takes"),
    ],
)
def test_a_huge_file_is_refused_from_its_first_bytes(head: bytes, message: str, tmp_path) -> None:
    """A 4 GB (sparse) file, in a process that may map 3 GB: read whole, it would fail with MemoryError."""
    path = tmp_path / "huge.png"
    with path.open("wb") as f:
        f.write(head)
        f.truncate(4 << 30)
    script = (
        "import resource, sys\n"
        "from models.errors import UserError\n"
        "from models.images import read_image_file\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "try:\n"
        f"    read_image_file({str(path)!r}, 1_000_000)\n"
        "except UserError as exc:\n"
        "    print(exc)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and message in r.stdout, r.stderr[-500:]
