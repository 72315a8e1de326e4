"""deploy/k8s: the Kubernetes manifests agree with the service they deploy. Parsed only, no cluster."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
import yaml

from serving.guard import CHECKS_AT_ONCE
from serving.patches import DEPENDENCY_READY_TIMEOUT
from serving.settings import PREFIX, Settings
from serving.uploads import SPOOL_BYTES

from .conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
LIVEZ, READYZ = "/livez", "/readyz"  # BentoML's health routes (checked against the real app below)
GPU = "nvidia.com/gpu"
# a crashed worker was back 5.8-8.5 s after a kill -9 (BENCHMARKS.md "Reliability"); liveness must outlast it
WORKER_RESTART_S = 15
# memory per pod, CPU image (BENCHMARKS.md): PSS at rest with one detector process, each further one, and
# what one detector process holds at its peak over that while it detects a 50 Mpx photo (benchmarks.bounds:
# 0.68 GB, up to 0.6 GB since P-Net runs on tiles; the larger kept as margin)
BASE_GB, PER_DETECTOR_GB, PEAK_PER_DETECTOR_GB = 0.73, 0.15, 0.68


def uploads_held(detectors: int, max_bytes: int, max_images: int) -> int:
    """Bytes the API process holds at most under uploads: a largest upload per detector process on its way
    there, twice (read, pickled: serving.dependencies.ByteBudget), those being checked, twice, and BentoML's
    read of one (benchmarks.edge measured (2 x 2 + 3) x 21 MB with 2 detector processes); and the parsed form
    of each request being handled, its file parts in memory up to SPOOL_BYTES each (serving/patches.py)."""
    forms = Settings.max_concurrency * max_images * SPOOL_BYTES
    return (2 * detectors + 2 * CHECKS_AT_ONCE + 1) * max_bytes + forms


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


MANIFESTS = {path.name: _documents(path) for path in sorted(K8S.glob("*.yaml"))}


def _only(filename: str, kind: str) -> dict:
    docs = [doc for doc in MANIFESTS[filename] if doc.get("kind") == kind]
    assert len(docs) == 1, f"{filename}: expected one {kind}"
    return docs[0]


DEPLOYMENTS = {variant: _only(f"deployment-{variant}.yaml", "Deployment") for variant in ("cpu", "gpu")}
SERVICE = _only("service.yaml", "Service")
HPA = _only("hpa.yaml", "HorizontalPodAutoscaler")


def _container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _port(deployment: dict) -> dict:
    ports = _container(deployment)["ports"]
    assert len(ports) == 1
    return ports[0]


def _refers_to_port(ref: int | str, deployment: dict) -> bool:
    """A probe's or Service's port: the container port's number or its name."""
    port = _port(deployment)
    return ref == port["containerPort"] or ref == port.get("name")


def _env(deployment: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in _container(deployment).get("env", [])}


def _cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _bytes(quantity: str | int) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity)).groups()
    scale = {None: 1, **{p: 1000 ** (i + 1) for i, p in enumerate("KMGT")}}
    scale |= {p + "i": 1024 ** (i + 1) for i, p in enumerate("KMGT")}
    return int(number) * scale[unit]


@pytest.fixture(scope="module")
def service():
    """service.py as `bentoml serve` loads it (no model needed until a worker starts)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    import service as module

    if threads is None:  # service.py sets it for its own processes; later tests' training subprocesses need it unset
        os.environ.pop("OMP_NUM_THREADS", None)
    return module


@pytest.fixture(scope="module")
def app(service):
    return service.AgeGender.to_asgi()  # routes only: the lifespan, which would start the services, is not entered


def test_every_manifest_parses_and_names_its_kind() -> None:
    assert set(MANIFESTS) >= {
        "deployment-cpu.yaml",
        "deployment-gpu.yaml",
        "service.yaml",
        "hpa.yaml",
        "kustomization.yaml",
    }
    for name, docs in MANIFESTS.items():
        assert docs, name
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), name


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_container_port_is_where_bentoml_serves(variant: str, app) -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer

    # to_asgi() has merged the service's own config (an `http.port` there would win) into BentoML's
    assert _port(DEPLOYMENTS[variant])["containerPort"] == BentoMLContainer.http.port.get()
    annotations = DEPLOYMENTS[variant]["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert annotations["prometheus.io/port"] == str(BentoMLContainer.http.port.get())


def test_probe_paths_are_routes_of_the_service(app, service) -> None:
    paths = {getattr(route, "path", None) for route in app.routes}
    assert {LIVEZ, READYZ} <= paths
    assert not {LIVEZ, READYZ} & set(service.ROUTES)  # the request guard leaves them alone
    # No request is sent: BentoML registers its Prometheus metrics on an app's first request, once per process,
    # and another test's app (test_guard.py) does the same; /readyz would need the dependency services anyway.


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_probes(variant: str) -> None:
    deployment = DEPLOYMENTS[variant]
    container = _container(deployment)
    probes = {kind: container[kind] for kind in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["httpGet"]["path"] == LIVEZ
    assert probes["readinessProbe"]["httpGet"]["path"] == READYZ
    assert probes["startupProbe"]["httpGet"]["path"] in (LIVEZ, READYZ)
    for kind, probe in probes.items():
        assert _refers_to_port(probe["httpGet"]["port"], deployment), kind

    def patience(probe: dict) -> int:  # seconds of failures before the kubelet acts (defaults: 10 s, 3)
        return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)

    # a worker restart may take the pod out of the Service, but must not get it killed
    assert patience(probes["livenessProbe"]) >= 2 * WORKER_RESTART_S
    # /readyz waits for its dependency services up to DEPENDENCY_READY_TIMEOUT; a kubelet timeout below that
    # turns their 503 into "no answer"
    assert probes["readinessProbe"]["timeoutSeconds"] > DEPENDENCY_READY_TIMEOUT
    # the model has to load before the first success: minutes, not the liveness probe's patience
    assert patience(probes["startupProbe"]) >= 120


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_env_names_are_settings_and_values_parse(variant: str, monkeypatch) -> None:
    fields = {PREFIX + f.name.upper(): f.name for f in dataclasses.fields(Settings)}
    types = typing.get_type_hints(Settings)
    env = {k: v for k, v in _env(DEPLOYMENTS[variant]).items() if k.startswith(PREFIX)}
    assert {"AGE_GENDER_RUNTIME", "AGE_GENDER_MAX_BATCH_SIZE", "AGE_GENDER_MAX_BYTES"} <= set(env)
    for name, value in env.items():
        assert name in fields, f"{name} is not a field of serving.settings.Settings"
        assert isinstance(value, str), f"{name}: Kubernetes takes env values as strings; quote {value!r}"
        types[fields[name]](value)  # raises if it does not parse as the field's type
    # and as the service itself reads them
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    for name, value in env.items():
        assert getattr(settings, fields[name]) == types[fields[name]](value)


def test_each_image_runs_its_runtime() -> None:
    from models.runtime import RUNTIMES

    assert _container(DEPLOYMENTS["cpu"])["image"].endswith(":cpu")
    assert _env(DEPLOYMENTS["cpu"])["AGE_GENDER_RUNTIME"] == "auto"  # ONNX Runtime (no torch), INT8 in bound
    assert _container(DEPLOYMENTS["gpu"])["image"].endswith(":gpu")
    assert _env(DEPLOYMENTS["gpu"])["AGE_GENDER_RUNTIME"] == "torch"  # on CUDA
    assert {_env(d)["AGE_GENDER_RUNTIME"] for d in DEPLOYMENTS.values()} <= set(RUNTIMES)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_resources(variant: str) -> None:
    resources = _container(DEPLOYMENTS[variant])["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert _cores(requests["cpu"]) <= _cores(limits["cpu"])
    assert _bytes(requests["memory"]) <= _bytes(limits["memory"])
    workers = _env(DEPLOYMENTS[variant]).get("AGE_GENDER_DETECTOR_WORKERS")
    if workers is not None:
        # one detector process per core of the CPU limit (0: BentoML counts the limit's cores itself)
        processes = int(workers) or _cores(limits["cpu"])
        assert processes == _cores(limits["cpu"])
        # no OOM kill at the measured worst case: every detector process at its peak at once, the API process
        # full of uploads
        at_rest = BASE_GB + PER_DETECTOR_GB * (processes - 1)
        env = _env(DEPLOYMENTS[variant])
        max_bytes = int(env.get("AGE_GENDER_MAX_BYTES", Settings.max_bytes))
        max_images = int(env.get("AGE_GENDER_MAX_IMAGES", Settings.max_images))
        uploads = uploads_held(processes, max_bytes, max_images)
        assert _bytes(limits["memory"]) >= (at_rest + PEAK_PER_DETECTOR_GB * processes) * 10**9 + uploads
    tolerates_gpu_nodes = any(
        t.get("key") == GPU for t in DEPLOYMENTS[variant]["spec"]["template"]["spec"].get("tolerations", [])
    )
    if variant == "gpu":
        assert int(limits[GPU]) == 1 and tolerates_gpu_nodes
    else:
        assert GPU not in requests and GPU not in limits and not tolerates_gpu_nodes


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_pod_security_and_shutdown(variant: str, service) -> None:
    from bentoml._internal.container.generate import BENTO_UID_GID

    pod = DEPLOYMENTS[variant]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == BENTO_UID_GID  # the user BentoML's images create
    container = _container(DEPLOYMENTS[variant])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # BentoML writes uploads and its sockets to /tmp: an emptyDir, not the image's layer
    tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[tmp[0]["name"]]
    # a Service named age-gender would inject AGE_GENDER_SERVICE_HOST etc. into the settings' namespace
    assert pod["enableServiceLinks"] is False
    # in-flight requests finish: the preStop pause plus the public API's request timeout
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pause + service.AgeGender.config["traffic"]["timeout"]


def test_deployments_select_their_own_pods() -> None:
    for variant, deployment in DEPLOYMENTS.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), variant
        for other, other_deployment in DEPLOYMENTS.items():
            if other != variant:  # two Deployments that select each other's pods would fight over them
                assert not selector.items() <= other_deployment["spec"]["template"]["metadata"]["labels"].items()


def test_service_routes_to_both_deployments() -> None:
    selector = SERVICE["spec"]["selector"]
    (port,) = SERVICE["spec"]["ports"]
    assert port["port"] == 80
    for variant, deployment in DEPLOYMENTS.items():
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items(), variant
        assert _refers_to_port(port["targetPort"], deployment), variant


def test_hpa_scales_the_cpu_deployment() -> None:
    spec = HPA["spec"]
    cpu = DEPLOYMENTS["cpu"]
    assert HPA["apiVersion"] == "autoscaling/v2"
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": cpu["metadata"]["name"]}
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in _container(cpu)["resources"]["requests"]  # utilisation is a share of the request
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    assert "replicas" not in cpu["spec"]  # the HPA owns the count; `kubectl apply` would reset it


def test_kustomization_lists_existing_files() -> None:
    kustomization = _only("kustomization.yaml", "Kustomization")
    resources = kustomization["resources"]
    assert {"deployment-cpu.yaml", "service.yaml", "hpa.yaml"} <= set(resources)
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    text = (K8S / "kustomization.yaml").read_text()
    for name in MANIFESTS:  # every manifest is listed or offered (commented out, like the GPU deployment)
        assert name == "kustomization.yaml" or name in text, name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "Service"]
