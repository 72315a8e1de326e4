"""The batch command's files (predict/rows.py, predict/runners.py): which photos a run finds, how its results
file survives odd names, foreign files, a full disk and a detection process that dies."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devtools.photos import astronaut, no_face
from models.errors import UserError
from models.schemas import PhotoResult
from predict.rows import Output, photos
from predict.runners import TRANSIENT, _detect, run_remote


def _dies_on_oom(path: Path):
    """predict.runners._detect, but a photo named oom.jpg ends its process, as the OOM killer would."""
    if path.name == "oom.jpg":
        os._exit(137)
    return _detect(path)


def test_folders_are_searched_through_links_and_lists_like_the_command_line(tmp_path: Path) -> None:
    elsewhere, photos_dir = tmp_path / "elsewhere", tmp_path / "photos"
    elsewhere.mkdir(), photos_dir.mkdir()
    astronaut().save(elsewhere / "a.jpg")
    no_face("coffee").save(photos_dir / "b.jpg")
    (photos_dir / "linked").symlink_to(elsewhere)  # a folder reached through a link
    (photos_dir / "loop").symlink_to(photos_dir)  # and a link back up: each folder once
    (photos_dir / "gone.jpg").symlink_to(elsewhere / "deleted.jpg")  # a photo whose row will say it is gone
    os.mkfifo(photos_dir / "pipe.jpg")  # reading it would wait for a writer forever: left out
    for name in ("IMG_1.HEIC", "notes.txt", "more.TXT", "README"):
        (photos_dir / name).write_text("not a photo")
    found, passed_over = photos([str(photos_dir)])
    assert sorted(p.name for p in found) == ["a.jpg", "b.jpg", "gone.jpg"]
    assert passed_over == {".txt": 2, ".heic": 1, "no suffix": 1}  # the command's summary names them
    listing = tmp_path / "list.txt"
    listing.write_text(f"\ufeff{photos_dir / 'b.jpg'}\n   # an indented comment\n{elsewhere}\n", encoding="utf-8")
    assert [p.name for p in photos([f"@{listing}"])[0]] == ["b.jpg", "a.jpg"]  # BOM dropped, folder searched


def test_inputs_that_cannot_be_read_stop_the_run_before_it_starts(tmp_path: Path, monkeypatch) -> None:
    os.mkfifo(tmp_path / "fifo.jpg")  # reading it would wait for a writer forever
    with pytest.raises(UserError, match="fifo.jpg is neither a file nor a folder"):
        photos([str(tmp_path / "fifo.jpg")])
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path):  # a folder its user may not list (chmod 000 does not stop root, who runs CI)
        if str(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match="cannot list the folder .*locked: Permission denied"):
        photos([str(tmp_path)])


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_file_names_that_are_not_utf8_round_trip(suffix: str, tmp_path: Path) -> None:
    name = os.fsdecode(b"bad\xffbyte.jpg")  # any bytes but / make a Linux file name
    out = tmp_path / f"faces.{suffix}"
    with Output(out) as output:
        output.write([{"file": name, "face": None, "error": None}])
    with Output(out) as output:
        assert output.done(set()) == {name}


@pytest.mark.parametrize(
    ("suffix", "content"),
    [
        ("jsonl", b'{"file": "x"}\nnot json\n'),
        ("jsonl", b"[1]\n"),
        ("jsonl", b"\xff\xfe\n"),
        ("jsonl", b'{"file": 5}\n'),
        ("csv", b"a,b\n1,2\n"),
        ("csv", b"name,age\nalice,30\nbob,41"),  # no last newline
        ("csv", b"name,age\n"),  # another tool's header, no rows yet: ours would go under it
        ("csv", b"file,size\nbig.jpg,3\n"),  # a column of ours among others
        ("csv", b"hello\n"),
        ("csv", b"name,age"),  # one line, cut short as a killed run's last line may be: not ours, not cut away
        ("jsonl", b'{"a": 1}'),
    ],
)
def test_an_out_file_of_something_else_is_refused(suffix: str, content: bytes, tmp_path: Path) -> None:
    out = tmp_path / f"faces.{suffix}"
    out.write_bytes(content)
    with pytest.raises(UserError, match="is not a results file of this command"), Output(out) as output:
        output.done(set())
    assert out.read_bytes() == content  # left as it was


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_rows_of_photos_to_try_again_go_before_they_are_tried(suffix: str, tmp_path: Path) -> None:
    out = tmp_path / f"faces.{suffix}"
    with Output(out) as output:
        output.write([{"file": "a.jpg", "face": 0, "age": 30.5}, {"file": "a.jpg", "face": 1, "age": 41.25}])
        output.write([{"file": "b.jpg", "face": None, "error": f"{TRANSIENT} 6 tries: HTTP 503: busy"}])
        output.write([{"file": "c.jpg", "face": None, "error": "the file is empty"}])
        output.write([{"file": "d.jpg", "face": None, "error": f"{TRANSIENT} 6 tries: HTTP 503: busy"}])
    out.chmod(0o600)
    kept = [line for line in out.read_text().splitlines() if "b.jpg" not in line]
    with Output(out) as output:
        assert output.done({"a.jpg", "b.jpg"}) == {"a.jpg", "c.jpg"}  # this run: a.jpg and b.jpg
        assert out.read_text().splitlines() == kept  # b.jpg's row gone; d.jpg's, not this run's, kept
        assert out.stat().st_mode & 0o777 == 0o600  # and the file's permissions
        with pytest.raises(UserError, match="being written by another run"), Output(out):
            pass  # the new file is locked as the old one was
        output.write([{"file": "b.jpg", "face": None, "error": "the file is empty"}])
    with Output(out) as output:
        assert output.done({"a.jpg", "b.jpg"}) == {"a.jpg", "b.jpg", "c.jpg"}
    assert out.read_text().splitlines()[:-1] == kept and not list(tmp_path.glob(".kept*"))


def test_a_second_run_on_one_results_file_stops_at_once(tmp_path: Path) -> None:
    out = tmp_path / "faces.jsonl"
    with Output(out) as output:
        output.write([{"file": "a.jpg", "face": None, "error": None}])
        before = out.read_bytes()
        with pytest.raises(UserError, match="being written by another run of this command"), Output(out):
            pass
        assert out.read_bytes() == before  # and the first run's file is left as it was
    with Output(out) as output:  # once the first run is over, the next one may go on
        assert output.done(set()) == {"a.jpg"}


def test_a_results_file_replaced_while_it_is_locked_is_locked_again(tmp_path: Path, monkeypatch) -> None:
    """Another run replaces the file (dropping rows to retry) between this run's open and its lock: the lock
    is then on a file without the name, so it is taken again on the file that has it."""
    out = tmp_path / "faces.jsonl"
    out.write_text('{"file": "a.jpg"}\n')
    real_flock, replaced = fcntl.flock, []

    def flock(fd: int, operation: int) -> None:
        if not replaced:
            (tmp_path / "new.jsonl").write_text('{"file": "b.jpg"}\n')
            os.replace(tmp_path / "new.jsonl", out)
            replaced.append(True)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with Output(out) as output:
        assert os.fstat(output.fd).st_ino == out.stat().st_ino
        output.write([{"file": "c.jpg", "face": None}])
    assert [json.loads(line)["file"] for line in out.read_text().splitlines()] == ["b.jpg", "c.jpg"]


def test_detection_processes_that_die_every_time_stop_the_run(model_tag: str, tmp_path: Path) -> None:
    from models.predictor import Predictor
    from predict import runners

    paths = [tmp_path / "oom.jpg"] * 20  # every photo ends its process: no pool detects anything
    astronaut().save(paths[0])
    runners._detect = _dies_on_oom
    outcomes = []
    try:
        with pytest.raises(UserError, match="died twice in a row before detecting a photo"):
            outcomes.extend(runners.run_local(Predictor.from_store(model_tag), paths, 2))
    finally:
        runners._detect = _detect
    assert 0 < len(outcomes) < len(paths) and all(error.startswith(TRANSIENT) for _, _, error in outcomes)


def test_a_disk_that_fills_up_leaves_none_of_a_photos_rows(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "faces.jsonl"
    with Output(out) as output:
        output.write([{"file": "first.jpg", "face": 0}])
        before = out.read_bytes()
        real_write = os.write

        def full(fd, data):  # half of it fits, then the disk is full
            if len(data) > 1000:
                real_write(fd, data[: len(data) // 2])
                return len(data) // 2
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(OSError, match="No space left"):
            output.write([{"file": "crowd.jpg", "face": i} for i in range(100)])
    assert out.read_bytes() == before


def test_a_detection_process_that_dies_costs_only_the_photos_in_flight(model_tag: str, tmp_path: Path) -> None:
    """The OOM killer, played by a photo whose detection ends its process: the photos in flight then get a
    TRANSIENT row (a rerun tries them), every photo gets exactly one outcome, the run goes on."""
    from models.predictor import Predictor
    from predict import runners

    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i:02d}.jpg")
        astronaut().save(paths[-1])
    paths[3] = tmp_path / "oom.jpg"
    astronaut().save(paths[3])
    runners._detect = _dies_on_oom  # the pool's processes are forked from this one: they see it too
    try:
        outcomes = list(runners.run_local(Predictor.from_store(model_tag), paths, 2))
    finally:
        runners._detect = _detect
    assert sorted(p.name for p, _, _ in outcomes) == sorted(p.name for p in paths)
    lost = {p.name for p, _, error in outcomes if error}
    assert "oom.jpg" in lost and len(lost) <= 8, lost  # at most IN_FLIGHT_PER_WORKER x workers
    assert all(error.startswith(TRANSIENT) and "died" in error for _, _, error in outcomes if error)
    assert all(len(result.faces) == 1 for p, result, _ in outcomes if p.name not in lost)
    assert next(result for p, result, _ in outcomes if p == paths[-1])  # sent after the loss: new processes


@contextlib.contextmanager
def stand_in_service(answer) -> Iterator[str]:
    """A local HTTP server whose every POST is answered by answer(headers) -> (status, headers, JSON body)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # connections kept open between requests, as uvicorn keeps them

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            status, headers, body = answer(self.headers)
            data = json.dumps(body).encode()
            self.send_response(status)
            for item in {**headers, "content-length": str(len(data))}.items():
                self.send_header(*item)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


NO_FACE = {"width": 1, "height": 1, "faces": []}


def test_url_mode_sends_the_api_key_and_stops_at_a_401(tmp_path: Path) -> None:
    def keyed(headers):  # a service started with AGE_GENDER_API_KEY=k, as serving/edge.py checks it
        if headers.get("authorization") == "Bearer k":
            return 200, {}, NO_FACE
        return 401, {}, {"error": "missing or wrong API key"}

    photo = tmp_path / "a.jpg"
    astronaut().save(photo)
    with stand_in_service(keyed) as url:
        [(_, result, error)] = list(run_remote(url, [photo], 1, 0, 10, api_key="k"))
        assert error is None and result is not None and result.faces == []
        got: list = []
        with pytest.raises(UserError, match="refused the API key .*HTTP 401: missing or wrong API key.*--api-key"):
            got.extend(run_remote(url, [photo] * 20, 2, 5, 10))  # no key: the first 401 ends the run, no retries
        # and no photo gets a row: a rerun with the key skips the photos that have one
        assert got == []


def test_url_mode_stops_at_an_address_that_is_not_the_service(tmp_path: Path) -> None:
    """--url with a path (a proxy's prefix, a typo): every photo gets a 404, which rows would keep for good."""
    photo = tmp_path / "a.jpg"
    astronaut().save(photo)
    with stand_in_service(lambda headers: (404, {}, {"detail": "Not Found"})) as url:
        got: list = []
        with pytest.raises(UserError, match=r"/v1/predict answered HTTP 404: .*without a path, with --url"):
            got.extend(run_remote(url + "/v1", [photo] * 8, 2, 5, 10))
        assert got == []


def test_url_mode_sends_no_file_that_is_not_an_image(tmp_path: Path) -> None:
    calls: list[int] = []
    photo, text = tmp_path / "a.jpg", tmp_path / "notes.jpg"
    astronaut().save(photo)
    text.write_bytes(b"just some text")
    with stand_in_service(lambda headers: calls.append(1) or (200, {}, NO_FACE)) as url:
        rows = {p.name: (result, error) for p, result, error in run_remote(url, [text, photo], 1, 0, 10)}
    assert rows["notes.jpg"][1] is not None and "not an image in an accepted format" in rows["notes.jpg"][1]
    assert rows["a.jpg"] == (PhotoResult(**NO_FACE), None) and calls == [1]


def test_url_mode_waits_as_long_as_a_busy_service_asks(tmp_path: Path) -> None:
    calls: list[float] = []

    def busy_once(headers):
        calls.append(time.monotonic())
        return (429, {"retry-after": "2"}, {"error": "busy"}) if len(calls) == 1 else (200, {}, NO_FACE)

    photo = tmp_path / "a.jpg"
    astronaut().save(photo)
    with stand_in_service(busy_once) as url:
        [(_, result, error)] = list(run_remote(url, [photo], 1, 3, 10))
    assert error is None and len(calls) == 2
    assert calls[1] - calls[0] >= 2  # its own first backoff is 0.5 s


def test_the_command_takes_the_key_from_the_environment_and_never_shows_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT, assert_one_line_error

    def keyed(headers):
        ok = headers.get("authorization") == "Bearer s3cret"
        return (200, {}, NO_FACE) if ok else (401, {}, {"error": "missing or wrong API key"})

    photo = tmp_path / "a.jpg"
    astronaut().save(photo)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AGE_GENDER_API_KEY": "s3cret"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "predict", *args], env=env, capture_output=True, text=True)

    assert "s3cret" not in run("--help").stdout
    with stand_in_service(keyed) as url:
        ok = run(str(photo), "--out", str(tmp_path / "ok.jsonl"), "--url", url)
        assert ok.returncode == 0 and "1 photos (0 already in" in ok.stdout, ok.stderr
        wrong = run(str(photo), "--out", str(tmp_path / "wrong.jsonl"), "--url", url, "--api-key", "guess")
        assert "refused the API key" in assert_one_line_error(wrong)
