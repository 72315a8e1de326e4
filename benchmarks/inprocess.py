"""The limits: what the network and the detector do in one process, with no HTTP in between."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from models.artifact import array_preprocess_for
from models.faces import FaceDetector, align_crop
from models.images import decode_image
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


def runtimes(model_dir: str, meta: dict) -> dict[str, Callable]:
    return {
        "torch": TorchRuntime(model_dir, meta, "cpu"),
        "torch_channels_last": TorchRuntime(model_dir, meta, "cpu", channels_last=True),
        "onnx": OnnxRuntime(model_dir, ["CPUExecutionProvider"]),
    }


def network_rates(model_dir: str, meta: dict, batch_sizes: list[int]) -> dict[str, dict[int, float]]:
    """img/s of each runtime per batch size, on preprocessed tensors (the network alone)."""
    size = meta["image_size"]
    out = {}
    x = {b: np.random.default_rng(0).standard_normal((b, 3, size, size), dtype=np.float32) for b in batch_sizes}
    for name, run in runtimes(model_dir, meta).items():
        out[name] = {b: rate(lambda r=run, b=b: r(x[b]), b) for b in batch_sizes}
    return out


def crops_rate(model_dir: str, meta: dict, runtime: str, batch: int) -> float:
    """img/s from uint8 200x200 crops through preprocessing and the network: what /predict_faces does."""
    run = runtimes(model_dir, meta)[runtime]
    preprocess = array_preprocess_for(meta)
    crops = np.random.default_rng(0).integers(0, 256, (batch, 200, 200, 3), dtype=np.uint8)
    return rate(lambda: run(preprocess(crops)), batch)


def detector_rate(photo: bytes, max_pixels: int = 50_000_000) -> float:
    """photos/s: decode, detect, align (one process; what the FaceDetection service does)."""
    detector = FaceDetector()

    def once():
        rgb = decode_image(photo, max_pixels)
        return [align_crop(rgb, f) for f in detector.detect(rgb)]

    return rate(once, 1)


def pipeline_rate(photo: bytes, model_dir: str, meta: dict, runtime: str, batch: int) -> float:
    """photos/s of detector + network in one process, model calls batched `batch` photos at a time."""
    detector, run, preprocess = FaceDetector(), runtimes(model_dir, meta)[runtime], array_preprocess_for(meta)

    def once():
        crops = []
        for _ in range(batch):
            rgb = decode_image(photo, 50_000_000)
            crops += [align_crop(rgb, f) for f in detector.detect(rgb)]
        run(preprocess(np.stack(crops)))

    return rate(once, batch)
