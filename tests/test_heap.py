"""A detector process's heap (serving/heap.py), each case in a fresh process, the work in a thread as
BentoML runs a detector's calls: blocks of 4 MB, each followed by a 1 MB block unless the mode says `top`
(so that freeing them leaves holes glibc keeps; with `top`, they end as free space at the top of the
thread's heap, which malloc_trim does not give back there). Printed: resident MB
above the level before the calls."""

from __future__ import annotations

import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest

from serving import heap
from serving.heap import KEEP
from tests.conftest import ROOT

WORK = """
import ctypes, sys, threading, time
from serving import heap
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
assert heap.keep_buffers_while_working()
mode, calls = sys.argv[1], [int(n) for n in sys.argv[2:]]  # blocks of 4 MB in each call
trimmer = heap.HeapTrimmer()
def work(blocks):
    pairs = [(libc.malloc(4 << 20), None if "top" in mode else libc.malloc(1 << 20)) for _ in range(blocks)]
    for big, _ in pairs:
        ctypes.memset(big, 1, 4 << 20)
    for big, _ in pairs:
        libc.free(big)
def calls_in_a_thread():
    for blocks in calls:
        if mode.endswith("trimmed"):
            with trimmer.call():
                work(blocks)
        elif mode == "answer":  # a large call, then its answer serialized after it (BentoML does so)
            with trimmer.call():
                work(blocks)
            work(blocks)
            time.sleep(heap.LATER + 0.5)
        else:
            work(blocks)
before = heap.resident_bytes()
thread = threading.Thread(target=calls_in_a_thread)
thread.start()
thread.join()
print((heap.resident_bytes() - before) >> 20)
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator: mallopt, malloc_trim")


def _kept_mb(mode: str, *calls: int) -> int:
    cmd = [sys.executable, "-c", WORK, mode, *map(str, calls)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@glibc_only
def test_the_heap_keeps_what_a_call_freed_until_it_is_trimmed() -> None:
    """Freed blocks stay for the next call to reuse, in holes and at the top of a thread's heap alike (no
    trimming of the top at each free: 0 MB kept with it); a call that took 200 MB gives them back."""
    assert _kept_mb("plain", 50) > 150
    assert _kept_mb("top", 10) >= 30  # 40 MB: within one of a thread's heaps (64 MB each)
    assert _kept_mb("trimmed", 50) < 50


@glibc_only
def test_the_top_of_a_threads_heap_is_given_back() -> None:
    """A 50 Mpx photo left a detector process 58-66 MB larger, all at the top of its worker thread's heap."""
    assert _kept_mb("top trimmed", 10) < 10  # 40 MB with malloc_trim alone


@glibc_only
def test_small_calls_keep_their_memory_for_reuse() -> None:
    assert _kept_mb("trimmed", 3, 3, 3) >= 10  # 12 MB, under TRIM_OVER: kept, not trimmed each time


@glibc_only
def test_what_is_freed_after_a_large_call_is_given_back_too() -> None:
    """What a large call's answer took, serialized after the call returned (an annotated 50 Mpx photo:
    tens of MB), is given back too, a moment later."""
    assert _kept_mb("answer", 50) < 50


def test_growths_under_the_per_call_limit_add_up_to_a_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule alone (glibc's own heap is too clever to show it reliably): calls that each leave 24 MB
    more, under TRIM_OVER, are trimmed once the process is KEEP over its level after the last trim."""
    resident, trims = [1 << 30], list[object]()
    monkeypatch.setattr(heap, "resident_bytes", lambda: resident[0])
    monkeypatch.setattr(heap, "_glibc", SimpleNamespace)
    monkeypatch.setattr(heap, "give_back", trims.append)
    trimmer, calls = heap.HeapTrimmer(), 0
    while not trims and calls < 8:
        with trimmer.call():
            resident[0] += 24 << 20
        calls += 1
    assert calls == KEEP // (24 << 20) + 1, f"first trim after {calls} calls"
