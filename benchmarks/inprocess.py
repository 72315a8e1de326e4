"""The limits: what the network and the detector do in one process, with no HTTP in between, through the
service's own pipeline (models/pipeline.py)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable

import numpy as np

from models.artifact import ModelMeta
from models.pipeline import Estimator, FaceFinder
from models.predictor import Predictor
from models.runtime import OnnxRuntime, TorchRuntime


def rate(fn: Callable[[], object], items: int, seconds: float = 3.0) -> float:
    """Items per second of fn(), after one warm-up call, over at least `seconds` (median of 3 chunks)."""
    fn()
    chunks = []
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3 or n == 0:
            fn()
            n += 1
        chunks.append(n * items / elapsed)
    return float(np.median(chunks))


def runtimes(model_dir: str, meta: ModelMeta) -> dict[str, Callable]:
    return {
        "torch": TorchRuntime.load(model_dir, meta, "cpu"),
        "torch_channels_last": TorchRuntime.load(model_dir, meta, "cpu", channels_last=True),
        "onnx": OnnxRuntime(model_dir, ["CPUExecutionProvider"]),
    }


def network_rates(runs: dict[str, Callable], size: int, batch_sizes: list[int]) -> dict[str, dict[int, float]]:
    """img/s of each runtime per batch size, on preprocessed tensors (the network alone)."""
    out = {}
    x = {b: np.random.default_rng(0).standard_normal((b, 3, size, size), dtype=np.float32) for b in batch_sizes}
    for name, run in runs.items():
        out[name] = {b: rate(lambda r=run, b=b: r(x[b]), b) for b in batch_sizes}
    return out


def crops_rate(model_dir: str, meta: ModelMeta, runtime: str, batch: int) -> float:
    """img/s from uint8 200x200 crops through the Estimator (preprocessing, network, answers): what the
    model service does for /predict_faces."""
    estimator = Estimator.open(model_dir, meta, runtime)
    crops = np.random.default_rng(0).integers(0, 256, (batch, 200, 200, 3), dtype=np.uint8)
    return rate(lambda: estimator(crops), batch)


def detector_rate(photo: bytes) -> float:
    """photos/s of the FaceFinder: decode, detect, align (one process; what a FaceDetection worker does)."""
    finder = FaceFinder()
    return rate(lambda: finder.find(photo), 1)


def detector_rate_together(photo: bytes, processes: int) -> float:
    """photos/s of `processes` FaceFinders running at once, one process each (the service's detector
    processes, one per core), summed: what the cores do together, which need not be `processes` times
    what one does alone (BENCHMARKS.md, INT8 on CPU)."""
    ctx = multiprocessing.get_context("spawn")
    ready, rates = ctx.Barrier(processes, timeout=120), ctx.Queue()
    workers = [ctx.Process(target=_rate_after, args=(photo, ready, rates), daemon=True) for _ in range(processes)]
    try:
        for w in workers:
            w.start()
        return float(sum(rates.get(timeout=300) for _ in workers))  # queue.Empty where a worker died
    finally:
        for w in workers:
            if w.pid is not None:  # started
                w.terminate()
                w.join()


def _rate_after(photo: bytes, ready, rates) -> None:
    """A FaceFinder's photos/s, measured once every process is warmed up (all at once)."""
    finder = FaceFinder()
    finder.find(photo)
    ready.wait()
    rates.put(rate(lambda: finder.find(photo), 1))


def pipeline_rate(photo: bytes, model_dir: str, meta: ModelMeta, runtime: str, batch: int) -> float:
    """photos/s of the whole pipeline in one process (the Python API), `batch` photos per predict_many."""
    predictor = Predictor(FaceFinder(), Estimator.open(model_dir, meta, runtime))
    return rate(lambda: predictor.predict_many([photo] * batch), batch)
