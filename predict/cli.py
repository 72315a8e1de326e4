"""`python -m predict PHOTOS... --out faces.jsonl [--url URL]`: every face in every photo, one row each.

PHOTOS are files, folders (searched recursively) and @list files. The output (JSONL or CSV, by its
suffix) gets one row per face (file, face index, box, detection score, age, interval, P(minor), gender,
probability) and one row per photo without a face or with an error; errors never stop the run, and
exit code 1 says a photo of this run has one. Run it again with the same --out and it skips the photos already
there. Bad arguments: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

from tqdm import tqdm

from models.artifact import INTERVAL_LEVEL, MODEL_NAME
from models.cli import Debug, OneLineParser, at_least, exit_code, fraction, level, more_than
from models.errors import UserError
from models.faces import DetectorConfig
from models.images import MAX_PIXELS
from models.predictor import Predictor
from models.runtime import RUNTIMES, cpu_cores
from predict.rows import Output, photos, rows
from predict.runners import RETRY_STATUSES, Outcome, run_local, run_remote

# options of one mode only: given in the other, they would be ignored without a word
DETECTION = tuple(f.name for f in dataclasses.fields(DetectorConfig))  # each is an option of the same name
LOCAL_ONLY = ("model", "runtime", "workers", "level", "max_pixels", *DETECTION)
REMOTE_ONLY = ("api_key", "concurrency", "retries", "timeout")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m predict",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # every option's default in --help
    )
    p.add_argument("inputs", nargs="+", help="photo files, folders (recursive) or @file listing paths")
    out = "results file: .jsonl or .csv (appended; resumes)"
    p.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS, help=out)
    p.add_argument(
        "--url",
        default=None,
        help="send the photos to this running service's /predict (e.g. http://localhost:3000); without it they "
        "run in this process",
    )
    p.add_argument("--model", default=f"{MODEL_NAME}:latest", help="local mode: store tag or model folder")
    p.add_argument(
        "--runtime", default="auto", choices=RUNTIMES, help="local mode: how the network runs, as AGE_GENDER_RUNTIME"
    )
    p.add_argument("--detector", default=DetectorConfig.detector, help="local mode: mtcnn or haar")
    # local mode's detection and decoding, as the service's AGE_GENDER_* settings of the same names
    p.add_argument(
        "--min-face-size",
        type=at_least(1),
        default=DetectorConfig.min_face_size,
        help="local mode: smallest face answered, in pixels (12 finds faces from ~16 px in large photos, slowly)",
    )
    p.add_argument(
        "--score-threshold",
        type=fraction,
        default=DetectorConfig.score_threshold,
        help="local mode: the detector's face probability a face needs, 0-1",
    )
    p.add_argument(
        "--max-faces", type=at_least(1), default=DetectorConfig.max_faces, help="local mode: faces answered per photo"
    )
    p.add_argument(  # --small-faces / --no-small-faces: help's "(default: True)" then names the right one
        "--small-faces",
        action=argparse.BooleanOptionalAction,
        default=DetectorConfig.small_faces,
        help="local mode: a second pass for faces under ~75 px in photos over 640 px (off: faster on large photos)",
    )
    p.add_argument(
        "--max-pixels",
        type=at_least(1),
        default=MAX_PIXELS,
        help="local mode: larger photos get an error row instead of being decoded",
    )
    p.add_argument(
        "--workers",
        type=at_least(1),
        default=cpu_cores(),
        help="local mode: detection processes (the cores this process may use)",
    )
    p.add_argument(
        "--level", type=level, default=INTERVAL_LEVEL, help="local mode: level of the age interval, 0.5-0.98"
    )
    p.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,  # not shown by --help: the default is a secret
        help="--url mode: the service's API key (default: $AGE_GENDER_API_KEY, the variable the service reads)",
    )
    p.add_argument("--concurrency", type=at_least(1), default=8, help="--url mode: requests in flight")
    p.add_argument(
        "--retries",
        type=at_least(0),
        default=5,
        help=f"--url mode: retries, with exponential backoff, after HTTP {'/'.join(map(str, RETRY_STATUSES))}, "
        "a refused or dropped connection, or a timeout",
    )
    p.add_argument(
        "--timeout",
        type=more_than(0.0),
        default=120,
        help="--url mode: seconds to wait to connect, to send, and for each read of the answer",
    )
    p.add_argument("--debug", action=Debug)
    return p


def service_url(url: str) -> str:
    """--url checked before any photo is sent: http(s), a host, a port that can exist."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError where out of range
    except ValueError as exc:
        raise UserError(f"--url {url!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--url must look like http://host:port or https://host, got {url!r}")
    return url


class Counts(TypedDict):
    photos: int
    skipped: int  # already in the results file
    passed_over: Counter[str]  # files in the folders without a photo's suffix, by suffix
    faces: int
    errors: int


def run(args: argparse.Namespace) -> Counts:
    out = Output(args.out)  # its suffix checked before folders are searched
    todo, passed_over = photos(args.inputs)
    with out:  # locked: a second run on the same --out stops here
        done = out.done({str(p) for p in todo})
        todo_new = [p for p in todo if str(p) not in done]
        counts = Counts(photos=len(todo), skipped=len(todo) - len(todo_new), passed_over=passed_over, faces=0, errors=0)
        answers = outcomes(args, todo_new)  # the model loaded (or the URL checked) before the progress bar
        with tqdm(total=len(todo_new), unit="photo", desc="predict") as bar:
            for path, result, error in answers:
                out.write(rows(str(path), result, error))
                counts["faces"] += len(result.faces) if result else 0
                counts["errors"] += error is not None
                bar.update()
    return counts


def outcomes(args: argparse.Namespace, paths: list[Path]) -> Iterator[Outcome]:
    """The photos answered by the service at --url, or in this machine's processes."""
    if args.url:
        key = getattr(args, "api_key", os.environ.get("AGE_GENDER_API_KEY", ""))
        return run_remote(service_url(args.url), paths, args.concurrency, args.retries, args.timeout, key)
    detection = DetectorConfig(**{name: getattr(args, name) for name in DETECTION})
    options = {"runtime": args.runtime, "level": args.level, "detection": detection, "max_pixels": args.max_pixels}
    model = Path(args.model)
    predictor = (
        Predictor.from_folder(model, **options) if model.is_dir() else Predictor.from_store(args.model, **options)
    )
    return run_local(predictor, paths, args.workers)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in REMOTE_ONLY if args.url is None else LOCAL_ONLY:
        if getattr(args, name, p.get_default(name)) != p.get_default(name):
            option = {"small_faces": "--no-small-faces"}.get(name, "--" + name.replace("_", "-"))
            mode = "--url mode" if args.url is None else "local mode (without --url; the service's settings apply)"
            p.error(f"{option} is an option of {mode}")

    errors = 0

    def command() -> None:
        nonlocal errors
        counts = run(args)
        passed_over = counts["passed_over"]  # by suffix: a folder of .heic files says so
        kinds = ", ".join(f"{suffix} {n}" for suffix, n in passed_over.most_common(5))  # a line, not a listing
        other = f"; {passed_over.total()} other files passed over ({kinds})" if passed_over else ""
        print(
            f"{counts['photos']} photos ({counts['skipped']} already in {args.out}{other}): "
            f"{counts['faces']} faces, {counts['errors']} errors"
        )
        errors = counts["errors"]

    code = exit_code(command, "interrupted; run the same command again to go on where it stopped")
    if code == 0 and errors:  # scripts and job runners see the run did not answer every photo
        print(f"error: photos not answered: {errors}; their rows in {args.out} say why", file=sys.stderr)
        return 1
    return code
