"""Which images a model was trained on, so that `evaluate` can refuse test images the model has seen.

Every training image is identified by the first 16 hex digits (64 bits) of the SHA-256 of its file
bytes, so a moved, renamed or re-split copy of the same file is still recognised. `fit` records the
sorted list in the checkpoint, `export` writes it into the model folder as `train_split.txt` (about
17 bytes an image: 330 KB for UTKFace's 19k training images) and puts its summary (count and a
SHA-256 over the list, the split's fingerprint) into the model's metadata.

Metadata re-run with another seed or with more data reshuffles the splits: its test split then holds
images the model trained on, and their metrics would look better than the model is.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from models.errors import UserError
from training.atomic import atomic_path

FILE = "train_split.txt"
HASH_CHARS = 16  # 64 bits: P(false match) ~ n_train * n_test / 2**64, about 2e-12 for UTKFace
HASH = f"sha256(file bytes)[:{HASH_CHARS}]"


def image_hash(path: str | Path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()[:HASH_CHARS]
    except OSError as exc:
        raise UserError(f"cannot read image {path} listed in the metadata ({exc.strerror})") from exc


def image_hashes(paths: Iterable[str | Path]) -> list[str]:
    """The sorted, distinct hashes of these images."""
    return sorted({image_hash(p) for p in paths})


def digest(hashes: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def summary(hashes: Sequence[str]) -> dict[str, Any]:
    """What the model's metadata records about its training images (the list itself is in FILE)."""
    return {"file": FILE, "n_images": len(hashes), "sha256": digest(hashes), "hash": HASH}


def write(path: str | Path, hashes: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(
            f"# training images of this model: {HASH}, sorted, one a line; read by `training evaluate`\n"
            + "".join(f"{h}\n" for h in sorted(hashes))
        )


def read(path: str | Path, expected: dict[str, Any]) -> set[str]:
    """The hashes in FILE, checked against the summary in the model's metadata."""
    path = Path(path)
    try:
        hashes = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    except OSError as exc:
        raise UserError(f"the model folder lacks {path.name} that its metadata names; export the model again") from exc
    if len(hashes) != expected.get("n_images") or digest(hashes) != expected.get("sha256"):
        raise UserError(f"{path} does not match the model's metadata (edited or damaged); export the model again")
    return set(hashes)


def check_held_out(trained: set[str], paths: Sequence[str], what: str, model: str, fix: str) -> None:
    """Refuse, in one line, images among `paths` (described by `what`) that `model` was trained on."""
    seen = [p for p in paths if image_hash(p) in trained]
    if seen:
        raise UserError(
            f"{len(seen)} of the {len(paths)} images in {what} were used to train {model} "
            f"(e.g. {Path(seen[0]).name}; was `metadata` re-run with another seed or more data?): {fix}"
        )


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
