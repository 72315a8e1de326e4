"""Run `bentoml serve` (the working tree's service, or a built Bento by tag) as a subprocess and wait until
it is ready (tests, benchmarks)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_service(
    env: dict[str, str], log: Path, target: str = "service:AgeGender", cwd: Path = ROOT, timeout: float = 180
) -> Iterator[str]:
    """Yield the base URL of a ready `bentoml serve target` started in `cwd` with os.environ + env; stop it
    (all workers) after. Meanwhile `running_service.pid` is the arbiter's pid (tests read the memory of
    its `descendants`).

    Each service gets a BENTOML_HOME of its own whose `models` and `bentos` are the shared store's: every
    `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts, which would blank the
    /metrics of any other service still running on the same home."""
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    shared = Path(env.get("BENTOML_HOME") or os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    home = Path(tempfile.mkdtemp(prefix="serve-home-"))
    for store in ("models", "bentos"):
        (shared / store).mkdir(parents=True, exist_ok=True)
        (home / store).symlink_to((shared / store).resolve())
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **env, "BENTOML_HOME": str(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    running_service.pid = proc.pid
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)  # the links only: rmtree does not follow them


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it (BentoML starts each worker in a session of its own, so the
    process group does not hold them; the parent links do)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # the process ended meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found = [pid]
    for p in found:  # grows while it is read: breadth first down the tree
        found += [child for child, parent in parents.items() if parent == p]
    return sorted(found)


def arbiter_pid(url: str) -> int:
    """The pid of the `bentoml serve` process listening on this URL's port."""
    port = url.rsplit(":", 1)[1]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in args and b"--port" in args and args[args.index(b"--port") + 1] == port.encode():
            return int(cmdline.parent.name)
    raise LookupError(f"no bentoml serve process on port {port}")


def smaps_kb(pid: int | str = "self") -> dict[str, int]:
    """A process's memory totals from /proc/<pid>/smaps_rollup, kB: Rss, Pss (its share of shared pages),
    Pss_Anon (the heap, where a leak grows), ..."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0])
    return out


def pss_kb(pid: int) -> int:
    """Proportional set size of a process (its share of shared pages included), kB."""
    return smaps_kb(pid)["Pss"]


def service_name(pid: int) -> str | None:
    """A BentoML worker's service name (`--service-name X` on its command line), else None."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return args[args.index(b"--service-name") + 1].decode() if b"--service-name" in args else None
