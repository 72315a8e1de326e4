"""The exported ONNX graph and the torch weights give the same answers; runtime errors are clear."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import bentoml
import numpy as np
import pytest

from models.artifact import ONNX_FILE, WEIGHTS_FILE, stored_meta
from models.errors import UserError
from models.runtime import OnnxRuntime, TorchRuntime, open_runtime
from tests.conftest import ROOT


@pytest.mark.parametrize("head", ["distribution", "regression"])
def test_onnx_and_torch_agree(head: str, request: pytest.FixtureRequest) -> None:
    stored = bentoml.models.get(request.getfixturevalue("model_tag" if head == "distribution" else "regression_tag"))
    meta = stored_meta(stored)
    assert (Path(stored.path) / ONNX_FILE).is_file() and (Path(stored.path) / WEIGHTS_FILE).is_file()
    size = meta.image_size
    x = np.random.default_rng(0).standard_normal((7, 3, size, size), dtype=np.float32)  # a batch size never seen
    onnx, _ = open_runtime("onnx", stored.path, meta)
    torch_rt, _ = open_runtime("torch", stored.path, meta)
    assert isinstance(onnx, OnnxRuntime) and isinstance(torch_rt, TorchRuntime)
    (age_o, logits_o), (age_t, logits_t) = onnx(x), torch_rt(x)
    assert age_o.shape == ((7, 117) if head == "distribution" else (7,)) and logits_o.shape == (7, 2)
    np.testing.assert_allclose(age_o, age_t, atol=1e-3)
    np.testing.assert_allclose(logits_o, logits_t, atol=1e-4)
    channels_last = TorchRuntime.load(stored.path, meta, "cpu", channels_last=True)(x)
    np.testing.assert_allclose(channels_last[0], age_t, atol=1e-3)


def test_runtime_errors(model_tag: str, tmp_path: Path) -> None:
    stored = bentoml.models.get(model_tag)
    with pytest.raises(UserError, match="unknown runtime 'tensorrt'; choose from auto, onnx, onnx-int8, torch"):
        open_runtime("tensorrt", stored.path, stored_meta(stored))
    shutil.copy(Path(stored.path) / WEIGHTS_FILE, tmp_path)
    for runtime in ("onnx", "auto"):
        with pytest.raises(UserError, match="exported without ONNX; use 'torch'"):
            open_runtime(runtime, tmp_path, stored_meta(stored))
    with pytest.raises(UserError, match="exported before INT8 graphs were written; use runtime 'onnx'"):
        open_runtime("onnx-int8", tmp_path, stored_meta(stored))


def test_auto_serves_fp32_when_the_int8_file_is_missing(model_tag: str, tmp_path: Path) -> None:
    """Metadata that describes an INT8 graph (within bound) next to a folder without one: fp32, and why."""
    stored = bentoml.models.get(model_tag)
    shutil.copy(Path(stored.path) / ONNX_FILE, tmp_path)
    runtime, why = open_runtime("auto", tmp_path, stored_meta(stored))
    assert runtime.name == "onnx" and why.endswith("has no model.int8.onnx; serving the fp32 graph")
    runtime, why = open_runtime("auto", stored.path, stored_meta(stored))
    assert runtime.name == "onnx-int8"


def test_a_failing_gpu_driver_is_reported_not_silent(monkeypatch, caplog) -> None:
    import pynvml

    from models.runtime import visible_gpus

    def failing(error):
        def init():
            raise error()

        return init

    monkeypatch.setattr(pynvml, "nvmlInit", failing(pynvml.NVMLError_DriverNotLoaded))
    with caplog.at_level("WARNING", logger="models.runtime"):
        assert visible_gpus() == 0 and not caplog.records  # no driver: a CPU machine, nothing to say
    monkeypatch.setattr(pynvml, "nvmlInit", failing(pynvml.NVMLError_GpuIsLost))
    with caplog.at_level("WARNING", logger="models.runtime"):
        assert visible_gpus() == 0
    assert "driver is there but failed" in caplog.text and "running on the CPU" in caplog.text
    monkeypatch.setenv("AGE_GENDER_DEBUG", "1")
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        visible_gpus()


def test_onnx_runtime_threads_follow_the_cpu_quota_unpinned(model_tag: str) -> None:
    """ONNX Runtime left to count its threads starts one per physical core of the machine, whatever the
    container's CPU quota, and pins each to its core, where it can only wait while a detector process
    holds that core. In a fresh process (no other test's threads): a session starts math_threads() - 1
    pool threads, none of them pinned, and under a quota of one CPU it starts none. Can fail only on a
    machine of 2 or more physical cores (ONNX Runtime's default then starts a pinned thread)."""
    script = """
import os, sys, bentoml, numpy as np, onnxruntime
import models.runtime
from models.artifact import stored_meta

models.runtime.math_threads()  # its imports, and onnxruntime's, start threads of their own: before counting

def threads():
    return set(os.listdir("/proc/self/task"))

def affinity(tid):
    try:
        return tuple(sorted(os.sched_getaffinity(int(tid))))
    except ProcessLookupError:  # a thread that ended meanwhile
        return None

stored = bentoml.models.get(sys.argv[1])
size = stored_meta(stored).image_size
x = np.zeros((16, 3, size, size), np.float32)
for quota in (None, 1):
    if quota:
        models.runtime.cpu_cores = lambda: quota
    before = threads()
    run = models.runtime.OnnxRuntime(stored.path, ["CPUExecutionProvider"])  # alive while its threads are read
    run(x)
    started = threads() - before
    print(models.runtime.math_threads() - 1, len(started), sorted({affinity(t) for t in threads()} - {None}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, model_tag], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    everywhere = str([tuple(sorted(os.sched_getaffinity(0)))])
    own, one_cpu = result.stdout.splitlines()
    asked, started, affinities = own.split(" ", 2)
    assert started == asked and affinities == everywhere  # as many pool threads as asked, none pinned
    assert one_cpu == f"0 0 {everywhere}"
