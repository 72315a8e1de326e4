"""A strict multipart/form-data parser and writer for the request guard (serving/guard.py).

Strict where Starlette is lenient or slow: each part needs a Content-Disposition with a name, headers are
not folded, the body ends with the closing boundary, and parsing takes time linear in the bytes read.
`build_form` writes the canonical form the guard passes on to BentoML.
"""

from __future__ import annotations

import email.message
import mmap
import re
import secrets
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

from models.images import IMAGE_FORMATS

MAX_HEADER_BYTES = 8192  # one part's header block
MAX_TEXT_FIELDS = 4  # no route takes text fields; a few are parsed so that the answer can name them
MAX_TEXT_BYTES = 8192  # one text field (a URL fits; an image sent as text does not)
MAX_BOUNDARY = 70  # RFC 2046
_LINE_END = re.compile(rb"[ \t]*\r\n")  # after a boundary: optional transport padding, then CRLF


class Rejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class TooManyFiles(Exception):
    def __init__(self, count: int) -> None:
        self.count = count


class ClientGone(Exception):
    pass


Buffer = bytes | mmap.mmap  # a whole body: in memory, or its spool file mapped (serving/uploads.py)
Segment = bytes | tuple[int, int]  # of a body written from another one: bytes of its own, or (start, end) of it


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None: a text field
    content_type: str
    start: int  # its data is body[start:end]
    end: int


def parse_form(body: Buffer, boundary: bytes, max_files: int) -> list[Part]:
    """multipart/form-data (RFC 7578) -> its parts, strictly and in time linear in the bytes read: each
    part needs a Content-Disposition with a name, headers must not be folded, the body must end with the
    closing boundary. Rejected(400) says what is wrong; TooManyFiles once a part past max_files is seen
    (with the number of parts the body holds, counted without parsing them). Only find() and slicing
    are used on the body (an mmap has no startswith or count)."""
    delimiter = b"--" + boundary
    if not len(body):
        raise Rejected(400, "the body is empty")
    if _at(body, 0, delimiter):
        pos = len(delimiter)
    else:  # a preamble before the first boundary is allowed (RFC 2046)
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise Rejected(400, "the body does not contain the boundary given in Content-Type (wrong boundary?)")
        pos = found + 2 + len(delimiter)
    parts: list[Part] = []
    files = fields = 0
    while True:
        if _at(body, pos, b"--"):  # the closing boundary; an epilogue after it is ignored
            return parts
        line_end = _LINE_END.match(body, pos)
        if line_end is None:
            if pos >= len(body):
                raise Rejected(400, "the body ends without the closing boundary (truncated?)")
            raise Rejected(400, "a boundary is followed by other text on its line (lines must end with CRLF)")
        pos = line_end.end()
        headers_end = body.find(b"\r\n\r\n", pos - 2, pos + MAX_HEADER_BYTES)
        if headers_end < 0:
            if len(body) - pos < MAX_HEADER_BYTES:
                raise Rejected(400, "the body ends inside a part's headers, before the closing boundary (truncated?)")
            raise Rejected(400, f"a part's headers do not end with an empty line within {MAX_HEADER_BYTES} bytes")
        name, filename, content_type = _part_headers(body[pos:headers_end] if headers_end > pos else b"")
        start = headers_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise Rejected(400, f"the body ends inside part {name!r}, before the closing boundary (truncated?)")
        if filename is None:
            fields += 1
            if fields > MAX_TEXT_FIELDS:
                raise Rejected(400, f"more than {MAX_TEXT_FIELDS} text fields")
            if end - start > MAX_TEXT_BYTES:
                raise Rejected(
                    400,
                    f"text field {name!r} has {end - start} bytes (at most {MAX_TEXT_BYTES}): images must be sent "
                    "as file parts, with a filename",
                )
        else:
            files += 1
            if files > max_files:  # each part after this one ends with a boundary, the last with the closing one
                raise TooManyFiles(files + _count(body, b"\r\n" + delimiter, end + 2))
        parts.append(Part(name, filename, content_type, start, end))
        pos = end + 2 + len(delimiter)


def _at(body: Buffer, pos: int, text: bytes) -> bool:
    return body[pos : pos + len(text)] == text


def _count(body: Buffer, text: bytes, pos: int) -> int:
    count = 0
    while (pos := body.find(text, pos)) >= 0:
        count, pos = count + 1, pos + len(text)
    return count


def _part_headers(block: bytes) -> tuple[str, str | None, str]:
    """A part's header block -> (field name, filename or None for a text field, declared content type)."""
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            raise Rejected(400, "a part header is folded over several lines (RFC 7578 forbids folding)")
        key, colon, value = line.partition(b":")
        if not colon or not key.strip() or b" " in key.strip():
            raise Rejected(400, f"malformed part header {line[:60].decode('latin-1')!r}")
        headers[key.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if "content-disposition" not in headers:
        raise Rejected(400, "a part has no Content-Disposition header")
    disposition, options = parse_options_header(headers["content-disposition"])
    if disposition != b"form-data" or b"name" not in options:
        raise Rejected(400, 'a part\'s Content-Disposition is not form-data; name="..."')
    name = _text(options[b"name"])
    filename = _text(options[b"filename"]) if b"filename" in options else None
    if filename is None:  # RFC 5987's filename*=UTF-8''%C3%A9t%C3%A9.jpg, which parse_options_header drops:
        # RFC 7578 forbids it in forms, some clients send it
        disposition_header = email.message.Message()
        disposition_header["content-disposition"] = headers["content-disposition"]
        filename = disposition_header.get_filename()
    return name, filename, headers.get("content-type", "")


def _text(value: bytes) -> str:
    """Header parameters arrive as latin-1 (WSGI style); browsers send UTF-8 names."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def label(filename: str | None, index: int) -> str:
    """How an answer names a file: its place (counted from 1, as people count, and as the pipeline's
    "file #N" of errors found later does) and, where the client gave one, its name, shortened."""
    if not filename:
        return f"#{index + 1}"
    return f"#{index + 1} ({filename if len(filename) <= 60 else f'{filename[:40]}...{filename[-12:]}'!r})"


def build_form(name: str, files: list[tuple[Part, str]], body: Buffer) -> tuple[list[Segment], bytes]:
    """(part, format) files of `body` -> (the canonical multipart body as segments of `body`, its
    boundary): short safe file names, detected content types. The boundary is one that does not occur
    in `body` (which holds every file)."""
    while True:
        boundary = secrets.token_hex(16).encode()
        if body.find(boundary) < 0:
            break
    segments: list[Segment] = []
    for i, (part, fmt) in enumerate(files):
        disposition = f'form-data; name="{name}"; filename="image-{i}{IMAGE_FORMATS[fmt][0]}"'
        head = (
            f"--{boundary.decode()}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/{fmt.lower()}\r\n\r\n"
        )
        segments += [head.encode(), (part.start, part.end), b"\r\n"]
    segments.append(b"--" + boundary + b"--\r\n")
    return segments, boundary
