"""Draw boxes and labels on a photo, for POST /annotate (the same labels the /ui page shows)."""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.schemas import PhotoResult

COLOUR = (255, 45, 85)
# labels grow with the photo (16 px text on a 640 px photo) up to this factor: 256 px text from 10,240 px
# on; Pillow's FreeType text refuses sizes in the tens of thousands (a 2,700,000 x 1 photo asked 67,500)
MAX_LABEL_SCALE = 16
# ...and their text stays under this fraction of their face's height, so that in a crowd a small face's
# label is not several times its height (100 px text over 52 px faces in a 4000x3000 photo; its width, ~6x
# the text size, still spans a few faces there); never under MIN_TEXT px
LABEL_OF_FACE, MIN_TEXT = 0.4, 12


def label(face) -> str:
    return f"{round(face.age)} · {face.gender} {round(face.gender_probability * 100)} %"


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # bundled with Pillow: no font files


def annotate(rgb: np.ndarray, result: PhotoResult) -> bytes:
    """(H, W, 3) photo + its /predict result -> PNG bytes of the same size with every face boxed."""
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    scale = min(max(image.size) / 640, MAX_LABEL_SCALE)
    for face in result.faces:
        b = face.box
        size = max(MIN_TEXT, round(min(16 * scale, LABEL_OF_FACE * b.height)))
        width = max(2, round(3 * size / 16))  # the outline, in proportion to the text
        font = _font(size)
        draw.rectangle([b.x, b.y, b.x + b.width - 1, b.y + b.height - 1], outline=COLOUR, width=width)
        left, top, right, bottom = draw.textbbox((b.x, b.y), label(face), font=font)
        lift = bottom - top + 2 * width  # label above the box, or inside it at the top edge of the photo
        y = b.y - lift if b.y >= lift else b.y
        span = right - left + 2 * width
        x = max(0, min(b.x, image.width - span))  # moved left of the box where the photo's right edge cuts it
        draw.rectangle([x, y, x + span, y + lift], fill=COLOUR)
        draw.text((x + width - (left - b.x), y + width - (top - b.y)), label(face), fill="white", font=font)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
