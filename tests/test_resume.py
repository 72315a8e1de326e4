"""Interrupted training resumes where it stopped: `fit` killed with SIGKILL in its second epoch, and one
stopped by SIGTERM mid-epoch, each resumed with `fit --resume`, end where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import ROOT, TINY, assert_one_line_error, run_cli

EPOCHS = 2  # the second epoch is where runs are stopped


@pytest.fixture(scope="module")
def config(metadata_file: Path, tmp_path_factory) -> Path:
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    cfg["data"].update(metadata=str(metadata_file), batch_size=16)  # ~45 steps an epoch: room to stop mid-epoch
    cfg["trainer"]["max_epochs"] = EPOCHS
    path = tmp_path_factory.mktemp("resume") / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, logdir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "training", "fit", "--config", str(config), f"logdir={logdir}", *args]
    log = (logdir / "stderr.txt").open("w")  # a file, not a pipe nobody reads while it runs
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)


def finish(config: Path, logdir: Path, *args: str) -> None:
    result = run_cli("fit", "--config", str(config), f"logdir={logdir}", *args)
    assert result.returncode == 0, result.stderr


def checkpoints(logdir: Path) -> Path:
    (folder,) = (logdir / "tiny").glob("version_*/checkpoints")  # a resumed run continues in its own folder
    return folder


def after_first_epoch(process: subprocess.Popen, logdir: Path) -> None:
    """Wait until the first epoch's last.ckpt is written, then a moment into the second epoch."""
    deadline = time.monotonic() + 300
    while not list((logdir / "tiny").glob("version_*/checkpoints/last.ckpt")):
        assert process.poll() is None, (logdir / "stderr.txt").read_text()
        assert time.monotonic() < deadline, "no checkpoint after 5 minutes"
        time.sleep(0.1)
    time.sleep(0.5)
    assert process.poll() is None, "the run ended before it could be stopped"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def best(logdir: Path) -> tuple[float, dict]:
    ckpt = load(checkpoints(logdir) / "best.ckpt")
    (state,) = (v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    return float(state["best_model_score"]), ckpt["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(config: Path, tmp_path_factory) -> tuple[float, dict]:
    logdir = tmp_path_factory.mktemp("uninterrupted")
    finish(config, logdir)
    return best(logdir)


def assert_same_result(logdir: Path, expected: tuple[float, dict]) -> None:
    score, weights = best(logdir)
    assert score == pytest.approx(expected[0], rel=1e-5)
    for name, tensor in expected[1].items():
        assert torch.allclose(weights[name].float(), tensor.float(), atol=1e-5), name
    assert not list(logdir.rglob(".*.tmp")), "a half-written file was left"


def test_killed_run_resumes_to_the_same_result(config: Path, uninterrupted, tmp_path: Path) -> None:
    process = start(config, tmp_path)
    after_first_epoch(process, tmp_path)
    process.kill()  # SIGKILL: no chance to save anything
    process.wait()
    assert load(checkpoints(tmp_path) / "last.ckpt")["epoch"] < EPOCHS - 1  # whole, and not the end of the run
    finish(config, tmp_path, "--resume")
    assert_same_result(tmp_path, uninterrupted)


def test_sigterm_saves_mid_epoch_and_resumes_to_the_same_result(config: Path, uninterrupted, tmp_path: Path) -> None:
    process = start(config, tmp_path)
    after_first_epoch(process, tmp_path)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert "SIGTERM" in line and "--resume" in line and "Traceback" not in stderr
    position = load(checkpoints(tmp_path) / "last.ckpt")["UTKFaceDataModule"]
    assert 0 < position["samples"] < 720 - 16, position  # mid-epoch: some of the ~720 training images
    finish(config, tmp_path, "--resume")
    assert_same_result(tmp_path, uninterrupted)


def test_resume_starts_a_missing_run_and_refuses_a_changed_config(config: Path, tmp_path: Path) -> None:
    started = run_cli("fit", "--config", str(config), f"logdir={tmp_path}", "trainer.max_epochs=1", "--resume")
    assert started.returncode == 0 and "starting a new run" in started.stdout, started.stderr
    changed = run_cli("fit", "--config", str(config), f"logdir={tmp_path}", "model.lr=0.01", "--resume")
    assert "model.lr: 0.002 -> 0.01" in assert_one_line_error(changed)
