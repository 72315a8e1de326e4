"""INT8 at export: the fp32 ONNX graph statically quantised, and what that costs in accuracy.

Static quantisation (ONNX Runtime's QDQ format: int8 weights per output channel, uint8 activations)
needs the range of every activation, read here from a few hundred crops of the training split through
the served preprocessing (models.pipeline.load_crops, then the eval preset), chosen with a fixed seed
that the metadata records. Dynamic quantisation was measured 5x slower than fp32 on this CPU (6.3 vs 30
img/s, ResNet-34 at 224 px, BENCHMARKS.md "INT8 on CPU"), so only static is offered. The
INT8 graph is then scored on every held-out split with the served answers and the fp32 graph's
calibration, and the differences from the fp32 numbers of export (the weights as trained, which the fp32
graph matches within float error) go into the metadata, where the service reads them to decide which
graph to run (models.runtime.int8_verdict).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from models.artifact import INT8_FILE, INTERVAL_LEVEL, ONNX_FILE, Int8, ModelMeta, array_preprocess_for
from models.network import export_onnx
from models.pipeline import Estimator, load_crops
from models.runtime import OnnxRuntime
from training.scoring import differences, metrics, predict, with_answers

CALIBRATION_CROPS = 300  # training crops whose activations set the INT8 ranges
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 32


def calibration_batch(train: pd.DataFrame, meta: ModelMeta, n: int, seed: int) -> np.ndarray:
    """(n, 3, S, S) float32: n seeded training crops as the served pipeline feeds them to the network."""
    chosen = train.sample(n=min(n, len(train)), random_state=seed).path
    crops = load_crops([Path(p).read_bytes() for p in chosen])
    return array_preprocess_for(meta)(crops)  # the eval preset in numpy, as served


def quantize(fp32: Path, int8: Path, batch: np.ndarray) -> None:
    """fp32 ONNX graph -> its static INT8 graph, activation ranges from `batch` (N, 3, S, S)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = iter(np.array_split(batch, max(1, len(batch) // CALIBRATION_BATCH)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.chunks, None)
            return None if chunk is None else {"image": np.ascontiguousarray(chunk)}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"  # shapes inferred, BatchNorm folded: what quantisation expects
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(
            str(prepared),
            str(int8),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )


def write_graphs(net, image_size: int, folder: Path, batch: np.ndarray) -> None:
    """An AgeGenderNet -> folder/ONNX_FILE and folder/INT8_FILE, INT8 ranges from `batch` (N, 3, S, S)."""
    export_onnx(net, image_size, folder / ONNX_FILE)
    quantize(folder / ONNX_FILE, folder / INT8_FILE, batch)


def quantize_and_measure(
    net, folder: Path, meta: ModelMeta, train: pd.DataFrame, held_out: dict[str, pd.DataFrame]
) -> Int8:
    """Write both graphs of `net` into folder; score the INT8 one on the held-out splits against
    meta.metrics (the fp32 numbers, with meta's calibration). Returns meta.int8: how it was made, its
    metrics, its cost."""
    batch = calibration_batch(train, meta, CALIBRATION_CROPS, CALIBRATION_SEED)
    write_graphs(net, meta.image_size, folder, batch)
    estimator = Estimator(OnnxRuntime(folder, ["CPUExecutionProvider"], int8=True), meta)
    scores = {s: metrics(with_answers(f, *predict(estimator, f), meta, INTERVAL_LEVEL)) for s, f in held_out.items()}
    return Int8(
        file=INT8_FILE,
        format="QDQ, int8 weights per channel, uint8 activations",
        calibration_crops={"splits": sorted(train.split.unique()), "n": len(batch), "seed": CALIBRATION_SEED},
        metrics=scores,
        cost={s: differences(meta.metrics[s], scores[s]) for s in held_out},  # INT8 minus fp32
    )
