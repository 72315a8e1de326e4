"""`make bench` / `python -m benchmarks.run`: the serving benchmark, with its limits, in one run.

1. Limits, in this process: the network per runtime and batch size; crops -> preprocessing -> network;
   the detector alone; detector + network.
2. The service (`bentoml serve`, adaptive batching on) under a concurrency sweep, for /predict_faces
   (one 200x200 face per request) and /predict (a photo with one face, and one with three).
3. The baselines at concurrency 16: the service with batching off (AGE_GENDER_MAX_BATCH_SIZE=1), and a
   seed-style server (benchmarks/seed.py: one process, detection then torch per request).
The ceiling for /predict with one face: cores / (detector core-seconds per photo + network core-seconds
per face at its best batch size); the detector runs on one core, the network on all of them.
The model is ResNet-34 at 224 px (configs/utkface_resnet34.yaml) with random weights: speed does not
depend on the weights. Results: benchmarks/results/serving.json and a Markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from devtools.launch import ROOT
from devtools.photos import astronaut, encode, group_photo
from models.artifact import Dataset, ModelMeta, architecture, array_preprocess_for
from models.network import AgeGenderNet
from models.pipeline import FaceFinder

RESULTS = Path(__file__).resolve().parent / "results"


def own_store() -> None:
    """A model store of this run's own (unless BENTOML_HOME is set), no usage tracking, the results folder.
    Before make_model: bentoml reads BENTOML_HOME when it is first imported."""
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="bench-home-"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"
    RESULTS.mkdir(exist_ok=True)


def before_after_options(p: argparse.ArgumentParser) -> None:
    """--checkout and --label: the same benchmark against another checkout's service, for a before/after."""
    p.add_argument("--checkout", type=Path, default=ROOT, help="serve the service of this checkout")
    p.add_argument("--label", default="after")


def make_model(backbone: str, image_size: int, int8: bool = False) -> tuple[str, str, ModelMeta]:
    """A random-weights model in the store; with int8 also its INT8 graph, ranges from real face crops
    (the benchmark's photos, mirrored and shifted: speed depends on neither weights nor ranges)."""
    import bentoml  # here, not at the top: main() points BENTOML_HOME at a temporary store first

    from training.export import save_model
    from training.quantize import write_graphs

    torch.manual_seed(0)
    net = AgeGenderNet(backbone, head_width=256, dropout=0.2).eval()
    meta = architecture(backbone, 256, 0.2, image_size, demo=True, dataset=Dataset(name="benchmark (random weights)"))
    if not int8:
        tag = save_model(net, meta)
        return str(tag), bentoml.models.get(tag).path, meta
    with tempfile.TemporaryDirectory() as graphs:
        crops = FaceFinder().find_in(np.asarray(group_photo()[0])).crops
        crops = np.concatenate([crops, crops[:, :, ::-1], np.roll(crops, 8, axis=1)])
        write_graphs(net, image_size, Path(graphs), array_preprocess_for(meta)(crops))
        tag = save_model(net, meta, graphs=Path(graphs))
    return str(tag), bentoml.models.get(tag).path, meta


def photos() -> dict[str, bytes]:
    return {"one_face": encode(astronaut()), "three_faces": encode(group_photo()[0])}


def crop() -> bytes:
    return encode(Image.fromarray(FaceFinder().find_in(np.asarray(astronaut())).crops[0]))


def sweep(url: str, cases: dict, levels: list[int], seconds: float) -> dict:
    from benchmarks.load import batch_histogram, drive, histogram_delta

    out = {}
    for name, (path, files) in cases.items():
        drive(url + path, files, 4, 3)  # warm-up, not measured: the dispatcher learns its cost model
        out[name] = []
        for c in levels:
            before = batch_histogram(url)
            result = drive(url + path, files, c, seconds)
            result["batch_sizes"] = histogram_delta(before, batch_histogram(url))
            out[name].append(result)
            print(
                f"  {name} c={c}: {result['requests_per_s']:.1f} req/s, p50 {result['p50_ms']:.0f} ms, "
                f"p99 {result['p99_ms']:.0f} ms, errors {result['errors']}, batches {result['batch_sizes']}",
                flush=True,
            )
    return out


def sweep_fresh(env: dict, cases: dict, levels: list[int], seconds: float, label: str) -> dict:
    """One freshly started service per endpoint: BentoML's dispatcher remembers earlier load (its wait
    estimate includes queueing), which would otherwise carry one endpoint's c=64 into the next one's c=1."""
    from devtools.launch import running_service

    out = {}
    for name, case in cases.items():
        with running_service(env, RESULTS / f"serve_{label}_{name}.log") as url:
            out |= sweep(url, {name: case}, levels, seconds)
    return out


def seed_rate(tag: str, files: list, seconds: float) -> dict:
    """/predict of the seed-style server at concurrency 16."""
    import subprocess
    import sys

    import httpx

    from benchmarks.load import drive
    from devtools.launch import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.seed", tag, str(port)])
    try:
        for _ in range(240):  # ready when it answers at all (405 for a GET); its model loads in seconds
            try:
                httpx.get(f"http://127.0.0.1:{port}/predict", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        drive(f"http://127.0.0.1:{port}/predict", files, 4, 3)  # warm-up, as for the service
        return drive(f"http://127.0.0.1:{port}/predict", files, 16, seconds)
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet34")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--runtime", default="onnx", choices=["onnx", "torch"])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, default=12.0, help="per concurrency level")
    p.add_argument("--url", default=None, help="benchmark a running service instead of starting one")
    p.add_argument("--cases", nargs="+", default=None, help="only these: predict_faces, predict_one_face, ...")
    args = p.parse_args()

    own_store()
    from benchmarks import inprocess

    tag, model_dir, meta = make_model(args.backbone, args.image_size)
    pics, face = photos(), crop()
    results: dict = {
        "model": {"backbone": args.backbone, "image_size": args.image_size, "runtime": args.runtime},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }

    print("limits (one process, no HTTP)", flush=True)
    batches = [1, 4, 8, 16, 32]
    results["network"] = inprocess.network_rates(inprocess.runtimes(model_dir, meta), args.image_size, batches)
    for name, rates in results["network"].items():
        print(f"  network {name}: " + ", ".join(f"b{b} {r:.1f}" for b, r in rates.items()) + " img/s", flush=True)
    best = max(results["network"][args.runtime], key=results["network"][args.runtime].get)
    results["best_batch"] = best
    results["crops_limit"] = inprocess.crops_rate(model_dir, meta, args.runtime, best)
    results["detector_limit"] = {k: inprocess.detector_rate(v) for k, v in pics.items()}
    results["pipeline_limit"] = {
        k: inprocess.pipeline_rate(v, model_dir, meta, args.runtime, 8) for k, v in pics.items()
    }
    cores = os.cpu_count() or 1
    results["ceiling_one_face"] = cores / (1 / results["detector_limit"]["one_face"] + cores / results["crops_limit"])
    print(
        f"  ceiling /predict one face: {results['ceiling_one_face']:.1f} photos/s; "
        f"crops->network b{best}: {results['crops_limit']:.1f} img/s; detector {results['detector_limit']}; "
        f"pipeline {results['pipeline_limit']} photos/s",
        flush=True,
    )

    cases = {"predict_faces": ("/predict_faces", [("images", ("face.jpg", face, "image/jpeg"))])}
    cases |= {f"predict_{k}": ("/predict", [("image", (f"{k}.jpg", v, "image/jpeg"))]) for k, v in pics.items()}
    cases = {k: v for k, v in cases.items() if not args.cases or k in args.cases}
    env = {"AGE_GENDER_MODEL": tag, "AGE_GENDER_RUNTIME": args.runtime}
    print("service, adaptive batching on", flush=True)
    if args.url:
        results["batching_on"] = sweep(args.url, cases, args.levels, args.seconds)
    else:
        results["batching_on"] = sweep_fresh(env, cases, args.levels, args.seconds, "batching_on")
        print("service, batching off (AGE_GENDER_MAX_BATCH_SIZE=1)", flush=True)
        off = {**env, "AGE_GENDER_MAX_BATCH_SIZE": "1"}
        results["batching_off"] = sweep_fresh(off, cases, [16], args.seconds, "batching_off")
        if "predict_one_face" in cases:
            print("seed-style server (one process, detection then torch per request), c=16", flush=True)
            results["seed_one_face"] = seed_rate(tag, cases["predict_one_face"][1], args.seconds)
    (RESULTS / "serving.json").write_text(json.dumps(results, indent=2))
    from benchmarks.report import summary

    print(summary(results))


if __name__ == "__main__":
    main()
