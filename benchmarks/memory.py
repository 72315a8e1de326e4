"""`python -m benchmarks.memory`: the memory of the running service, process by process (PSS).

Starts the working tree's service (ONNX Runtime on CPU, ResNet-34 at 224 px with random weights) with 1
and then 2 detector workers, sends a few hundred /predict and /predict_faces requests so that every
process has done real work, and reads each process's PSS from /proc/<pid>/smaps_rollup. PSS shares
the pages that processes have in common (libraries, the Python runtime) among them, so the column adds
up to what the service costs the machine. Then, in a fresh service with one detector worker (whose heap
has not yet grown with small photos, which would hide what a large one keeps), what each process keeps after
each large photo: the issue's bound is 50 MB. Results: benchmarks/results/memory.json and Markdown tables.
"""

from __future__ import annotations

import json
import time

from benchmarks.run import RESULTS, crop, make_model, own_store, photos
from devtools.launch import descendants, pss_kb, running_service, service_name
from devtools.photos import encode, group_photo
from serving.heap import LATER


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


def returned(tag: str) -> dict[str, dict[str, float]]:
    """Large photo -> PSS MB of each process above its level before the first of them, after each."""
    import httpx

    group, _ = group_photo()
    # which photos leave the worker thread's heap with free space at its top depends on their buffers' sizes:
    # 8660x5773 does (+58 MB kept without serving/heap.give_back trimming that top), 8160x6120 does not
    phone, largest = encode(group.resize((4000, 3000))), encode(group.resize((8660, 5773)))
    large = [("/predict", "50 Mpx", largest), ("/annotate", "50 Mpx", largest), ("/predict", "12 Mpx", phone)]
    env = {"AGE_GENDER_MODEL": tag, "AGE_GENDER_DETECTOR_WORKERS": "1"}
    with running_service(env, RESULTS / "memory_returned.log") as url:
        small = {"image": ("a.jpg", photos()["one_face"])}
        for _ in range(2):  # every process has answered once
            assert httpx.post(url + "/predict", files=small, timeout=60).status_code == 200
        time.sleep(LATER + 1)  # any delayed trim after the first calls
        pids = {pid: role(pid, running_service.pid) for pid in descendants(running_service.pid)}
        before = {pid: pss_kb(pid) for pid in pids}
        out = {}
        for path, size, data in large:
            assert httpx.post(url + path, files={"image": ("p.jpg", data)}, timeout=120).status_code == 200
            time.sleep(LATER + 1)  # the delayed trim after an answer (serving/heap.py)
            grown = {pids[pid]: round((pss_kb(pid) - before[pid]) / 1024, 1) for pid in pids}
            out[f"{len(out) + 1}. {path}, {size}"] = grown
    return out


def main() -> None:
    own_store()
    tag, _, _ = make_model("resnet34", 224)
    results: dict = {str(n): measure(tag, n, requests=100) for n in (1, 2)}
    results["returned"] = returned(tag)
    (RESULTS / "memory.json").write_text(json.dumps(results, indent=2))
    print("| process | PSS MB, 1 detector worker | PSS MB, 2 detector workers |\n|---|---|---|")
    for name in results["2"]:
        cells = [" + ".join(f"{v:.0f}" for v in results[n].get(name, [])) or "-" for n in ("1", "2")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    totals = [sum(sum(v) for v in results[n].values()) for n in ("1", "2")]
    print(f"| **whole service** | **{totals[0]:.0f}** | **{totals[1]:.0f}** |")
    print(f"\nEach additional detector worker: {totals[1] - totals[0]:.0f} MB PSS.")
    names = list(next(iter(results["returned"].values())))
    print("\n| after (in turn) | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for photo, grown in results["returned"].items():
        print(f"| {photo} | " + " | ".join(f"{grown[n]:+.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
