"""`python -m benchmarks.memory`: the memory of the running service, process by process (PSS).

Starts the working tree's service (ONNX Runtime on CPU, ResNet-34 at 224 px with random weights) with 1
and then 2 detector workers, sends a few hundred /predict and /predict_faces requests so that every
process has done real work, and reads each process's PSS from /proc/<pid>/smaps_rollup. PSS shares
the pages that processes have in common (libraries, the Python runtime) among them, so the column adds
up to what the service costs the machine. Results: benchmarks/results/memory.json and a Markdown table.
"""

from __future__ import annotations

import json

from benchmarks.run import RESULTS, crop, make_model, own_store, photos
from devtools.launch import descendants, pss_kb, running_service, service_name


def role(pid: int, arbiter: int) -> str:
    return service_name(pid) or ("arbiter (bentoml serve)" if pid == arbiter else "other")


def measure(tag: str, detector_workers: int, requests: int) -> dict[str, list[float]]:
    import httpx

    env = {"AGE_GENDER_MODEL": tag, "AGE_GENDER_DETECTOR_WORKERS": str(detector_workers)}
    with running_service(env, RESULTS / f"memory_{detector_workers}.log") as url:
        photo, face = photos()["one_face"], crop()
        for _ in range(requests):
            assert httpx.post(url + "/predict", files={"image": ("a.jpg", photo)}, timeout=60).status_code == 200
            assert httpx.post(url + "/predict_faces", files={"images": ("f.jpg", face)}, timeout=60).status_code == 200
        out: dict[str, list[float]] = {}
        for pid in descendants(running_service.pid):
            out.setdefault(role(pid, running_service.pid), []).append(round(pss_kb(pid) / 1024, 1))
    return out


def main() -> None:
    own_store()
    tag, _, _ = make_model("resnet34", 224)
    results = {str(n): measure(tag, n, requests=100) for n in (1, 2)}
    (RESULTS / "memory.json").write_text(json.dumps(results, indent=2))
    print("| process | PSS MB, 1 detector worker | PSS MB, 2 detector workers |\n|---|---|---|")
    for name in results["2"]:
        cells = [" + ".join(f"{v:.0f}" for v in results[n].get(name, [])) or "-" for n in ("1", "2")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    totals = [sum(sum(v) for v in results[n].values()) for n in ("1", "2")]
    print(f"| **whole service** | **{totals[0]:.0f}** | **{totals[1]:.0f}** |")
    print(f"\nEach additional detector worker: {totals[1] - totals[0]:.0f} MB PSS.")


if __name__ == "__main__":
    main()
