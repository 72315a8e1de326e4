"""On generated sample data: the distribution age head against regression (same data, recipe and
budget), age intervals, P(minor), temperature-scaled gender, evaluation plots, the model card, models
stored before any of this, and `fit` on two processes (DDP, gloo)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
from pathlib import Path

import bentoml
import numpy as np
import pytest

from models.artifact import CARD_FILE, INTERVAL_LEVEL, ModelMeta, stored_meta
from models.network import load_network
from models.pipeline import Estimator
from training import calibration
from training.checkpoint import load_model
from training.scoring import predict
from training.utkface import read_metadata

from .conftest import older_release, run_cli


def stored(tag: str) -> tuple[str, ModelMeta]:
    model = bentoml.models.get(tag)
    return model.path, stored_meta(model)


def test_both_age_heads_learn_the_generated_ages(model_tag: str, regression_tag: str, metadata_file: Path) -> None:
    """Which head is better is measured on real faces (BENCHMARKS.md: MAE 5.43 against 6.09); on 900
    generated pictures in 8 epochs the order depends on the seed and the CPU's arithmetic (test MAE,
    seeds 0-2 on an AVX-512 CPU: distribution 3.34, 3.30, 2.78; regression 1.83, 2.50, 2.67; predicting
    the mean 14.2). Each head must be far better than predicting the mean."""
    frame = read_metadata(metadata_file)
    test = frame[frame.split == "test"]
    mean_mae = (test.age - frame[frame.split == "train"].age.mean()).abs().mean()  # predicting the mean
    dist, reg = stored(model_tag)[1], stored(regression_tag)[1]
    assert (dist.age_head, reg.age_head) == ("distribution", "regression")
    dist_mae, reg_mae = dist.metrics["test"]["age_mae"], reg.metrics["test"]["age_mae"]
    print(f"\ntest age MAE: distribution {dist_mae:.2f}, regression {reg_mae:.2f}, predicting the mean {mean_mae:.2f}")
    assert dist_mae < 0.3 * mean_mae and reg_mae < 0.3 * mean_mae


@pytest.mark.parametrize("which", ["distribution", "regression"])
def test_interval_coverage_is_near_its_level(which: str, model_tag: str, regression_tag: str) -> None:
    meta = stored(model_tag if which == "distribution" else regression_tag)[1]
    test = meta.metrics["test"]
    assert test["interval_level"] == INTERVAL_LEVEL
    # three standard errors of a share measured on the test split's n images (0.14 at n = 74): the tiny
    # model's coverage moves with the CPU's arithmetic for the same seed
    tolerance = 3 * np.sqrt(INTERVAL_LEVEL * (1 - INTERVAL_LEVEL) / test["n"])
    assert abs(test["interval_coverage"] - INTERVAL_LEVEL) <= tolerance, test
    assert test["minor_auc"] > 0.9, test


def test_minor_probability_separates_children_from_adults(model_tag: str, metadata_file: Path) -> None:
    from models.outputs import COLUMNS, decode

    path, meta = stored(model_tag)
    frame = read_metadata(metadata_file)
    frame = frame[frame.split.isin(["val", "test"]) & ((frame.age < 10) | (frame.age > 40))]
    outputs = predict(Estimator.open(path, meta), frame)
    minor = decode(*outputs, meta, INTERVAL_LEVEL)[:, COLUMNS.index("minor_probability")]
    children, adults = minor[(frame.age < 10).to_numpy()], minor[(frame.age > 40).to_numpy()]
    print(f"\nP(minor) > 0.5 for {np.mean(children > 0.5):.2f} of {len(children)} faces under 10, ", end="")
    print(f"{np.mean(adults > 0.5):.2f} of {len(adults)} over 40")
    assert np.mean(children > 0.5) > 0.8 and np.mean(adults < 0.5) > 0.8


def test_temperature_scaling_helps_on_an_overconfident_split(model_tag: str, metadata_file: Path) -> None:
    """25 % of the held-out gender labels flipped: the model is now over-confident on them. The temperature
    fitted on the noisy validation split softens it (T > 1) and lowers the negative log-likelihood on the
    noisy test split, what it minimises on validation. ECE is printed, not held: on 74 test pictures its
    bins are too noisy (seed 0 on an AVX-512 CPU: 0.170 -> 0.184 while the NLL fell 1.26 -> 0.52)."""
    path, meta = stored(model_tag)
    estimator, frame = Estimator.open(path, meta), read_metadata(metadata_file)
    rng = np.random.default_rng(0)
    noisy = {}
    for split in ("val", "test"):
        part = frame[frame.split == split]
        labels = part.gender.to_numpy().copy()
        flip = rng.random(len(labels)) < 0.25
        labels[flip] = 1 - labels[flip]
        noisy[split] = (predict(estimator, part)[1], labels)
    temperature = calibration.fit_temperature(*noisy["val"])
    logits, labels = noisy["test"]

    def test_ece(t: float) -> float:
        probs = calibration.softmax(logits / t)
        return calibration.ece(probs.max(1), probs.argmax(1) == labels)

    before, after = calibration.nll(logits, labels, 1.0), calibration.nll(logits, labels, temperature)
    print(f"\nT {temperature:.2f}: test NLL {before:.3f} -> {after:.3f}", end=", ")
    print(f"ECE {test_ece(1.0):.3f} -> {test_ece(temperature):.3f}")
    assert temperature > 1.2  # softer
    assert after < 0.8 * before


def test_export_stores_calibration_and_a_model_card(model_tag: str, metadata_file: Path) -> None:
    path, meta = stored(model_tag)
    assert meta.calibration.split == "val" and meta.calibration.gender_temperature > 0
    # temperature scaling minimises the NLL on val (ECE may move either way by a little; the over-confident
    # split test below checks that it falls where it should)
    estimator, _, _ = load_model(model_tag, "onnx")
    val = read_metadata(metadata_file).query("split == 'val'")
    logits = predict(estimator, val)[1]
    labels, temperature = val.gender.to_numpy(), meta.calibration.gender_temperature
    assert calibration.nll(logits, labels, temperature) <= calibration.nll(logits, labels, 1.0) + 1e-6
    # the stored ECEs are those of these answers, before and after the temperature
    for key, t in (("gender_ece_uncalibrated", 1.0), ("gender_ece", temperature)):
        probs = calibration.softmax(logits.astype(np.float64) / t)
        expected = calibration.ece(probs.max(1), probs.argmax(1) == labels)
        assert meta.metrics["val"][key] == pytest.approx(expected, abs=1e-3), key
    card = (Path(path) / CARD_FILE).read_text()
    for needed in (
        "DEMO MODEL",
        "distribution age head",
        "## Data",
        "## Metrics",
        "## Calibration",
        "Test metrics by race",
        "Not intended for",
        "non-commercial",
    ):
        assert needed in card, needed


def test_evaluate_reports_and_plots_the_new_numbers(model_tag: str, metadata_file: Path, tmp_path: Path) -> None:
    result = run_cli("evaluate", "--model", model_tag, "--metadata", str(metadata_file), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "interval coverage" in result.stdout and "ECE" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    overall = report["overall"]
    # coverage is a share of n test faces (90 here): within 3.5 standard errors of the nominal level
    within = 3.5 * (INTERVAL_LEVEL * (1 - INTERVAL_LEVEL) / overall["n"]) ** 0.5
    assert abs(overall["interval_coverage"] - INTERVAL_LEVEL) <= within and overall["minor_auc"] > 0.9
    assert set(report["age_mae_by_age_group_and_gender"]) == {"male", "female"}
    assert len(report["age_mae_by_age_group_and_race"]) >= 4
    for plot in ("fairness.png", "gender_reliability.png", "mae_by_age.png", "age_scatter.png"):
        assert (tmp_path / plot).stat().st_size > 10_000, plot


@pytest.fixture(scope="module")
def old_tag(regression_tag: str) -> str:
    """A model as `export` stored them before the metadata had a schema version (schema 1) and the
    distribution head: regression head, no `age_head` key, no calibration, the older metric keys, no model
    card, no INT8 graph (its weights are the regression model's)."""
    from training import fingerprint
    from training.export import save_model

    model = bentoml.models.get(regression_tag)
    path, meta = model.path, model.info.metadata
    trained = fingerprint.read(Path(path) / fingerprint.FILE, meta["dataset"]["train_split"])
    old = {k: v for k, v in meta.items() if k not in ("schema_version", "age_head", "calibration", "int8")}
    old["metrics"] = {
        s: {k: v for k, v in m.items() if k in ("age_mae", "age_rmse", "age_mse", "gender_acc", "loss")}
        for s, m in meta["metrics"].items()
    }
    net = load_network(path, ModelMeta.load(meta))
    return str(save_model(net, older_release(old), name="age_gender_old", train_split=sorted(trained)))


def test_a_model_stored_before_this_change_serves_and_evaluates(old_tag: str, metadata_file: Path, tmp_path: Path):
    assert not (Path(stored(old_tag)[0]) / CARD_FILE).exists()
    result = run_cli("evaluate", "--model", old_tag, "--metadata", str(metadata_file), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    overall = json.loads((tmp_path / "report.json").read_text())["overall"]
    assert "interval_coverage" not in overall and overall["gender_acc"] > 0.8

    os.environ["AGE_GENDER_MODEL"] = old_tag  # read when serving.settings is imported
    try:
        import serving.settings

        importlib.reload(serving.settings)
        import service

        service = importlib.reload(service)
        photo = tmp_path / "face.jpg"
        from devtools.photos import astronaut

        astronaut().save(photo)
        api = service.AgeGender()
        (face,) = asyncio.run(api.predict(image=photo)).faces
        assert face.age_interval is None and face.minor_probability is None and 0 <= face.age <= 116
        info = asyncio.run(api.model_info())
        assert info.age_head == "regression" and info.gender_temperature == 1.0
        # no INT8 graph (exported before INT8): the fp32 graph, and the reason
        assert info.runtime == "onnx" and info.int8_cost is None
        assert info.runtime_reason.startswith("this model has no INT8 graph")
    finally:
        os.environ.pop("AGE_GENDER_MODEL")
        os.environ.pop("OMP_NUM_THREADS", None)  # set by service.py for its own processes


def test_fit_on_two_processes_with_ddp_exports_a_model_that_serves(metadata_file: Path, tmp_path: Path) -> None:
    """`fit` with trainer.strategy=ddp on two CPU processes (gloo), then the exported model answers."""
    home = tmp_path / "bentoml"
    result = run_cli(
        "fit",
        "--config",
        "configs/demo.yaml",
        "--export",
        f"data.metadata={metadata_file}",
        f"logdir={tmp_path / 'runs'}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        BENTOML_HOME=str(home),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr and "Starting with 2 processes" in result.stderr
    assert result.stdout.count("saved model") == 1  # rank 0 only
    (model,) = [p for p in (home / "models" / "age_gender").iterdir() if p.name != "latest"]
    import yaml

    from models.artifact import array_preprocess_for
    from models.outputs import decode
    from models.runtime import OnnxRuntime

    meta = ModelMeta.load(yaml.safe_load((model / "model.yaml").read_text())["metadata"])
    crops = np.random.default_rng(0).integers(0, 256, (3, 200, 200, 3), dtype=np.uint8)
    rows = decode(
        *OnnxRuntime(model, ["CPUExecutionProvider"])(array_preprocess_for(meta)(crops)), meta, INTERVAL_LEVEL
    )
    assert rows.shape == (3, 6) and np.isfinite(rows).all()
