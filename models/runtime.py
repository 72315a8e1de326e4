"""Inference runtimes for a stored model: ONNX Runtime or torch eager, same inputs and outputs.

Both take a preprocessed float32 batch (B, 3, S, S) as numpy and return the network's outputs as numpy:
age output ((B,) years, or (B, 117) logits for the distribution head) and gender logits (B, 2).
ONNX Runtime was measured faster on CPU (BENCHMARKS.md), so it serves there: the INT8 graph when the model
has one whose measured accuracy cost is within models.artifact.INT8_MAX_COST, else the fp32 graph; on a
GPU, torch runs unless onnxruntime has the CUDA provider. Nothing here imports torch unless the torch runtime
is chosen: the CPU image has no torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from models.artifact import HIGHER_IS_BETTER, INT8_FILE, INT8_MAX_COST, ONNX_FILE, ModelMeta
from models.errors import UserError, debugging

# auto: the fastest that is accurate enough (below); onnx: the fp32 graph; onnx-int8: the quantised graph
RUNTIMES = ("auto", "onnx", "onnx-int8", "torch")


def cpu_cores() -> int:
    """Cores this process may use, counted as BentoML's `workers="cpu_count"` counts them: a container's CPU
    quota (cgroups), else the machine's cores. The service and the batch command size their processes by it:
    os.cpu_count() would start 64 processes in a 2-CPU container on a 64-core host."""
    from bentoml._internal.resource import CpuResource

    return max(1, int(CpuResource.from_system()))


def math_threads() -> int:
    """Threads for the network's arithmetic: the cores of the quota (cpu_cores), but no more than the
    physical cores and the CPUs this process may run on (hyperthreads share one core's vector units,
    which is why ONNX Runtime's own default counts physical cores)."""
    import psutil  # a BentoML dependency

    quota = cpu_cores()
    return max(1, min(quota, psutil.cpu_count(logical=False) or quota, len(os.sched_getaffinity(0))))


def visible_gpus() -> int:
    """NVIDIA GPUs this process can see, asked of NVML (a BentoML dependency) so that nothing imports
    torch to find out; 0 without a driver."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded):
        return 0  # no NVIDIA driver: a machine without a GPU
    except pynvml.NVMLError as exc:  # a driver that fails: say so, or a GPU machine silently runs on its CPU
        if debugging():
            raise
        logging.getLogger(__name__).warning("NVIDIA's driver is there but failed (%s): running on the CPU", exc)
        return 0


class TorchRuntime:
    name = "torch"

    def __init__(self, net, device: str = "cpu", channels_last: bool = False) -> None:
        """An AgeGenderNet (a stored one: `load`; a checkpoint's: `evaluate` passes it) on `device`."""
        import torch

        torch.set_num_threads(math_threads())  # explicit: the service limits OpenMP for the detector
        self.torch, self.device = torch, device
        self.net = net.eval().to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, model_dir: str | Path, meta: ModelMeta, device: str, channels_last: bool = False):
        try:
            from models.network import load_network
        except ImportError as exc:
            raise UserError("runtime 'torch' needs PyTorch, which this image does not have; use 'onnx'") from exc
        return cls(load_network(model_dir, meta, device), device, channels_last)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.torch.inference_mode():
            batch = self.torch.from_numpy(x).to(self.device, memory_format=self.memory_format)
            age_out, logits = self.net(batch)
        return age_out.float().cpu().numpy(), logits.float().cpu().numpy()


class OnnxRuntime:
    def __init__(self, model_dir: str | Path, providers: list[str], int8: bool = False):
        """The model's fp32 ONNX graph, or with int8 its quantised one."""
        import onnxruntime as ort

        self.name = "onnx-int8" if int8 else "onnx"
        path = Path(model_dir) / (INT8_FILE if int8 else ONNX_FILE)
        if not path.is_file():
            fix = "before INT8 graphs were written; use runtime 'onnx'" if int8 else "without ONNX; use 'torch'"
            raise UserError(f"{path} is missing: this model was exported {fix}")
        options = ort.SessionOptions()
        # idle pool threads sleep instead of spinning: the detector process shares these cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # no CPU memory arena: the arena grows to the largest batch seen and never gives memory back (the
        # soak saw the model process step up by 17 MB); without it memory returns after a large batch, at
        # the same speed within 2 % (ResNet-34, 224 px, batches of 1-12 on this machine)
        options.enable_cpu_mem_arena = False
        # a count of our own: left at 0, ONNX Runtime starts a thread per physical core of the machine,
        # blind to the container's CPU quota, and pins each to one core, where it can only wait while a
        # detector process holds that core (BENCHMARKS.md, "INT8 on CPU")
        options.intra_op_num_threads = math_threads()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        age_out, logits = self.session.run(None, {"image": x})
        return age_out, logits


def int8_verdict(meta: ModelMeta) -> tuple[bool, str]:
    """Is the model's INT8 graph accurate enough to serve by default? Its cost (INT8 minus fp32) was
    measured at export on every held-out split (metadata "int8"); the bound is INT8_MAX_COST.
    Returns (yes, why) for the log and /model_info."""
    if meta.int8 is None:
        return False, "this model has no INT8 graph (exported before INT8 graphs were written)"
    cost = meta.int8.cost
    if not cost:
        return False, "its INT8 graph's cost was not measured (no held-out split at export); runtime onnx-int8 runs it"
    worse = []
    for split, diffs in cost.items():
        for metric, bound in INT8_MAX_COST.items():
            loss = -diffs[metric] if metric in HIGHER_IS_BETTER else diffs[metric]  # > 0: INT8 is worse
            if not loss <= bound:  # NaN fails too
                worse.append(f"{metric} {diffs[metric]:+.4f} on {split} (worse by at most {bound:g})")
    if worse:
        return False, "the INT8 graph costs too much accuracy: " + "; ".join(worse)
    return True, f"the INT8 graph's measured cost is within bound ({format_cost(cost)})"


def format_cost(cost: dict[str, dict[str, float]], metrics=tuple(INT8_MAX_COST)) -> str:
    """{split: {metric: INT8 minus fp32}} -> 'val: age_mae +0.0123, gender_acc +0.0000; test: ...'."""
    return "; ".join(f"{s}: " + ", ".join(f"{m} {d[m]:+.4f}" for m in metrics if m in d) for s, d in cost.items())


def runtime_name(name: str) -> str:
    """The name, checked to be one of RUNTIMES; a UserError naming the choices."""
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    return name


def open_runtime(name: str, model_dir: str | Path, meta: ModelMeta):
    """The runtime to serve with, and why (one line, for the log and /model_info). `auto`: on a GPU the
    runtime that can use it; on CPU the INT8 graph when int8_verdict allows it, else the fp32 graph."""
    runtime_name(name)
    gpu = visible_gpus() > 0
    cpu = ["CPUExecutionProvider"]
    if name == "torch":
        return TorchRuntime.load(model_dir, meta, "cuda" if gpu else "cpu"), "asked for"
    if name == "onnx-int8":
        return OnnxRuntime(model_dir, cpu, int8=True), "asked for (INT8 runs on the CPU)"
    import onnxruntime as ort

    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return OnnxRuntime(model_dir, ["CUDAExecutionProvider", *cpu]), "ONNX Runtime with CUDA"
    if gpu:
        return TorchRuntime.load(model_dir, meta, "cuda"), "a GPU, and ONNX Runtime here has no CUDA"
    if name == "onnx":
        return OnnxRuntime(model_dir, cpu), "asked for"
    int8, why = int8_verdict(meta)
    if int8 and not (Path(model_dir) / INT8_FILE).is_file():  # metadata copied onto a model without the file
        int8, why = False, f"the metadata describes an INT8 graph but the model has no {INT8_FILE}"
    return OnnxRuntime(model_dir, cpu, int8=int8), why + ("" if int8 else "; serving the fp32 graph")
