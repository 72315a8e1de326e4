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

Detection is different: one photo allocates and frees buffers of megabytes hundreds of times (pyramid
levels, R-Net's and O-Net's batches, decoded copies), and a block mapped afresh at each use pays its page
faults again: in a worker thread, as the service calls it, the 1 MiB threshold made detection cost up to
1.6x (1.2-1.4x on a 512 px photo) the CPU it takes with the blocks kept (`python -m benchmarks.heap`).
glibc's own defaults are no way back: the threshold is already fixed for the whole process when the
service module loads, and left to itself the heap keeps what large photos took. So a detector process
keeps blocks up to 32 MiB in its heap, does not trim the heap's top at each free, and gives the free
pages back (`malloc_trim`) when a call leaves it TRIM_OVER larger than before the call, or KEEP larger
than after the last such trim (`HeapTrimmer`): a large photo's memory is returned at once, small photos
reuse what the heap keeps. A call that gave memory back does so once more LATER: BentoML serializes a
call's answer after it returns, from the same heap, which kept those buffers until the next call (an
annotated 50 Mpx photo, a 19 MB PNG, left a detector process 85 MB larger than the same photo through
/predict). Giving back covers the free top of the calling thread's arena too, which malloc_trim leaves
(give_back).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# glibc's mallopt parameter numbers (malloc.h) and our values
M_MMAP_THRESHOLD, THRESHOLD = -3, 1 << 20  # blocks of 1 MiB or more are mmapped, and unmapped when freed
DETECTOR_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: only blocks of 32 MiB or more (decoded photos)
# With a fixed mmap threshold glibc gives the heap's top back on frees once it exceeds 128 KiB: a buffer
# freed there is page-faulted again at its next use. Detector processes give memory back with HeapTrimmer.
M_TRIM_THRESHOLD, DETECTOR_TRIM_THRESHOLD = -1, 1 << 30
M_ARENA_MAX, ARENAS = -8, 2
# A free of at least glibc's FASTBIN_CONSOLIDATION_THRESHOLD (64 KiB) in a thread's arena runs that arena's
# heap_trim, the only way its top is given back (malloc_trim does so for the main arena's alone). Over
# that with room for the chunk's header, under the detectors' mmap threshold so that it comes from the heap
ARENA_TRIM_FREE = 128 << 10
# A call that leaves resident memory this much higher than before it gives the heap's free pages back:
# under the 50 MB a process may keep after a photo (tests/test_memory.py); large photos take hundreds.
TRIM_OVER = 32 << 20
# Smaller growths add up: past this much over the level after the last trim, the heap is trimmed too.
# Above what small photos keep for reuse (up to ~85 MB more than with the 1 MiB threshold: benchmarks.heap).
KEEP = 128 << 20
LATER = 1.0  # seconds after a call that gave memory back: its answer has been serialized and sent by then


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc; None elsewhere (macOS, musl), whose allocators behave differently
    and are left alone."""
    if platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc's mallopt (parameter, value) settings to this process; False where the C library is not
    glibc or one was refused."""
    libc = _glibc()
    # a list, not a generator: every setting is applied even when one is refused
    return libc is not None and all([bool(libc.mallopt(param, value)) for param, value in settings])


def return_large_buffers() -> bool:
    """Every service process: blocks of a MiB or more go back to the operating system when freed."""
    return _mallopt((M_MMAP_THRESHOLD, THRESHOLD), (M_ARENA_MAX, ARENAS))


def keep_buffers_while_working() -> bool:
    """A detector process: blocks under 32 MiB come from the heap, which keeps its free pages until a
    HeapTrimmer gives them back."""
    return _mallopt(
        (M_MMAP_THRESHOLD, DETECTOR_THRESHOLD), (M_TRIM_THRESHOLD, DETECTOR_TRIM_THRESHOLD), (M_ARENA_MAX, ARENAS)
    )


_GIVING_BACK = threading.Lock()  # the trim threshold is the process's: one give_back at a time


def give_back(libc: ctypes.CDLL) -> None:
    """Return the heap's free pages to the operating system, the top of this thread's arena included.

    malloc_trim releases free blocks inside every arena, but the free space at the top of a thread's arena
    only in the main one. Detection runs in one of BentoML's worker threads, whose arena's last heap (64 MB,
    glibc's heap size for thread arenas) kept what a 50 Mpx photo grew it by (+58-66 MB after the first
    one). With the trim threshold at 0 for one free there, glibc's heap_trim gives that top back; other
    threads' frees in that moment trim too, which costs them page faults, not memory. Detector processes
    only: the threshold is set back to theirs (keep_buffers_while_working). The delayed call runs in a Timer
    thread, on whichever of the ARENAS it is given: the answer it is for was serialized on the event loop's
    thread, in the main arena, which malloc_trim covers."""
    with _GIVING_BACK:
        libc.malloc_trim(0)
        libc.mallopt(M_TRIM_THRESHOLD, 0)
        try:
            libc.free(libc.malloc(ARENA_TRIM_FREE))
        finally:
            libc.mallopt(M_TRIM_THRESHOLD, DETECTOR_TRIM_THRESHOLD)


def resident_bytes() -> int:
    """This process's resident memory (Linux: /proc/self/statm; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class HeapTrimmer:
    """Gives the heap's free pages back after calls that grew the process: one call at a time per process
    (resident memory is the whole process's), as BentoML runs a sync API (one thread by default)."""

    def __init__(self) -> None:
        self.floor: int | None = None  # resident bytes after the last trim
        self.again: threading.Timer | None = None  # the trim after the last large call's answer

    @contextmanager
    def call(self) -> Iterator[None]:
        before = resident_bytes()
        self.floor = before if self.floor is None else self.floor
        try:
            yield
        finally:
            after = resident_bytes()
            if (after > before + TRIM_OVER or after > self.floor + KEEP) and (libc := _glibc()) is not None:
                if self.again is not None:  # one pending at a time: the latest call's answer is the one
                    self.again.cancel()
                give_back(libc)
                self.floor = resident_bytes()
                self.again = threading.Timer(LATER, give_back, (libc,))  # the answer's buffers, once sent
                self.again.daemon = True
                self.again.start()
