"""glibc's heap in the service processes: memory goes back to the operating system after the work.

Every model batch allocates and frees buffers of megabytes (the float batch (B, 3, S, S), ONNX Runtime's
activations: its own arena is off, models/runtime.py). glibc serves blocks over its mmap threshold with
mmap and unmaps them when freed, but it raises that threshold to the size of each such block freed (up
to 32 MiB), after which these buffers come from the heap, whose free space is kept and spread over up to
8 arenas per core. The 20-minute soak saw the model process swing by ±40 MB between samples with its
highest samples creeping upward (BENCHMARKS.md, "Reliability"). A fixed threshold (which turns the
dynamic one off) keeps every block of a MiB or more out of the heap, and two arenas bound what the
threads' heaps keep. Measured in one process (4 threads calling the model, batches of 1-16 crops, 2,400
calls): resident memory 321 MB (default) -> 193 MB, flat from the 50th call; 61 s -> 62 s.

Detection is different: one photo allocates and frees buffers of megabytes hundreds of times (P-Net's
tiles, R-Net's and O-Net's batches, the pyramid's levels), and a block mapped afresh each time is paid
for again in page faults: in a worker thread, as the service calls it, the 1 MiB threshold made detection
cost 1.2-1.6x the CPU it takes with the blocks kept (`python -m benchmarks.heap`). So the detector
processes keep such blocks in the heap while they work (the largest fixed threshold glibc takes, and no
trimming of the heap's top at each free) and give its free pages back after any call that left the
process TRIM_OVER larger than before it (`malloc_trim`): a large photo's memory is returned at once,
while small photos reuse what the heap keeps, without a trim each.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

# glibc's mallopt parameter numbers (malloc.h) and our values
M_MMAP_THRESHOLD, THRESHOLD = -3, 1 << 20  # blocks of 1 MiB or more are mmapped, and unmapped when freed
DETECTOR_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: only blocks over 32 MiB (decoded photos) mapped
# glibc gives the heap's free top back at each free() once it is over 128 KiB (with a fixed mmap threshold):
# a buffer freed there is page-faulted again at its next use. Detector processes give back with `trimmed`.
M_TRIM_THRESHOLD, DETECTOR_TRIM_THRESHOLD = -1, 1 << 30
M_ARENA_MAX, ARENAS = -8, 2
# A call that leaves resident memory this much higher gives the heap's free pages back. Above what one
# small photo adds as the heap settles (up to ~14 MB a call, ~50 MB in all), under the 50 MB that
# tests/test_memory.py allows a process to keep after large photos.
TRIM_OVER = 32 << 20


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc; None elsewhere (macOS, musl), whose allocators behave differently
    and are left alone."""
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc's mallopt (parameter, value) settings to this process; False where the C library is not
    glibc or one was refused."""
    libc = _glibc()
    return libc is not None and all([bool(libc.mallopt(param, value)) for param, value in settings])


def return_large_buffers() -> bool:
    """Every service process: blocks of a MiB or more go back to the operating system when freed."""
    return _mallopt((M_MMAP_THRESHOLD, THRESHOLD), (M_ARENA_MAX, ARENAS))


def keep_buffers_while_working() -> bool:
    """A detector process: blocks up to 32 MiB come from the heap, which keeps its free pages until
    `trimmed` gives them back."""
    return _mallopt(
        (M_MMAP_THRESHOLD, DETECTOR_THRESHOLD), (M_TRIM_THRESHOLD, DETECTOR_TRIM_THRESHOLD), (M_ARENA_MAX, ARENAS)
    )


def resident_bytes() -> int:
    """This process's resident memory (Linux: /proc/self/statm; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


@contextmanager
def trimmed(over: int = TRIM_OVER) -> Iterator[None]:
    """Run the block; if it left this process `over` bytes larger, give the heap's free pages back."""
    before = resident_bytes()
    try:
        yield
    finally:
        if resident_bytes() > before + over and (libc := _glibc()) is not None:
            libc.malloc_trim(0)
