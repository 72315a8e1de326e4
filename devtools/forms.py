"""Hand-made multipart/form-data bodies, well-formed and not, as clients and attackers write them
(tests/test_guard.py, benchmarks/forms.py)."""

from __future__ import annotations

from PIL import Image

from devtools.photos import astronaut, encode

B = b"b0undary"
MULTIPART = "multipart/form-data; boundary=" + B.decode()
PNG = encode(Image.new("RGB", (8, 8), (200, 30, 30)), "PNG")


def part(name: bytes | None, data: bytes, filename: bytes | None = b"a.png", ctype: bytes = b"image/png") -> bytes:
    disposition = b"Content-Disposition: form-data"
    if name is not None:
        disposition += b'; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return b"--" + B + b"\r\n" + disposition + b"\r\nContent-Type: " + ctype + b"\r\n\r\n" + data + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--" + B + b"--\r\n"


# name -> (body, content type, what the guard's 400 answer names)
MALFORMED = {
    "no boundary": (form(part(b"image", PNG)), "multipart/form-data", "no boundary"),
    "wrong boundary": (form(part(b"image", PNG)), "multipart/form-data; boundary=other", "wrong boundary"),
    "empty body": (b"", MULTIPART, "the body is empty"),
    "nameless part": (form(part(None, PNG)), MULTIPART, 'name="..."'),
    "folded header": (
        b"--" + B + b'\r\nContent-Disposition: form-data;\r\n name="image"; filename="a.png"\r\n\r\n' + PNG + b"\r\n"
        b"--" + B + b"--\r\n",
        MULTIPART,
        "folded",
    ),
    "no content-disposition": (
        b"--" + B + b"\r\nContent-Type: image/png\r\n\r\n" + PNG + b"\r\n--" + B + b"--\r\n",
        MULTIPART,
        "Content-Disposition",
    ),
    "many text fields": (form(*(part(b"f%d" % i, b"x", filename=None) for i in range(200))), MULTIPART, "text fields"),
    "image as a big text field": (form(part(b"image", encode(astronaut()), filename=None)), MULTIPART, "file parts"),
    "no closing boundary": (part(b"image", PNG) + b"--" + B + b"\r\n", MULTIPART, "closing boundary"),
    "truncated part": (part(b"image", PNG)[:-10], MULTIPART, "truncated"),
    "endless headers": (b"--" + B + b"\r\n" + b"X-Pad: y\r\n" * 2000, MULTIPART, "empty line"),
    "no CRLF after boundary": (b"--" + B + b"junk\r\n" + part(b"image", PNG)[len(B) + 4 :], MULTIPART, "CRLF"),
}
