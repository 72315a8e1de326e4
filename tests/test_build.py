"""`bentoml build` from bentofile.yaml: the bento pins the model and holds the service and its runtime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import ROOT


def test_bentoml_build(model_tag: str, bentoml_home: Path) -> None:
    env = {**os.environ, "AGE_GENDER_MODEL": model_tag}
    bentoml = Path(sys.executable).parent / "bentoml"
    result = subprocess.run([str(bentoml), "build", "-o", "tag"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    name, version = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:").split(":")
    bento = bentoml_home / "bentos" / name / version

    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["entry_service"] == "AgeGender"
    services = {s["name"]: s for s in info["services"]}
    assert set(services) == {"AgeGender", "FaceDetection", "AgeGenderModel"}
    # the model service pins the exact model; containerize copies it from the store into the image
    assert [m["tag"] for m in services["AgeGenderModel"]["models"]] == [model_tag]

    src = bento / "src"
    for path in ("service.py", "models/network.py", "models/faces.py", "serving/guard.py"):
        assert (src / path).is_file(), path
    assert not (src / "training").exists() and not (src / "tests").exists()

    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "requirements.txt" in dockerfile and "EXPOSE 3000" in dockerfile
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "bentoml==1.4.40", "yuface==2023.5.1"):
        assert pin in requirements, pin
    assert "/predict" in (bento / "apis" / "openapi.yaml").read_text()
