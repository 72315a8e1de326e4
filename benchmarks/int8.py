"""`python -m benchmarks.int8` (in `make bench`): the INT8 graph against the fp32 one on this CPU.

1. The network alone per batch size (preprocessed tensors), ONNX Runtime, fp32 and INT8 graphs.
2. In one process: crops -> answers at each graph's best batch size, the detector, and from them the
   ceiling of /predict with one face (benchmarks/run.py's formula: cores / (detector core-seconds per
   photo + network core-seconds per face)); and the same ceiling with the detector measured in one
   process per core at once (two cores here do less than twice one core's work).
3. The service with AGE_GENDER_RUNTIME=onnx, then onnx-int8: /predict_faces (one 200x200 face) and
   /predict (a photo with one face) at 1 and 16 requests in flight.
4. Where each endpoint's CPU goes with INT8: CPU seconds of each service process per request, at 16 in
   flight, for /predict and /predict_faces.
Goals (set in 0.2.0): /predict_faces with INT8 at >= 2.5x its fp32 throughput; /predict with INT8 at >= 0.8
of the INT8 ceiling. Random weights, as in benchmarks/run.py. Results: benchmarks/results/int8.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks import inprocess
from benchmarks.run import RESULTS, crop, make_model, own_store, photos, sweep_fresh
from models.runtime import OnnxRuntime

GRAPHS = ("onnx", "onnx-int8")


def measure(backbone: str, image_size: int, levels: list[int], seconds: float) -> dict:
    tag, model_dir, meta = make_model(backbone, image_size, int8=True)
    one_face = photos()["one_face"]
    cores = os.cpu_count() or 1
    runs = {g: OnnxRuntime(model_dir, ["CPUExecutionProvider"], int8=g == "onnx-int8") for g in GRAPHS}
    out: dict = {"model": {"backbone": backbone, "image_size": image_size}, "cpus": cores}
    out["network"] = inprocess.network_rates(runs, image_size, [1, 4, 8, 16, 32])
    out["detector"] = inprocess.detector_rate(one_face)
    out["detector_together"] = inprocess.detector_rate_together(one_face, cores)
    out["crops"], out["ceiling_one_face"], out["ceiling_measured"] = {}, {}, {}
    for g in GRAPHS:
        best = max(out["network"][g], key=out["network"][g].get)
        out["crops"][g] = inprocess.crops_rate(model_dir, meta, g, best)
        out["ceiling_one_face"][g] = cores / (1 / out["detector"] + cores / out["crops"][g])
        # the same with the detectors' rate measured on every core at once, not one core's times cores
        out["ceiling_measured"][g] = 1 / (1 / out["detector_together"] + 1 / out["crops"][g])
        print(f"{g}: network {out['network'][g]}, crops {out['crops'][g]:.1f} img/s", flush=True)
    cases = {
        "predict_faces": ("/predict_faces", [("images", ("face.jpg", crop(), "image/jpeg"))]),
        "predict_one_face": ("/predict", [("image", ("one.jpg", one_face, "image/jpeg"))]),
    }
    out["service"] = {
        g: sweep_fresh({"AGE_GENDER_MODEL": tag, "AGE_GENDER_RUNTIME": g}, cases, levels, seconds, f"int8_{g}")
        for g in GRAPHS
    }
    out["cpu_ms_per_request"] = {case: cpu_split(tag, cases[case], seconds, case) for case in cases}
    return out


def cpu_split(tag: str, case: tuple[str, list], seconds: float, label: str) -> dict[str, float]:
    """CPU milliseconds per request of each service process while `case` runs at 16 in flight (INT8)."""
    from benchmarks.load import drive
    from devtools.launch import descendants, running_service, service_name

    def cpu_s(pid: int) -> float:  # utime + stime, fields 14 and 15 of /proc/PID/stat
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    path, files = case
    env = {"AGE_GENDER_MODEL": tag, "AGE_GENDER_RUNTIME": "onnx-int8"}
    with running_service(env, RESULTS / f"serve_int8_cpu_{label}.log") as url:
        drive(url + path, files, 4, 3)
        workers = {pid: service_name(pid) for pid in descendants(running_service.pid)}
        workers = {pid: name for pid, name in workers.items() if name}
        before, start = {pid: cpu_s(pid) for pid in workers}, time.perf_counter()
        result = drive(url + path, files, 16, seconds)
        requests = result["requests_per_s"] * (time.perf_counter() - start)
        spent = {pid: cpu_s(pid) - before[pid] for pid in workers}
    out: dict[str, float] = {"requests_per_s": result["requests_per_s"]}
    for pid, name in workers.items():
        out[name] = out.get(name, 0.0) + 1000 * spent[pid] / requests  # summed over a service's processes
    return out


def summary(r: dict) -> str:
    fp32, int8 = GRAPHS
    batches = list(r["network"][fp32])
    lines = [
        f"model {r['model']}, {r['cpus']} CPUs; img/s of the network alone",
        "",
        "| graph | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---" * (1 + len(batches)) + "|",
    ]
    for g in GRAPHS:
        lines.append(f"| {g} | " + " | ".join(f"{r['network'][g][b]:.1f}" for b in batches) + " |")
    ratios = [r["network"][int8][b] / r["network"][fp32][b] for b in batches]
    lines.append("| INT8 / fp32 | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    lines += [
        "",
        f"detector {r['detector']:.1f} photos/s (one process), {r['detector_together']:.1f} ({r['cpus']} at once);"
        " crops -> answers: "
        + ", ".join(f"{g} {r['crops'][g]:.1f}" for g in GRAPHS)
        + " img/s; ceiling of /predict (one face), by the formula / measured: "
        + ", ".join(f"{g} {r['ceiling_one_face'][g]:.1f} / {r['ceiling_measured'][g]:.1f}" for g in GRAPHS)
        + " photos/s",
        "",
        "| endpoint | in flight | fp32 req/s | INT8 req/s | INT8 / fp32 | INT8 p50 ms | INT8 p99 ms"
        " | INT8 / ceiling (formula, measured) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in r["service"][fp32]:
        for a, b in zip(r["service"][fp32][case], r["service"][int8][case], strict=True):
            fp, q = a["requests_per_s"], b["requests_per_s"]
            shares = (q / r["ceiling_one_face"][int8], q / r["ceiling_measured"][int8])
            ceiling = "{:.0%}, {:.0%}".format(*shares) if case == "predict_one_face" else ""
            lines.append(
                f"| {case} | {a['concurrency']} | {fp:.1f} | {q:.1f} | {q / fp:.2f}x | "
                f"{b['p50_ms']:.0f} | {b['p99_ms']:.0f} | {ceiling} |"
            )
    for case, split in r["cpu_ms_per_request"].items():
        lines += ["", f"{case}, 16 in flight, INT8: {split['requests_per_s']:.1f} req/s; CPU ms per request:"]
        lines += [f"  {name}: {ms:.1f}" for name, ms in split.items() if name != "requests_per_s"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet34")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seconds", type=float, default=12.0, help="per concurrency level")
    args = p.parse_args()
    own_store()
    results = measure(args.backbone, args.image_size, args.levels, args.seconds)
    (RESULTS / "int8.json").write_text(json.dumps(results, indent=2))
    print(summary(results))


if __name__ == "__main__":
    main()
