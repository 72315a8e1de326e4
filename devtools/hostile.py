"""Slow and heavy clients of a running service (tests/test_slots.py, benchmarks/edge.py): uploads trickled
a byte at a time over raw sockets, many large uploads at once, and the peak memory of a process meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

from devtools.launch import pss_kb
from devtools.photos import encode

BOUNDARY = b"trickle"


class Tricklers:
    """`n` connections, each posting a multipart upload of `size` bytes to `path`, its headers and first
    part header at once, then one byte every `every` seconds: clients on a stalled network, or an attack
    that holds upload slots open (slowloris). `async with` opens them all; `answers()` waits for the
    server to answer each and counts the answers by status; `last_answer_s`: seconds from opening them
    to the last answer."""

    def __init__(self, url: str, path: str, n: int, every: float = 1.0, size: int = 100_000) -> None:
        self.host, self.port = urlsplit(url).hostname, urlsplit(url).port
        self.path, self.n, self.every, self.size = path, n, every, size
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._trickle: asyncio.Task | None = None
        self.opened = self.last_answer_s = 0.0

    async def __aenter__(self) -> Tricklers:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {self.size}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n\r\n"
        ).encode()
        first = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        self.opened = time.perf_counter()
        for _ in range(self.n):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(head + first)
            self.streams.append((reader, writer))
        self._trickle = asyncio.create_task(self._send())
        return self

    async def _send(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            for _, writer in self.streams:
                if not writer.is_closing():
                    writer.write(b"x")

    async def answers(self, timeout: float) -> Counter:
        """Status of each connection's answer (0: none within `timeout` seconds, or the connection closed
        without one)."""

        async def status(reader: asyncio.StreamReader) -> int:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except (TimeoutError, ConnectionError):
                return 0
            self.last_answer_s = max(self.last_answer_s, time.perf_counter() - self.opened)
            return int(line.split()[1]) if line.startswith(b"HTTP/") else 0

        return Counter(await asyncio.gather(*(status(reader) for reader, _ in self.streams)))

    async def __aexit__(self, *exc) -> None:
        if self._trickle is not None:
            self._trickle.cancel()
        for _, writer in self.streams:
            writer.close()


def noise_png(size: int, seed: int = 0) -> bytes:
    """A PNG of random pixels (incompressible) of just under `size` bytes: the largest upload a limit takes."""
    side = int((size / 3) ** 0.5) - 8  # RGB bytes per pixel; PNG's own overhead is under 1 %
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "PNG")
    assert len(data) <= size, (len(data), size)
    return data


async def parallel_uploads(url: str, path: str, photo: bytes, n: int) -> list[int]:
    """n uploads of the same photo, all at once; their statuses."""
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        files = {"image": ("big.png", photo, "image/png")}
        answers = await asyncio.gather(*(client.post(url + path, files=files) for _ in range(n)))
    return [r.status_code for r in answers]


@contextmanager
def peak_pss(pid: int, every: float = 0.02) -> Iterator[dict]:
    """Samples a process's PSS every `every` seconds while the block runs: {"before", "peak"} in MB."""
    out = {"before": pss_kb(pid) / 1024}
    out["peak"] = out["before"]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            out["peak"] = max(out["peak"], pss_kb(pid) / 1024)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
