"""Shared fixtures: one generated data set, one model trained by the project, one temporary model store.

BENTOML_HOME is pointed at a temporary folder before anything imports bentoml.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_HOME = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
os.environ["BENTOML_HOME"] = str(_HOME)
os.environ["BENTOML_DO_NOT_TRACK"] = "True"

# a small but real configuration: trains in under a minute on two cores
TINY = {
    "seed": 0,
    "name": "tiny",
    "data": {"batch_size": 32, "num_workers": 0},
    "model": {
        "backbone": "resnet18",
        "pretrained": False,
        "head_width": 64,
        "dropout": 0.0,
        "image_size": 64,
        "lr": 0.002,
        "normalize_age": True,
        "age_head": "distribution",  # the served model; `regression_tag` is the same recipe with regression
        "age_sigma": 3.0,
        "age_l1_weight": 1.0,
        "age_loss": "l1",
        "age_weight": 1.0,
        "gender_weight": 1.0,
    },
    "trainer": {
        "max_epochs": 8,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 5,
    },
}


def served_graph(model_dir: str, meta, x):
    """The raw outputs, as torch tensors, of the graph the service runs by default on this machine
    (runtime `auto`; on CPU the INT8 graph while its cost is in bound), from a session of our own: age
    output, gender logits. QDQ graphs sum int8 products exactly in int32, so the served numbers match
    these to float rounding whatever batch they were computed in."""
    import torch

    from models.runtime import open_runtime

    runtime, _ = open_runtime("auto", model_dir, meta)
    return [torch.from_numpy(a) for a in runtime(x)]


def run_cli(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """`python -m training ...` in a subprocess, as a user runs it; keyword arguments extend its environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=cwd, env=env, capture_output=True, text=True)


def older_release(raw: dict):
    """Metadata that `save_model` stores exactly as `raw`: a model as an older release wrote it."""
    from models.artifact import ModelMeta

    class AsWritten(ModelMeta):
        def stored(self) -> dict:
            return raw

    return AsWritten.model_validate(ModelMeta.load(raw).model_dump())


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """A CLI failure: exit code 2, exactly one `error:` line, no traceback (progress bars may precede it)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# `make test-fast` (pytest -m "not slow"): the edit loop's tests. Slow: those that need a trained model, a
# server or the generated data set (session fixtures), and those that train or serve in subprocesses.
SLOW_FIXTURES = {
    "sample_dir",
    "metadata_file",
    "tiny_config",
    "checkpoint",
    "model_tag",
    "regression_tag",
    "server",
    "server_log",
}
SLOW_CALLS = ("run_cli(", "running_service(", "getfixturevalue(")  # the last: slow fixtures asked for by name


def pytest_collection_modifyitems(config, items) -> None:
    slow_files = {}  # test file -> does it call any of SLOW_CALLS
    for item in items:
        path = Path(item.fspath)
        if path not in slow_files:
            source = path.read_text()
            slow_files[path] = any(call in source for call in SLOW_CALLS)
        if slow_files[path] or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from training.synth import write_sample_dataset

    return write_sample_dataset(tmp_path_factory.mktemp("sample") / "images", n=900, seed=1)


@pytest.fixture(scope="session")
def metadata_file(sample_dir: Path) -> Path:
    from training.utkface import build_metadata

    out = sample_dir.parent / "metadata.csv"
    build_metadata(sample_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_config(metadata_file: Path, tmp_path_factory) -> dict:
    from training.config import validate

    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    cfg["data"]["metadata"] = str(metadata_file)
    cfg["logdir"] = str(tmp_path_factory.mktemp("runs"))
    return validate(cfg)


@pytest.fixture(scope="session")
def checkpoint(tiny_config: dict) -> Path:
    from training.fit import fit

    return fit(tiny_config)


@pytest.fixture(scope="session")
def model_tag(checkpoint: Path, bentoml_home: Path) -> str:
    from training.export import export

    return str(export(checkpoint))


@pytest.fixture(scope="session")
def regression_tag(tiny_config: dict, bentoml_home: Path, tmp_path_factory) -> str:
    """The same data, recipe and budget as `model_tag`, with the regression age head."""
    from training.export import export
    from training.fit import fit

    cfg = {**tiny_config, "model": {**tiny_config["model"], "age_head": "regression"}}
    cfg["logdir"] = str(tmp_path_factory.mktemp("runs-regression"))
    return str(export(fit(cfg)))


@pytest.fixture(scope="session")
def server_log(server: str, tmp_path_factory) -> Path:
    """The log of the `server` fixture's `bentoml serve`, every process's lines."""
    return next(tmp_path_factory.getbasetemp().glob("server*/serve.log"))


# small limits so that the limit tests stay small (a 12 Mpx phone photo still passes); the defaults are
# documented in serving/settings.py
SERVER_LIMITS = {
    "AGE_GENDER_MAX_BYTES": 3_000_000,
    "AGE_GENDER_MAX_PIXELS": 13_000_000,
    "AGE_GENDER_MAX_IMAGES": 8,
    "AGE_GENDER_MAX_FACES": 3,
}


@pytest.fixture(scope="session")
def server(model_tag: str, tmp_path_factory) -> Iterator[str]:
    """A real `bentoml serve` of service:AgeGender on a free localhost port, serving the trained model."""
    from devtools.launch import running_service

    env = {"AGE_GENDER_MODEL": model_tag, **{k: str(v) for k, v in SERVER_LIMITS.items()}}
    try:
        with running_service(env, tmp_path_factory.mktemp("server") / "serve.log") as url:
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc))
