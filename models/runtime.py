"""Inference runtimes for a stored model: torch eager or ONNX Runtime, same inputs and outputs.

Both take a preprocessed float batch (B, 3, S, S) and return (age (B,), gender logits (B, 2)) as numpy.
ONNX Runtime was measured faster on CPU (BENCHMARKS.md), so it is the serving default there; on a GPU,
torch runs unless onnxruntime has the CUDA provider.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.artifact import ONNX_FILE, load_network
from models.errors import UserError

RUNTIMES = ("onnx", "torch")


class TorchRuntime:
    name = "torch"

    def __init__(self, model_dir: str | Path, meta: dict[str, Any], device: str, channels_last: bool = False):
        torch.set_num_threads(os.cpu_count() or 1)  # explicit: the service limits OpenMP for the detector
        self.device = device
        self.net = load_network(model_dir, meta, device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            age, logits = self.net(x.to(self.device, memory_format=self.memory_format))
        return age.float().cpu().numpy(), logits.float().cpu().numpy()


class OnnxRuntime:
    name = "onnx"

    def __init__(self, model_dir: str | Path, providers: list[str]):
        import onnxruntime as ort

        path = Path(model_dir) / ONNX_FILE
        if not path.is_file():
            raise UserError(f"{path} is missing: this model was exported without ONNX; use runtime 'torch'")
        options = ort.SessionOptions()
        # idle pool threads sleep instead of spinning: the detector process shares these cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        age, logits = self.session.run(None, {"image": x.numpy()})
        return age, logits


def open_runtime(name: str, model_dir: str | Path, meta: dict[str, Any]):
    """The runtime to serve with: `name` on CPU; on a GPU, whichever of the two can use it."""
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    cuda = torch.cuda.is_available()
    if name == "onnx":
        import onnxruntime as ort

        gpu = cuda and "CUDAExecutionProvider" in ort.get_available_providers()
        if gpu or not cuda:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
            return OnnxRuntime(model_dir, providers)
    return TorchRuntime(model_dir, meta, "cuda" if cuda else "cpu")
