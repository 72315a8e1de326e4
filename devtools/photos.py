"""Real photographs for detection tests, from scikit-image's wheel (no download), and pictures composed
from them. The astronaut (Eileen Collins, NASA, public domain) has one face; coffee and the cat none."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

from models.images import scan_end

# where the astronaut's face is in the 512x512 original (centre of the face box, checked by eye)
ASTRONAUT_FACE_CENTRE = (222, 118)
ASTRONAUT_FACE_BOX = (177, 59, 90, 113)  # x, y, w, h: MTCNN's box for it (tests/test_faces.py checks the centre)


def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def no_face(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)())  # "coffee" or "chelsea" (a cat)


def group_photo() -> tuple[Image.Image, list[tuple[float, float]]]:
    """Astronauts pasted at three sizes onto a coffee-coloured canvas: (photo, expected face centres)."""
    canvas = Image.fromarray(data.coffee()).resize((960, 640))
    centres = []
    for size, (x, y) in ((380, (20, 40)), (240, (450, 60)), (170, (700, 380))):
        canvas.paste(astronaut().resize((size, size)), (x, y))
        scale = size / 512
        centres.append((x + ASTRONAUT_FACE_CENTRE[0] * scale, y + ASTRONAUT_FACE_CENTRE[1] * scale))
    return canvas, centres


def face_grid(n: int, cell: int) -> np.ndarray:
    """An n x n grid of the astronaut's face, each cell x cell px: a photo of n * n faces (RGB array)."""
    tile = np.asarray(face_template()[0].resize((cell, cell)))
    return np.tile(tile, (n, n, 1))


def save(image: Image.Image, path: Path, fmt: str = "JPEG") -> Path:
    image.save(path, format=fmt, quality=92) if fmt == "JPEG" else image.save(path, format=fmt)
    return path


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    """The image as a file of this format; options are Pillow's for it (quality, progressive, save_all...)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def box_centre(box: dict) -> np.ndarray:
    return np.array([box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])


SIZES = (24, 32, 48, 64, 96, 128, 160)  # face box widths pasted into composites
CANVAS = (4000, 3000)


def face_template() -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The astronaut cropped around her face with a margin, and where the face box is inside that crop."""
    photo = astronaut()
    x, y, w, h = ASTRONAUT_FACE_BOX
    m = int(0.6 * max(w, h))
    crop = photo.crop((x - m, y - m, x + w + m, y + h + m))
    return crop, (m, m, w, h)


def composite(
    rng: np.random.Generator,
    faces: int,
    sizes: tuple[int, ...] = SIZES,
    templates: list[tuple[Image.Image, tuple[int, int, int, int]]] | None = None,
    size: tuple[int, int] = CANVAS,
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """A canvas of `size` (4000x3000) and the pasted faces, their box widths taken from sizes in turn, as
    (that width, x, y, w, h) of each face box. Face k is templates[k] (a picture and its face box, as
    face_template gives), mirrored or not; by default the astronaut's each time, its brightness varied."""
    background = np.asarray(no_face("coffee").resize(size, Image.BILINEAR), np.float32)
    canvas = Image.fromarray(np.clip(background + rng.normal(0, 6, background.shape), 0, 255).astype(np.uint8))
    one_face, truth, taken = templates is None, [], []
    templates = templates or [face_template()] * faces
    for k in range(faces):
        template, (fx, fy, fw, fh) = templates[k]
        width = sizes[k % len(sizes)]
        s = width / fw
        face = template.resize((max(1, round(template.width * s)), max(1, round(template.height * s))), Image.LANCZOS)
        if rng.random() < 0.5:
            face, fx = ImageOps.mirror(face), template.width - fx - fw
        if one_face:  # one identity: vary it a little (real faces vary already, and their labels hold as they are)
            face = ImageEnhance.Brightness(face).enhance(rng.uniform(0.7, 1.2))
        for _ in range(1000):  # a free spot
            x, y = int(rng.integers(0, size[0] - face.width)), int(rng.integers(0, size[1] - face.height))
            box = (x, y, x + face.width, y + face.height)
            if all(box[2] < t[0] or box[0] > t[2] or box[3] < t[1] or box[1] > t[3] for t in taken):
                break
        else:
            raise ValueError(f"no free spot for face {k} of {faces} on a {size[0]}x{size[1]} canvas: ask for fewer")
        taken.append(box)
        canvas.paste(face, (x, y))
        truth.append((width, x + round(fx * s), y + round(fy * s), round(fw * s), round(fh * s)))
    return np.asarray(canvas), truth


def many_scans_jpeg(image: Image.Image, scans: int) -> bytes:
    """A progressive JPEG of the image whose smallest scan (with the tables before it) is repeated until
    the file has `scans` scans: a decoder bomb of a few kB per hundred scans (libjpeg warns of the odd
    progression and decodes every scan)."""
    data = encode(image, "JPEG", progressive=True)
    starts = [m.start() for m in re.finditer(rb"\xff\xda", data)]  # Pillow writes no thumbnail: all are scans
    ends = [scan_end(data, s) for s in starts]
    units = [data[e:s2] + data[s2:e2] for e, s2, e2 in zip(ends, starts[1:], ends[1:], strict=False)]
    smallest = min(units, key=len)  # the tables (DHT) between two scans, then the second scan
    return data[: ends[-1]] + smallest * (scans - len(starts)) + data[ends[-1] :]


def one_bit_png(side: int) -> bytes:
    """A blank 1-bit PNG of side x side: a few kB for any side (7071: 50 Mpx in ~6 kB)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
