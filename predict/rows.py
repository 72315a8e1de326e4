"""Inputs and outputs of the batch command: which photos, and one row per face (or per photo without faces
or with an error) in JSONL or CSV, appended as photos finish so that an interrupted run resumes."""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import itertools
import json
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from models.errors import UserError
from models.images import IMAGE_SUFFIXES
from models.schemas import PhotoResult
from predict.runners import TRANSIENT

FIELDS = (
    "file",
    "face",
    "x",
    "y",
    "width",
    "height",
    "detection_score",
    "age",
    "age_low",
    "age_high",
    "minor_probability",
    "gender",
    "gender_probability",
    "error",
)
FORMATS = ("jsonl", "csv")


def photos(inputs: list[str]) -> tuple[list[Path], Counter[str]]:
    """Files, folders (searched recursively for models.images.IMAGE_SUFFIXES, in any case, symbolic links
    followed) and @list files (one file or folder per line, relative to the current folder; `#` comments)
    -> (photos, in order, each once; the files in the folders passed over, by suffix). A broken link with a
    photo's suffix is a photo (its row says it cannot be read). Files named on the command line or in a
    list are tried whatever their suffix."""
    found: list[Path] = []
    passed_over: Counter[str] = Counter()
    for item in _listed(inputs):
        path = Path(item)
        if path.is_dir():
            for file in sorted(_files_under(path)):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(file)
                else:
                    passed_over[file.suffix.lower() or "no suffix"] += 1
        elif path.is_file():
            found.append(path)
        elif path.exists():  # reading a pipe or a device would wait for data that may never come
            raise UserError(f"{item} is neither a file nor a folder")
        else:
            raise UserError(f"{item} does not exist (give files, folders or @list files of paths)")
    return list(dict.fromkeys(found)), passed_over


def _listed(inputs: list[str]) -> Iterator[str]:
    """The inputs with each @list file replaced by the paths it lists."""
    for item in inputs:
        if not item.startswith("@"):
            yield item
            continue
        try:
            lines = Path(item[1:]).read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines()
        except OSError as exc:
            raise UserError(f"cannot read the list file {item[1:]}: {exc.strerror}") from exc
        yield from (line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))


def _files_under(folder: Path) -> Iterator[Path]:
    """The files anywhere under a folder, through symbolic links to folders (each real folder once); a
    subfolder that cannot be listed is a UserError, not photos silently left out."""

    def refuse(exc: OSError) -> None:
        raise UserError(f"cannot list the folder {exc.filename}: {exc.strerror}") from exc

    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, onerror=refuse, followlinks=True):
        info = os.stat(root)
        if (info.st_dev, info.st_ino) in seen:  # a link back up the tree, or a second link to one folder
            dirs.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        # files, and links to nothing (not pipes or devices, which a read could wait on for ever)
        yield from (p for p in (Path(root, name) for name in files) if p.is_file() or not p.exists())


def rows(file: str, result: PhotoResult | None, error: str | None) -> list[dict[str, Any]]:
    """One photo's outcome -> its output rows: one per face, or one with no face fields."""
    if error is not None or result is None or not result.faces:
        return [{"file": file, "face": None, "error": error}]
    out = []
    for i, face in enumerate(result.faces):
        interval = face.age_interval
        out.append(
            {
                "file": file,
                "face": i,
                **face.box.model_dump(),
                "detection_score": face.detection_score,
                "age": face.age,
                "age_low": interval.low if interval else None,
                "age_high": interval.high if interval else None,
                "minor_probability": face.minor_probability,
                "gender": face.gender,
                "gender_probability": face.gender_probability,
                "error": None,
            }
        )
    return out


def _transient(row: dict[str, Any]) -> bool:
    return (row.get("error") or "").startswith(TRANSIENT)


class Output:
    """Rows appended to a JSONL or CSV file (by its suffix), each photo's rows in one write: a run killed at
    any moment leaves whole photos, and at most a last line cut short, which the next run drops. The file
    is locked while open (flock(2)): a second run on it stops at once instead of answering every photo twice.
    Used as a context manager; done() and write() inside it."""

    fd: int  # open from __enter__ to __exit__
    unused: int | None  # the file's size before any photo's rows, where this run created it

    def __init__(self, path: Path) -> None:
        self.path = path
        self.format = path.suffix.lower().lstrip(".")
        if self.format not in FORMATS:
            raise UserError(f"--out must end in .{' or .'.join(FORMATS)}, got {path.name}")

    def done(self, retried: set[str]) -> set[str]:
        """Files already in the output: a second run skips them, except photos that failed for a while
        (TRANSIENT errors: a busy service, a detection process that died). Those of them in `retried` (this
        run's photos) lose their rows, the file replaced at once, to be answered again. The file is checked
        to be this command's first; then a last line cut short by an interrupt is dropped (that photo runs
        again)."""
        if not self.path.exists():
            return set()
        # file names that are not UTF-8 (any bytes but / on Linux) go through as Python holds them
        with self.path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        complete = text[: text.rfind("\n") + 1]  # a last line cut short is not read
        first, start = text.split("\n", 1)[0].rstrip("\r"), ",".join(FIELDS) if self.format == "csv" else '{"file": '
        done, again = set(), 0
        try:
            # nor cut away, if it is the only line, without starting as this command's first line does: the
            # file is another's (`name,age` with no newline), whose one line would go
            if text and not complete and not (start.startswith(first) or first.startswith(start)):
                raise ValueError(f"it holds {first[:40]!r}")
            for row in self._rows(complete):
                if not _transient(row):
                    done.add(row["file"])
                elif row["file"] in retried:
                    again += 1
        except (ValueError, KeyError, TypeError, AttributeError, csv.Error) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise UserError(f"{self.path} is not a results file of this command ({why}); give another --out") from exc
        if len(complete) < len(text):  # cut in place, so that a kill now loses nothing more
            os.truncate(self.path, len(complete.encode(errors="surrogateescape")))
        if again:
            self._rewrite(row for row in self._rows(complete) if not (_transient(row) and row["file"] in retried))
        return done

    def _rows(self, text: str) -> Iterator[dict[str, Any]]:
        """The rows of complete lines of the file's format; ValueError where they are not this command's (another
        tool's CSV header, a JSON line that names no file), whose rows would be appended to."""
        lines = io.StringIO(text, newline="")
        if self.format == "csv":
            rows = csv.DictReader(lines)
            if rows.fieldnames is not None and tuple(rows.fieldnames) != FIELDS:
                raise ValueError(f"its header is {','.join(rows.fieldnames)[:80]!r}, not {','.join(FIELDS[:3])},...")
            yield from rows
            return
        for line in filter(str.strip, lines):
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("file"), str):
                raise ValueError(f"a line that names no file: {line[:80]!r}")
            yield row

    def _rewrite(self, rows: Iterator[dict[str, Any]]) -> None:
        """The file replaced at once by these rows, with its permissions, where a link points to it."""
        path = self.path.resolve()
        kept = path.with_name(f".kept.{path.name}")  # same suffix: same format
        kept.unlink(missing_ok=True)  # a copy a killed run left
        try:
            with Output(kept) as out:
                while chunk := list(itertools.islice(rows, 10_000)):
                    out.write(chunk)
            os.chmod(kept, stat.S_IMODE(path.stat().st_mode))
            locked = _open_locked(kept)  # the new file is locked before it takes the name: no gap for another run
        except BaseException:
            kept.unlink(missing_ok=True)
            raise
        try:
            os.replace(kept, path)
        except BaseException:
            os.close(locked)
            kept.unlink(missing_ok=True)
            raise
        os.close(self.fd)
        self.fd = locked

    def __enter__(self) -> Output:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self.fd = _open_locked(self.path)
        try:
            if self.format == "csv" and os.fstat(self.fd).st_size == 0:
                self.write([dict(zip(FIELDS, FIELDS, strict=True))])  # the header
        except BaseException:
            os.close(self.fd)
            if created:
                self.path.unlink(missing_ok=True)
            raise
        # a run that fails before its first photo (a model that does not load) leaves no file it created
        self.unused = os.fstat(self.fd).st_size if created else None
        return self

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        text = io.StringIO(newline="")
        if self.format == "csv":
            csv.DictWriter(text, FIELDS, extrasaction="ignore").writerows(rows)
        else:
            text.writelines(json.dumps({k: row.get(k) for k in FIELDS}) + "\n" for row in rows)
        data = text.getvalue().encode(errors="surrogateescape")
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            while data:  # one write(2) for a regular file; the loop covers a short write (a disk filling up)
                data = data[os.write(self.fd, data) :]
        except OSError:
            os.ftruncate(self.fd, end)  # none of the photo's rows rather than some: a rerun answers it whole
            raise

    def __exit__(self, kind, *exc) -> None:
        if kind is not None and self.unused == os.fstat(self.fd).st_size:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _open_locked(path: Path) -> int:
    """The file opened for appending (created where missing), locked for this process; a UserError where
    another run holds it. Where the file system has no locks, it is opened unlocked."""
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{path} is being written by another run of this command: wait for it to end, or give another --out"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            return fd
        # the run that held it may have replaced (or removed) the file between the open and the lock: the
        # lock is then on a file without this name, and the rows written to it would be lost
        if _same_file(os.fstat(fd), path):
            return fd
        os.close(fd)


def _same_file(info: os.stat_result, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return (info.st_dev, info.st_ino) == (named.st_dev, named.st_ino)
