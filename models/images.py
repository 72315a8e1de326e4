"""Decoding uploads: bytes -> an upright 8-bit RGB array, whatever the image's mode, or a UserError.

The accepted formats are recognised from the bytes (magic number, then Pillow's reader for that format
only), never from the client's declared content type. What decoding will cost is bounded before anything
is decoded, from the header and the bytes: pixels, pixels per byte of file, and a JPEG's scans.

JPEGs are decoded by simplejpeg: libjpeg-turbo as in Pillow, with the same pixels (all 23,707 UTKFace chips
and the test photos, compared), a little faster (a 12 Mpx photo: 97 against 140 CPU ms), and it reports
what libjpeg only warns of and Pillow lets pass: a file whose data ends early but is closed by an end
marker, whose missing rows would decode grey. CMYK JPEGs are only checked that way; Pillow converts them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterator

import numpy as np
import simplejpeg
from PIL import Image

from models.errors import NotAnImage, TooLarge, UserError, debugging

# The image formats taken everywhere (uploads, the batch command's folders, training data): Pillow's name ->
# file name suffixes. A file's format is recognised from its bytes (magic number, then Pillow's reader for
# that format only), never from a client's declared content type; suffixes only pick files out of folders.
IMAGE_FORMATS = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
}
IMAGE_SUFFIXES = tuple(suffix for suffixes in IMAGE_FORMATS.values() for suffix in suffixes)
_SHOWN = [{"WEBP": "WebP"}.get(name, name) for name in IMAGE_FORMATS]
FORMAT_NAMES = ", ".join(_SHOWN[:-1]) + " or " + _SHOWN[-1]  # "JPEG, PNG, WebP, BMP, GIF or TIFF"
MAX_PIXELS = 50_000_000  # default limit per photo, read from its header before decoding
# Decoding costs CPU in proportion to pixels, not bytes: a 6 kB 1-bit PNG of 7071x7071 took 6 s. Photos
# compress to 1-20 pixels per byte; an even colour as a 12 Mpx PNG ~350 (deflate's ceiling is ~1,032:1 on
# 3 bytes per pixel), as a JPEG ~100. Beyond this, the file is built to be small, not to be a photo.
MAX_PIXELS_PER_BYTE = 1_000
# A progressive JPEG's decoder goes over the whole picture once per scan. Encoders write 1 (baseline),
# 6 (greyscale) or 10 (libjpeg's and mozjpeg's progressive scripts for colour) scans; 2,000 crafted scans
# cost 0.48 s at 4 Mpx, growing with pixels x scans. 100 leaves encoders ten times their need.
MAX_JPEG_SCANS = 100
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)
# ...and every marker is a step of a Python loop in the public API's checks: a file of more markers than
# any photo (which has tens; a thousand with restart markers, skipped inside scans) is refused as costly
MAX_JPEG_MARKERS = 10_000
STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD9)])  # TEM, RST0-7, SOI: no length field
FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0-15 (0xC4, 0xC8, 0xCC are others)
TOO_MANY_MARKERS = -1  # what _jpeg_markers yields last for a file past MAX_JPEG_MARKERS (no marker is negative)
# where libjpeg's next_marker finds the next marker: it skips any bytes up to 0xFF, fill bytes (0xFF) and
# stuffed zeros (0xFF 0x00); group 1 is the marker
_NEXT_MARKER = re.compile(rb"\xff+([^\x00\xff])")
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # 0xFF, then neither stuffing, a restart nor fill
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# An image of max_pixels takes at most this many bytes a pixel in any accepted format (16-bit RGBA TIFF, 8),
# plus FILE_SLACK bytes of metadata (EXIF, ICC profiles, thumbnails): a larger file is read no further
MAX_BYTES_PER_PIXEL = 8
FILE_SLACK = 16 * 1024 * 1024
NOT_AN_IMAGE = f"the file is not an image in an accepted format (send {FORMAT_NAMES})"
# what Pillow's decoders raise on truncated or corrupt data (OSError: truncated; SyntaxError: a broken PNG
# chunk or TIFF tag; zlib.error, struct.error: broken compressed or packed fields)
CORRUPT = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
# libjpeg's warning for entropy-coded data that ends, at a marker, before the picture does (JWRN_HIT_MARKER:
# rows missing). Its other warnings keep the pixels as Pillow keeps them: extraneous bytes before a marker
# (which some cameras write), a file that ends without its end marker (JWRN_JPEG_EOF: Pillow refuses it
# where rows are missing, keeps it where only the marker is, e.g. replaced by padding).
ENDS_EARLY = "premature end of data segment"
# EXIF orientation -> the transpose that shows the photo upright (the EXIF standard's table)
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
log = logging.getLogger(__name__)
# Pillow warns from 89 Mpx on opening; open_image refuses beyond max_pixels itself, with an answer that says
# so, and the warning would reach stderr outside the request's log lines
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def image_format(data: bytes) -> str | None:
    """The IMAGE_FORMATS entry the file's magic number names, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def read_image_file(path: str | os.PathLike, max_pixels: int | None) -> bytes:
    """A photo file's bytes, read whole only where its first bytes name an accepted format and, with
    max_pixels, its size is within what an image of that many pixels can take: a folder's 1 GB file that is
    no image costs 16 bytes of reading, not 1 GB of memory. OSError as open() raises it."""
    with open(path, "rb") as f:
        head = f.read(16)
        if head and image_format(head) is None:  # empty: open_image's own words
            raise NotAnImage(NOT_AN_IMAGE)
        size = os.fstat(f.fileno()).st_size
        if max_pixels is not None and size > MAX_BYTES_PER_PIXEL * max_pixels + FILE_SLACK:
            raise TooLarge(f"the file is {size} bytes, more than any image of at most {max_pixels} pixels takes")
        return head + f.read()


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Upload bytes -> the image with only its header read (nothing decoded yet), after the checks that
    need no decoding: not empty, an accepted format (from the bytes), at most max_pixels pixels."""
    if not data:
        raise UserError("the file is empty")
    fmt = image_format(data)
    if fmt is None:
        raise NotAnImage(NOT_AN_IMAGE)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"the image has far more pixels than the limit of {max_pixels}") from exc
    except CORRUPT as exc:
        bits = jpeg_bits(data) if fmt == "JPEG" else None
        if bits not in (None, 8):  # 12-bit (medical, raw-camera) and 16-bit lossless JPEGs: Pillow reads 8 only
            raise NotAnImage(f"the JPEG has {bits}-bit samples: send an 8-bit JPEG, or a 16-bit PNG or TIFF") from exc
        raise NotAnImage(
            f"the file starts like {fmt} but Pillow cannot read it (a damaged file, or a kind of {fmt} it does "
            "not support): save it again as an 8-bit JPEG or PNG"
        ) from exc
    except Exception as exc:
        raise unexpected(exc, f"reading a {fmt} header") from exc
    pixels = image.width * image.height
    if pixels > max_pixels:  # checked before decoding: decompression bombs stop here
        raise TooLarge(f"the image is {image.width}x{image.height} pixels; the limit is {max_pixels} pixels")
    if pixels > MAX_PIXELS_PER_BYTE * len(data):
        raise TooLarge(
            f"the image is {image.width}x{image.height} pixels in a file of {len(data)} bytes, over "
            f"{MAX_PIXELS_PER_BYTE} pixels per byte: no photograph compresses that far; send the photo itself"
        )
    if fmt == "JPEG" and jpeg_scans(data) > MAX_JPEG_SCANS:
        raise TooLarge(
            f"the JPEG has more than {MAX_JPEG_SCANS} progressive scans (cameras and encoders write at most "
            f"10) or more than {MAX_JPEG_MARKERS} markers: re-encode it, e.g. as a baseline JPEG"
        )
    return image


def jpeg_scans(data: bytes) -> int:
    """The number of scans (SOS markers) that libjpeg would decode, counted without decoding; once past
    MAX_JPEG_SCANS, or past MAX_JPEG_MARKERS markers, MAX_JPEG_SCANS + 1."""
    scans = 0
    for marker, _ in _jpeg_markers(data):
        scans += marker == 0xDA
        if marker == TOO_MANY_MARKERS or scans > MAX_JPEG_SCANS:
            return MAX_JPEG_SCANS + 1
    return scans


def jpeg_bits(data: bytes) -> int | None:
    """A JPEG's bits per sample, from its frame header (SOF), without decoding; None where it has none."""
    for marker, pos in _jpeg_markers(data):
        if marker in FRAME_MARKERS:
            return data[pos + 4] if pos + 4 < len(data) else None
        if marker in (0xDA, TOO_MANY_MARKERS):  # the frame header comes before the first scan
            return None
    return None


def _jpeg_markers(data: bytes) -> Iterator[tuple[int, int]]:
    """(marker, its position) for each marker libjpeg meets after SOI, up to EOI; past MAX_JPEG_MARKERS
    markers, (TOO_MANY_MARKERS, position) last.

    Markers are found as libjpeg finds them (stray bytes between segments are skipped, with a warning that
    Pillow lets pass), segments stepped over by their lengths (EXIF, whose thumbnail is a JPEG of its own,
    ICC profiles, tables; a length under 2 steps over the length field, as libjpeg does), each scan's
    entropy-coded data to the marker after it. What follows the end marker is not the decoder's and not
    met: a phone's motion photo appends its video there (random bytes hold 0xFF 0xDA once per 64 kB)."""
    pos = 2  # after SOI
    for _ in range(MAX_JPEG_MARKERS):
        found = _NEXT_MARKER.search(data, pos)
        if found is None:
            return
        marker, pos = found[1][0], found.start(1) - 1
        if marker == 0xD9:  # EOI
            return
        yield marker, pos
        if marker in STANDALONE_MARKERS:
            pos += 2
        elif marker == 0xDA:
            pos = scan_end(data, pos)
        else:
            pos += 2 + max(2, int.from_bytes(data[pos + 2 : pos + 4], "big"))
    yield TOO_MANY_MARKERS, pos


def scan_end(data: bytes, sos: int) -> int:
    """Where the scan whose SOS marker is at `sos` ends: the first marker after its header and its
    entropy-coded data, in which a 0xFF byte is followed by a stuffed 0x00 or a restart marker."""
    found = _MARKER_IN_SCAN.search(data, sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big"))
    return len(data) if found is None else found.start()


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Upload bytes -> (H, W, 3) uint8 RGB, upright per EXIF. UserError for anything that is not one.

    Animated GIF / WebP and multi-page TIFF: the first frame. Every Pillow mode is mapped to 8-bit RGB:
    16-bit and wider integer pixels are scaled (not clamped) to 8 bits, float pixels too (see _to_uint8),
    transparent pixels (alpha channel or a transparent palette entry / colour key) are composited on white,
    CMYK, 1-bit, greyscale and palette images are converted by Pillow."""
    image = open_image(data, max_pixels)
    doing = f"decoding a {image.format} image of {image.width}x{image.height}"
    # the format from the magic number: Pillow names a JPEG whose index lists more pictures after it (phones'
    # depth and gain maps) MPO; the first is decoded. libjpeg-turbo gives no RGB from CMYK: Pillow does, after
    # libjpeg's check (at 1/8 scale) that no rows are missing.
    if image_format(data) == "JPEG":
        rgb = _jpeg_rgb(data, doing, "CMYK", smallest=True) if image.mode == "CMYK" else _jpeg_rgb(data, doing)
        if rgb is not None and image.mode != "CMYK":
            return _upright(rgb, image)
    try:
        image.load()  # the first frame
    except CORRUPT as exc:
        raise UserError(f"the image is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:
        raise unexpected(exc, doing) from exc
    try:
        return image_rgb(image)  # the pixels are loaded: a failure here is ours, not the file's
    except Exception as exc:
        raise unexpected(exc, doing) from exc


def image_rgb(image: Image.Image) -> np.ndarray:
    """A Pillow image (its pixels loaded) -> (H, W, 3) uint8 RGB, upright per EXIF, as decode_image maps
    every mode: the Python API takes PIL images the way the service takes their files."""
    return _upright(_to_rgb(image), image)


def _jpeg_rgb(data: bytes, doing: str, colorspace: str = "RGB", smallest: bool = False) -> np.ndarray | None:
    """A JPEG's bytes -> (H, W, channels) uint8 pixels in colorspace (smallest: at 1/8 scale); UserError where
    its data ends early. None where libjpeg warned of anything else (ENDS_EARLY) or failed: Pillow decodes
    those or says why not."""
    try:
        # strict: libjpeg's warnings raise. One that comes late costs a second decode, by Pillow (a 12 Mpx
        # progressive JPEG with a stray byte before its last scan: 199 against 62 ms): at most twice what
        # the scan limit bounds. min_width / min_height 1: the smallest scale; 0: full size.
        least = int(smallest)
        return simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True, min_width=least, min_height=least)
    except ValueError as exc:
        if ENDS_EARLY in str(exc).lower():
            why = f"its JPEG data ends before the last rows ({exc}): the file is cut short or its header is wrong"
            raise UserError(f"the image is corrupt or truncated: {why}") from exc
        return None
    except Exception as exc:
        raise unexpected(exc, doing) from exc


def _upright(rgb: np.ndarray, image: Image.Image) -> np.ndarray:
    """The decoded pixels turned as the file's EXIF (or XMP) orientation says."""
    method = None
    with contextlib.suppress(Exception):  # EXIF is optional: whatever fails reading it, keep the pixels
        method = UPRIGHT.get(int(image.getexif().get(0x0112, 1)))  # 0x0112: Orientation; 1: as stored
    return rgb if method is None else np.asarray(Image.fromarray(rgb).transpose(method))


def unexpected(exc: Exception, doing: str) -> UserError:
    """A decoder failure that no known file fault explains: logged with its traceback where the server's
    operator sees it; the client is told it could not be decoded. Out of memory (the server's trouble, not
    the file's) and debugging: raised as it is."""
    log.error("%s failed", doing, exc_info=exc)
    if isinstance(exc, MemoryError) or debugging():
        raise exc
    return UserError(f"the image could not be decoded ({type(exc).__name__}); try another format")


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):  # one channel of 16/32-bit integers or floats
        sixteen_bit = mode.startswith("I;16") or _tiff_bits(image) == (16,)  # Pillow reads signed 16-bit TIFFs as I
        return np.repeat(_to_uint8(np.asarray(image), sixteen_bit)[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
        alpha = rgba[:, :, 3:]
        return ((rgba[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)  # over white
    return np.asarray(image.convert("RGB"))


def _tiff_bits(image: Image.Image) -> tuple | None:
    """A TIFF's bits per sample (its tag 258), None for other formats."""
    tags = getattr(image, "tag_v2", None)
    return None if tags is None else tags.get(258)


def _to_uint8(values: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """One channel of wide pixels -> uint8 by scaling, where Pillow's convert() clamps at 255.

    Integers of a 16-bit file map 65535 -> 255, however dark the photo. Integers of a 32-bit file (or
    image) say nothing of their range: in 0..255 they are kept (8-bit pixels in a wider type, as numpy
    arrays are often saved), in 0..65535 scaled as 16-bit ones. Floats in 0..1 map 1.0 -> 255; floats in
    0..255 are kept. Anything else (negative or wider values) is stretched linearly from its own minimum
    and maximum to 0..255."""
    if values.dtype.kind in "ui":
        low, high = float(values.min()), float(values.max())  # exact: 32-bit integers fit a float64
        if low >= 0 and high <= 255 and not sixteen_bit:
            return values.astype(np.uint8)
        if low >= 0 and high <= 65535:
            return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        values = values.astype(np.float64)
    else:
        values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 1:
            return np.rint(values * 255).astype(np.uint8)
        if low >= 0 and high <= 255:
            return np.rint(values).astype(np.uint8)
    span = high - low or 1
    return np.rint((values - low) * (255 / span)).clip(0, 255).astype(np.uint8)
