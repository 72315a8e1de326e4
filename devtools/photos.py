"""Real photographs for detection tests, from scikit-image's wheel (no download), and pictures composed
from them. The astronaut (Eileen Collins, NASA, public domain) has one face; coffee and the cat none."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

# where the astronaut's face is in the 512x512 original (centre of the face box, checked by eye)
ASTRONAUT_FACE_CENTRE = (222, 118)


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


def save(image: Image.Image, path: Path, fmt: str = "JPEG") -> Path:
    image.save(path, format=fmt, quality=92) if fmt == "JPEG" else image.save(path, format=fmt)
    return path


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def box_centre(box: dict) -> np.ndarray:
    return np.array([box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
