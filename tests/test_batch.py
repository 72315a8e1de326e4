"""The Python API (models/predictor.py) and the batch command (`python -m predict`), against the real service."""

from __future__ import annotations

import asyncio
import csv
import json
import socket
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from devtools.photos import astronaut, encode, group_photo, no_face
from models.errors import UserError

from .conftest import ROOT, assert_one_line_error

PY = "predict"


def run_predict(*args: str, **env: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", PY, *args], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """Photos with 1, 3 and 0 faces (one in a subfolder, one PNG), a corrupt JPEG and a text file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "nested").mkdir()
    astronaut().save(root / "astronaut.jpg", quality=92)
    group_photo()[0].save(root / "nested" / "group.png")
    no_face("coffee").save(root / "coffee.JPG")
    (root / "broken.jpg").write_bytes(encode(astronaut())[:2000])
    (root / "notes.txt").write_text("not a photo, and not picked up from a folder")
    return root


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open() as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_python_api_answers_as_the_service(server: str, model_tag: str, photo_dir: Path) -> None:
    from models.predictor import Predictor

    predictor = Predictor.from_store(model_tag)
    path = photo_dir / "astronaut.jpg"
    local = predictor.predict(path).model_dump()
    served = httpx.post(server + "/predict", files={"image": ("a.jpg", path.read_bytes(), "image/jpeg")}).json()
    assert local["faces"][0]["box"] == served["faces"][0]["box"]
    assert local["faces"][0]["age"] == pytest.approx(served["faces"][0]["age"], abs=0.02)
    assert local["faces"][0]["gender"] == served["faces"][0]["gender"]
    many = predictor.predict_many([path, astronaut(), (photo_dir / "coffee.JPG").read_bytes()])
    assert [len(r.faces) for r in many] == [1, 1, 0]
    with pytest.raises(UserError, match="not an image"):
        predictor.predict(b"plain text")


def test_local_and_url_modes_give_the_same_rows(server: str, model_tag: str, photo_dir: Path, tmp_path: Path):
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    r = run_predict(str(photo_dir), "--out", str(local), "--model", model_tag, "--workers", "2")
    # the broken photo: its row says why, and the exit code that not every photo was answered
    assert r.returncode == 1 and f"photos not answered: 1; their rows in {local} say why" in r.stderr, r.stderr
    assert "4 photos (0 already in" in r.stdout and "4 faces, 1 errors" in r.stdout
    assert "1 other files passed over (.txt 1)" in r.stdout  # notes.txt: not a photo's suffix
    assert "photo/s" in r.stderr  # tqdm's progress bar
    r = run_predict(str(photo_dir), "--out", str(remote), "--url", server, "--concurrency", "3")
    assert r.returncode == 1, r.stderr

    def by_key(path: Path) -> dict:
        return {(row["file"], row["face"]): row for row in read_rows(path)}

    a, b = by_key(local), by_key(remote)
    assert a.keys() == b.keys() and len(a) == 6  # astronaut 1 + group 3 faces, coffee and broken one row each
    for key, row in a.items():
        other = b[key]
        assert (row["error"] is None) == (other["error"] is None), (row, other)
        if row["face"] is None:
            continue
        assert [row[k] for k in ("x", "y", "width", "height", "gender")] == [
            other[k] for k in ("x", "y", "width", "height", "gender")
        ]
        for k in ("age", "age_low", "age_high", "minor_probability", "gender_probability"):
            assert row[k] == pytest.approx(other[k], abs=0.05), (key, k)
    broken = a[(str(photo_dir / "broken.jpg"), None)]["error"]
    assert "truncated" in broken or "cannot" in broken, broken
    assert b[(str(photo_dir / "broken.jpg"), None)]["error"] == broken  # the same words, whichever mode
    refused = tmp_path / "refused"  # and for what the service's upload checks refuse before decoding
    refused.mkdir()
    (refused / "empty.jpg").write_bytes(b"")
    (refused / "notes.jpg").write_text("a text file named like a photo")
    # 9 Mpx in ~1 kB: under the test server's AGE_GENDER_MAX_PIXELS, over the pixels per byte of any photo
    (refused / "bomb.png").write_bytes(encode(Image.new("1", (3000, 3000)), "PNG"))
    (refused / "gone.jpg").symlink_to(refused / "deleted.jpg")  # a link to a photo that was deleted
    errors = []
    for i, mode in enumerate((["--model", model_tag], ["--url", server])):
        run_predict(str(refused), "--out", str(tmp_path / f"refused{i}.jsonl"), *mode)
        errors.append({row["file"]: row["error"] for row in read_rows(tmp_path / f"refused{i}.jsonl")})
    assert errors[0] == errors[1] and len(errors[0]) == 4 and all(errors[0].values()), errors
    assert errors[0][str(refused / "gone.jpg")] == "cannot read the file: No such file or directory"
    assert a[(str(photo_dir / "coffee.JPG"), None)]["error"] is None  # a photo without faces: one empty row


def test_resume_and_csv(model_tag: str, photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "faces.csv"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photo_dir / 'astronaut.jpg'}\n{photo_dir / 'notes.txt'}\n")
    r = run_predict(f"@{listing}", "--out", str(out), "--model", model_tag, "--workers", "1")
    assert r.returncode == 1, r.stderr  # notes.txt is not a photo
    first = {row["file"]: row for row in read_rows(out)}  # rows come in the order photos finish
    assert set(first) == {str(photo_dir / "astronaut.jpg"), str(photo_dir / "notes.txt")}
    assert "not an image" in first[str(photo_dir / "notes.txt")]["error"]  # a named file is tried, photo or not
    with out.open("a") as f:
        f.write(f"{photo_dir / 'coffee.JPG'},,1,2")  # a line cut short by a killed run
    r = run_predict(str(photo_dir), f"@{listing}", "--out", str(out), "--model", model_tag, "--workers", "1")
    assert r.returncode == 1, r.stderr  # the broken photo
    assert "5 photos (2 already in" in r.stdout, r.stdout
    rows = read_rows(out)
    assert out.read_text().count("file,face,") == 1  # one header
    assert len({row["file"] for row in rows}) == 5 and len(rows) == len(first) + 5  # 3 new photos, 5 rows
    assert [row["file"] for row in rows].count(str(photo_dir / "astronaut.jpg")) == 1


def test_local_detection_takes_the_services_settings(model_tag: str, photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "faces.jsonl"
    group, astronaut_jpg = photo_dir / "nested" / "group.png", photo_dir / "astronaut.jpg"
    options = ["--max-faces", "2", "--max-pixels", "300000", "--min-face-size", "30", "--score-threshold", "0.9"]
    r = run_predict(str(group), str(astronaut_jpg), "--out", str(out), "--model", model_tag, *options)
    assert r.returncode == 1, r.stderr  # the group photo: 960x640 is over --max-pixels
    rows = {row["file"]: row for row in read_rows(out)}
    assert "the limit is 300000 pixels" in rows[str(group)]["error"]
    assert rows[str(astronaut_jpg)]["face"] == 0  # its face is over 30 px and scores over 0.9
    r = run_predict(str(group), "--out", str(tmp_path / "group.jsonl"), "--model", model_tag, "--max-faces", "2")
    assert r.returncode == 0, r.stderr
    assert [row["face"] for row in read_rows(tmp_path / "group.jsonl")] == [0, 1]  # 3 faces, the largest 2
    for option in (["--min-face-size", "200"], ["--score-threshold", "1"]):  # the astronaut's face: ~90 px, 0.99+
        out = tmp_path / f"none{option[0]}.jsonl"
        r = run_predict(str(astronaut_jpg), "--out", str(out), "--model", model_tag, *option, "--no-small-faces")
        assert r.returncode == 0 and [row["face"] for row in read_rows(out)] == [None], (option, r.stderr)


def test_a_run_that_fails_before_its_first_photo_leaves_no_file(bentoml_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "faces.csv"
    assert "is not in the BentoML store" in assert_one_line_error(
        run_predict(str(tmp_path), "--out", str(out), "--model", "age_gender:nope")
    )
    assert not out.exists()
    out.write_text("file,face\n")  # a file the user had: kept
    run_predict(str(tmp_path), "--out", str(out), "--model", "age_gender:nope")
    assert out.read_text() == "file,face\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "x.txt", "."], "--out must end in .jsonl or .csv"),
        (["--out", "x.jsonl", "no/such/folder"], "does not exist"),
        (["--out", "x.jsonl", "--model", "age_gender:nope", "."], "is not in the BentoML store"),
        (["--out", "x.jsonl", "--max-pixels", "0", "."], "--max-pixels: must be at least 1, not 0"),
        (["--out", "x.jsonl", "--score-threshold", "nan", "."], "--score-threshold: must be 0-1, not nan"),
        (["--out", "x.jsonl", "--url", "http://x", "--min-face-size", "9", "."], "--min-face-size is an option of"),
        (["--out", "x.jsonl", "--url", "http://x", "--no-small-faces", "."], "--no-small-faces is an option of"),
        (["--out", "x.jsonl", "--concurrency", "3", "."], "--concurrency is an option of --url mode"),
        (["--out", "x.txt", "no/such/folder"], "--out must end in .jsonl or .csv"),  # before the folders
        (
            ["--out", "README.md/x.jsonl", "--url", "http://127.0.0.1:9", "README.md"],
            "README.md: File exists",
        ),  # its folder, a file
    ],
)
def test_bad_arguments_fail_in_one_line(args: list[str], message: str, bentoml_home: Path, tmp_path: Path) -> None:
    assert message in assert_one_line_error(run_predict(*args))


def test_debug_raises_with_the_cause(bentoml_home: Path) -> None:
    result = run_predict("--out", "x.jsonl", "--model", "age_gender:nope", ".", AGE_GENDER_DEBUG="1")
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "The above exception was the direct cause of the following exception" in result.stderr  # NotFound
    assert "UserError: model 'age_gender:nope' is not in the BentoML store" in result.stderr


def test_url_mode_retries_busy_answers(photo_dir: Path, tmp_path: Path) -> None:
    """A stand-in for an overloaded service: 503, then 429, then the answer; the row is the answer."""
    answer = {"width": 512, "height": 512, "faces": []}
    calls: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        calls.append(1)
        status, body = {1: (503, {"error": "busy"}), 2: (429, {"error": "slow down"})}.get(len(calls), (200, answer))
        data = json.dumps(body).encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        writer.write(head.encode() + data)
        await writer.drain()
        writer.close()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(handle, sock=sock))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        out = tmp_path / "r.jsonl"
        r = run_predict(str(photo_dir / "coffee.JPG"), "--out", str(out), "--url", f"http://127.0.0.1:{port}")
        assert r.returncode == 0, r.stderr
        (row,) = read_rows(out)
        assert len(calls) == 3 and row["file"] == str(photo_dir / "coffee.JPG") and row["error"] is None
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_each_photos_rows_reach_the_file_in_one_write(suffix: str, tmp_path: Path, monkeypatch) -> None:
    import os

    from predict.rows import Output

    out = tmp_path / f"faces.{suffix}"
    writes: list[int] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    crowd = [{"file": "crowd.jpg", "face": i, "age": 30.5, "gender": "female"} for i in range(500)]
    with Output(out) as output:
        header = len(writes)
        output.write(crowd)  # over 8 KiB: more than a file object's buffer, which writes such rows in pieces
    assert len(writes) == header + 1 and writes[-1] > 8192
    inode, whole = out.stat().st_ino, out.read_bytes()
    with out.open("ab") as f:
        f.write(b'{"file": "next.jpg", "fa')  # a run killed mid-line
    with Output(out) as output:
        assert output.done(set()) == {"crowd.jpg"}
    assert out.read_bytes() == whole and out.stat().st_ino == inode  # cut in place, nothing rewritten


def test_python_api_takes_a_pil_image_as_it_takes_its_file(model_tag: str) -> None:
    import io

    import numpy as np
    from PIL import Image

    from models.predictor import Predictor

    predictor = Predictor.from_store(model_tag)
    photo = astronaut()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored turned, shown upright
    grey = np.asarray(photo.convert("L"))
    files = {
        "EXIF-turned JPEG": encode(photo, "JPEG", exif=exif),
        "16-bit grey PNG": encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        "transparent PNG": encode(Image.fromarray(np.dstack([np.asarray(photo), np.zeros_like(grey)])), "PNG"),
    }
    for name, data in files.items():
        as_file, as_image = predictor.predict(data), predictor.predict(Image.open(io.BytesIO(data)))
        assert as_image == as_file, name
    assert len(predictor.predict(files["16-bit grey PNG"]).faces) == 1  # scaled to 8 bits, not clamped
    assert predictor.predict(files["transparent PNG"]).faces == []  # over white: nothing to see
    for call, bad, message in [
        (predictor.predict_faces, [], "at least one cropped face"),
        (predictor.predict_faces, [photo], "must be a path or bytes, not Image"),
        (predictor.predict_faces, b"...", "takes a list"),
        (predictor.predict_many, "photo.jpg", "takes a list"),
        (predictor.predict, 12, "not int"),
        (predictor.predict, grey, r"not a \(512, 512\) uint8 array"),  # what is wrong with it
        (predictor.predict_many, [photo, b"junk"], "image #2: "),  # which one
    ]:
        with pytest.raises(UserError, match=message):
            call(bad)
    assert len(predictor.predict_faces([bytearray(encode(photo.resize((200, 200))))])) == 1
    with pytest.raises(UserError, match="takes a list"):
        predictor.predict_many(np.asarray(photo))  # one image, not a list of rows
    with pytest.raises(UserError, match="level: .*0.5"):
        Predictor.from_store(model_tag, level=0.3)
