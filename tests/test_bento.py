"""The artifact users deploy: `bentoml build` from bentofile.yaml, then the built Bento served BY TAG from an
empty folder outside the checkout, so that nothing in the working tree can stand in for a missing file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from devtools.launch import descendants, running_service
from devtools.photos import astronaut, encode, no_face

from .conftest import ROOT

BENTOML = str(Path(sys.executable).parent / "bentoml")


def build(bentofile: str, model_tag: str, bentoml_home: Path) -> tuple[str, Path]:
    env = {**os.environ, "AGE_GENDER_MODEL": model_tag}
    cmd = [BENTOML, "build", "-f", bentofile, "-o", "tag"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return tag, bentoml_home / "bentos" / name / version


@pytest.fixture(scope="module")
def bento(model_tag: str, bentoml_home: Path) -> tuple[str, Path]:
    return build("bentofile.yaml", model_tag, bentoml_home)


def test_the_bento_holds_the_service_and_nothing_else(bento: tuple[str, Path], model_tag: str) -> None:
    _, path = bento
    info = yaml.safe_load((path / "bento.yaml").read_text())
    assert info["entry_service"] == "AgeGender"
    services = {s["name"]: s for s in info["services"]}
    assert set(services) == {"AgeGender", "FaceDetection", "AgeGenderModel"}
    # the model service pins the exact model; containerize copies it from the store into the image
    assert [m["tag"] for m in services["AgeGenderModel"]["models"]] == [model_tag]

    src = path / "src"
    shipped = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    expected = {"service.py", "bentofile.yaml"}
    expected |= {p.relative_to(ROOT).as_posix() for d in ("models", "serving") for p in (ROOT / d).glob("*.py")}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "serving" / "ui").iterdir()}
    assert shipped == expected  # no test tools (devtools/), training code, tests or data

    requirements = (path / "env" / "python" / "requirements.txt").read_text()
    assert "bentoml==1.4.40" in requirements and "onnxruntime==" in requirements
    assert not re.search(r"^(torch|torchvision|nvidia-(?!ml-py).*)==", requirements, re.M), (
        "the CPU Bento carries no torch"
    )
    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "EXPOSE 3000" in dockerfile


def test_the_gpu_bento_adds_torch(model_tag: str, bentoml_home: Path) -> None:
    _, path = build("bentofile.gpu.yaml", model_tag, bentoml_home)
    requirements = (path / "env" / "python" / "requirements.txt").read_text()
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "onnxruntime=="):
        assert pin in requirements, pin
    assert (path / "src" / "serving" / "ui" / "index.html").is_file()


def _loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_the_built_bento_serves_from_an_empty_folder(bento: tuple[str, Path], tmp_path: Path) -> None:
    tag, _ = bento
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {"AGE_GENDER_DETECTOR_WORKERS": "2"}
    with running_service(env, tmp_path / "serve.log", target=tag, cwd=empty) as url:
        photo = encode(astronaut())
        r = httpx.post(url + "/predict", files={"image": ("a.jpg", photo, "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["faces"]) == 1
        files = [("images", ("a.jpg", photo, "image/jpeg")), ("images", ("b.png", encode(no_face("coffee"), "PNG")))]
        r = httpx.post(url + "/predict_batch", files=files, timeout=60)
        assert r.status_code == 200, r.text
        assert [len(p["faces"]) for p in r.json()["results"]] == [1, 0]
        info = httpx.post(url + "/model_info", timeout=30).json()
        assert info["runtime"] == "onnx-int8" and info["detector"] == "mtcnn"  # the INT8 graph shipped too
        assert httpx.get(url + "/model_card", timeout=30).text.startswith("# Model card")  # from the Bento's store

        page = httpx.get(url + "/ui/", timeout=30)
        assert page.status_code == 200 and "<title>" in page.text
        assets = re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text)
        assert {"/ui/app.js", "/ui/style.css"} <= set(assets)
        for asset in assets:
            assert httpx.get(url + asset, timeout=30).status_code == 200, asset
        spec = httpx.get(url + "/docs.json", timeout=30).json()
        assert {"/predict", "/predict_batch", "/predict_faces", "/model_info"} <= set(spec["paths"])

        # the arbiter, the API worker, two detector workers and the model worker; none of them loads
        # PyTorch (the model runs in ONNX Runtime, preprocessing in numpy)
        pids = descendants(running_service.pid)
        assert len(pids) >= 5, pids
        assert not [p for p in pids if _loaded(p, "libtorch")], "a service process imported torch"
        assert [p for p in pids if _loaded(p, "onnxruntime")], "no process runs ONNX Runtime"


def test_a_model_not_in_the_store_stops_the_built_bento_in_one_line(bento: tuple[str, Path], tmp_path: Path) -> None:
    """AGE_GENDER_MODEL naming a model the store lacks stops the Bento served by tag at once, rather than a
    model service restarting over and over behind a /readyz that answers 500."""
    env = {**os.environ, "AGE_GENDER_MODEL": "nosuch:latest"}
    env.pop("AGE_GENDER_DEBUG", None)
    serve = [BENTOML, "serve", bento[0], "--port", "0"]
    with subprocess.Popen(serve, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True) as p:
        try:
            _, stderr = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the workers too
            pytest.fail("the service did not stop")
    expected = "error: AGE_GENDER_MODEL: model 'nosuch:latest' is not in the BentoML store; `bentoml models list`"
    assert p.returncode == 1 and stderr.startswith(expected) and stderr.count("\n") == 1, stderr[-2000:]


def test_gpu_requirements_are_the_cpu_ones_plus_torch() -> None:
    def pins(name: str) -> set[str]:
        lines = (ROOT / "requirements" / name).read_text().splitlines()
        return {line.strip() for line in lines if line.strip() and not line.startswith("#")}

    assert pins("serve-gpu.txt") - pins("serve.txt") == {"torch==2.14.1", "torchvision==0.29.1"}
    assert pins("serve.txt") <= pins("serve-gpu.txt")
