"""Request bodies on their way through the request guard (serving/guard.py): read from the client within
the upload rules into a spool (memory up to SPOOL_BYTES, past it a temporary file), viewed whole for
parsing, and replayed to BentoML in chunks. A body therefore costs the API process at most SPOOL_BYTES
of memory while it arrives and while it is handed on, whatever its size; only the check of a complete
body maps it (serving/guard.py bounds how many are checked at once).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

from starlette.types import Message, Receive

from serving.multipart import ClientGone, Rejected, Segment

# In memory below this, a temporary file from it on (the folder of TMPDIR): uploads being read at once
# (AGE_GENDER_MAX_UPLOADS, 256) x 64 KiB = 16 MiB at most. Photos are larger, so they go to disk.
# BentoML's form parser spools the file parts it gets from the guard at the same size (serving/patches.py).
SPOOL_BYTES = 64 * 1024
# per message replayed to BentoML: small enough that the replay's reads (os.pread from the page cache, on
# the event loop) take microseconds each, large enough that a 20 MiB body is 320 messages
CHUNK_BYTES = 64 * 1024


class Spool:
    """A request body: bytes in memory until it passes SPOOL_BYTES, then an unnamed temporary file."""

    def __init__(self) -> None:
        self.size = 0
        self._memory = bytearray()
        self._file: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is None and self.size <= SPOOL_BYTES:
            self._memory += data
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115  # closed by close(), after the replay
            self._file.write(self._memory)
            self._memory = bytearray()
        self._file.write(data)

    @contextmanager
    def whole(self) -> Iterator[bytes | mmap.mmap]:
        """The body as one buffer, for the form's parser: the bytes, or the file mapped read-only (its
        pages are the page cache's, counted in this process only while mapped)."""
        if self._file is None:
            yield bytes(self._memory)
            return
        self._file.flush()
        with mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped

    def read(self, start: int, end: int) -> bytes:
        if self._file is None:
            return bytes(self._memory[start:end])
        return os.pread(self._file.fileno(), end - start, start)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._memory = bytearray()


async def read_body(
    receive: Receive, max_bytes: int, idle_timeout: float, upload_timeout: float, min_rate: float, declared: int = -1
) -> Spool:
    """The client's body -> a Spool; Rejected(413) past max_bytes, Rejected(408) after idle_timeout
    seconds without a byte, past upload_timeout seconds in all, or when after idle_timeout seconds it
    has arrived slower than min_rate bytes/s on average (checked as each piece arrives: a client sending
    a byte now and then is cut within about 2 x idle_timeout); Rejected(503) when the body cannot be
    stored (a full disk); ClientGone when the client disconnects. declared: its Content-Length (-1: none)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + upload_timeout
    spool = Spool()
    try:
        while True:
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, min(idle_timeout, left)))
            except TimeoutError as exc:
                if left <= idle_timeout:
                    raise Rejected(408, f"the request body took longer than {upload_timeout:g} s") from exc
                why = f"no request body bytes for {idle_timeout:g} s"
                if declared > spool.size:  # a client that declares more than it sends waits here too
                    why += f": {spool.size} of the {declared} bytes its Content-Length declares arrived"
                raise Rejected(408, why) from exc
            if message["type"] == "http.disconnect":
                raise ClientGone
            try:
                spool.write(message.get("body", b""))
            except OSError as exc:
                why = f"the server could not store the request body ({exc.strerror}); retry shortly"
                raise Rejected(503, why) from exc
            if spool.size > max_bytes:
                raise Rejected(413, f"request body over the {max_bytes} byte limit")
            if not message.get("more_body"):
                return spool
            elapsed = loop.time() - started
            if elapsed > idle_timeout and spool.size < min_rate * elapsed:
                raise Rejected(
                    408,
                    f"the request body arrives at {spool.size / elapsed:.0f} bytes/s, under the minimum of "
                    f"{min_rate:g} bytes/s",
                )
    except BaseException:
        spool.close()
        raise


async def drain(receive: Receive, most: int, idle_timeout: float, seconds: float) -> None:
    """Read and drop the rest of a refused body, at most `most` bytes within `seconds`, before it is
    answered: clients that send their whole body before reading (Python's http.client, requests) then
    read the answer; closed on them mid-body, they see a reset connection. Returns at the body's end,
    past either bound, after idle_timeout seconds without a byte, or when the client leaves."""
    loop = asyncio.get_running_loop()
    deadline, dropped = loop.time() + seconds, 0
    while dropped <= most and (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), timeout=min(idle_timeout, left))
        except TimeoutError:
            return
        dropped += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body"):
            return


def length(segments: Sequence[Segment]) -> int:
    return sum(len(s) if isinstance(s, bytes) else s[1] - s[0] for s in segments)


def replay(spool: Spool, segments: Sequence[Segment], receive: Receive) -> Receive:
    """The body made of segments as messages of at most CHUNK_BYTES; after the last one the client's own
    receive (to see a disconnect). The spool is closed once its last byte is handed on (BentoML holds
    its own copy of each file meanwhile)."""

    def chunks() -> Iterator[bytes]:
        for segment in segments:
            if isinstance(segment, bytes):
                yield segment
                continue
            for start in range(segment[0], segment[1], CHUNK_BYTES):
                yield spool.read(start, min(start + CHUNK_BYTES, segment[1]))

    pending = chunks()
    done = False

    async def next_message() -> Message:
        nonlocal done
        if done:
            return await receive()
        chunk = next(pending, None)
        if chunk is None:
            done = True
            spool.close()
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    return next_message
