"""The INT8 graph: written and measured by export, chosen by the service only within INT8_MAX_COST."""

from __future__ import annotations

import json
from pathlib import Path

import bentoml
import httpx
import numpy as np
import onnx
import pytest

from devtools.photos import astronaut, encode
from models.artifact import INT8_FILE, INT8_MAX_COST, ONNX_FILE, Int8, ModelMeta, architecture, stored_meta
from models.network import load_network
from models.pipeline import Estimator
from models.runtime import int8_verdict, open_runtime
from training.scoring import differences, metrics, predict, with_answers
from training.utkface import read_metadata

from .conftest import run_cli


@pytest.mark.parametrize("head", ["distribution", "regression"])
def test_int8_and_fp32_agree_within_the_bound_on_the_sample_test_split(
    head: str, metadata_file: Path, request: pytest.FixtureRequest
) -> None:
    stored = bentoml.models.get(request.getfixturevalue("model_tag" if head == "distribution" else "regression_tag"))
    meta, folder = stored_meta(stored), Path(stored.path)
    # a quantised graph: int8 weights (a quarter of the fp32 file) behind QuantizeLinear / DequantizeLinear
    graph = onnx.load(folder / INT8_FILE)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    assert (folder / INT8_FILE).stat().st_size < 0.35 * (folder / ONNX_FILE).stat().st_size
    assert meta.int8 is not None and meta.int8.calibration_crops == {"splits": ["train"], "n": 300, "seed": 0}

    # measured again here, through the served pipeline, on the test split
    test = read_metadata(metadata_file).query("split == 'test'").reset_index(drop=True)
    scores = {}
    for runtime in ("onnx", "onnx-int8"):
        estimator = Estimator.open(folder, meta, runtime)
        assert estimator.runtime.name == runtime
        age_out, logits = predict(estimator, test)
        scores[runtime] = metrics(with_answers(test, age_out, logits, meta, 0.8))
    cost = differences(scores["onnx"], scores["onnx-int8"])
    assert int8_verdict(costing(test=cost))[0], cost
    assert cost["age_mae"] != 0.0  # the graphs differ: this is not the fp32 graph twice
    # and export stored the same cost (its fp32 numbers came from torch: equal within float error)
    for metric in INT8_MAX_COST:
        assert meta.int8.cost["test"][metric] == pytest.approx(cost[metric], abs=1e-3)
    assert int8_verdict(meta)[0] and set(meta.int8.cost) == {"val", "test"}


def costing(**cost: dict[str, float]) -> ModelMeta:
    """A model's metadata whose INT8 graph was measured at this cost per split."""
    int8 = Int8(file=INT8_FILE, format="QDQ", calibration_crops={}, metrics={}, cost=cost)
    return architecture("resnet18", 16, 0.0, 32, int8=int8)


def test_int8_verdict_reads_the_bound() -> None:
    ok = {"age_mae": 0.05, "gender_acc": -0.002}
    assert int8_verdict(costing(val=ok, test=ok))[0]
    better = {"age_mae": -0.3, "gender_acc": 0.01}  # INT8 better than fp32 on both: fine
    assert int8_verdict(costing(test=better))[0]
    assert int8_verdict(architecture("resnet18", 16, 0.0, 32))[1].startswith("this model has no INT8 graph")
    assert "cost was not measured" in int8_verdict(costing())[1]
    over, why = int8_verdict(costing(val=ok, test={**ok, "age_mae": 0.25}))
    assert not over and "age_mae +0.2500 on test (worse by at most 0.1)" in why
    worse, why = int8_verdict(costing(val={**ok, "gender_acc": -0.01}, test=ok))
    assert not worse and "gender_acc -0.0100 on val (worse by at most 0.003)" in why
    assert not int8_verdict(costing(test={**ok, "age_mae": float("nan")}))[0]


@pytest.fixture(scope="module")
def costly_tag(model_tag: str) -> str:
    """The served model with its INT8 graph, but a measured cost over the bound stored with it."""
    from training.export import save_model

    stored = bentoml.models.get(model_tag)
    meta = stored_meta(stored)
    assert meta.int8 is not None
    meta.int8.cost["test"]["age_mae"] = 0.5
    net = load_network(stored.path, meta)
    return str(save_model(net, meta, name="age_gender_costly", graphs=Path(stored.path)))


def test_a_costly_int8_graph_is_not_served_by_default_and_the_service_says_why(costly_tag: str, tmp_path: Path):
    from devtools.launch import running_service

    stored = bentoml.models.get(costly_tag)
    assert (Path(stored.path) / INT8_FILE).is_file()
    with running_service({"AGE_GENDER_MODEL": costly_tag}, tmp_path / "serve.log") as url:
        info = httpx.post(url + "/model_info").json()
        r = httpx.post(url + "/predict", files={"image": ("a.jpg", encode(astronaut()), "image/jpeg")}, timeout=60)
    assert r.status_code == 200 and len(r.json()["faces"]) == 1
    assert info["runtime"] == "onnx" and info["int8_cost"]["test"]["age_mae"] == 0.5
    assert "costs too much accuracy: age_mae +0.5000 on test" in info["runtime_reason"]
    (line,) = [x for x in (tmp_path / "serve.log").read_text().splitlines() if "AgeGenderModel runs" in x]
    assert "WARNING" in line and "serving the fp32 graph" in line and "age_mae +0.5000 on test" in line


def test_the_int8_graph_serves_by_default_and_when_asked(server: str, model_tag: str) -> None:
    info = httpx.post(server + "/model_info").json()
    assert info["runtime"] == "onnx-int8" and info["device"] == "cpu"
    assert info["runtime_reason"].startswith("the INT8 graph's measured cost is within bound")
    assert set(info["int8_cost"]) == {"val", "test"}
    stored = bentoml.models.get(model_tag)
    asked, why = open_runtime("onnx-int8", stored.path, stored_meta(stored))
    assert asked.name == "onnx-int8" and why.startswith("asked for")


def test_evaluate_remeasures_the_int8_cost(model_tag: str, metadata_file: Path, tmp_path: Path) -> None:
    result = run_cli(
        "evaluate",
        "--model",
        model_tag,
        "--metadata",
        str(metadata_file),
        "--out",
        str(tmp_path),
        "--runtime",
        "onnx-int8",
    )
    assert result.returncode == 0, result.stderr
    assert "runtime onnx-int8: asked for" in result.stdout
    assert "INT8 minus fp32 graph now, test: age_mae" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    stored_cost = bentoml.models.get(model_tag).info.metadata["int8"]["cost"]["test"]
    assert report["int8_cost"]["age_mae"] == pytest.approx(stored_cost["age_mae"], abs=1e-3)
    assert np.isfinite(report["overall"]["age_mae"])
