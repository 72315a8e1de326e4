"""End to end on generated data: synth, learnability, export to the store and back, CLI errors."""

from __future__ import annotations

from pathlib import Path

import bentoml
import pytest
import torch

from models.artifact import MODEL_NAME, SCHEMA_VERSION, stored_meta
from models.network import load_network
from models.presets import normalize
from training.checkpoint import load_module
from training.data import decode_faces
from training.synth import MARKER
from training.utkface import parse_name, read_metadata

from .conftest import ROOT, assert_one_line_error, run_cli


def test_synth_writes_utkface_names(sample_dir: Path) -> None:
    files = sorted(sample_dir.glob("*.jpg.chip.jpg"))
    assert len(files) == 900 and (sample_dir / MARKER).is_file()
    labels = [parse_name(f.name) for f in files]
    assert {label.gender for label in labels} == {0, 1}
    assert min(label.age for label in labels) < 6 and max(label.age for label in labels) > 50


def test_synth_is_reproducible_and_refuses_to_overwrite(tmp_path: Path) -> None:
    assert run_cli("synth", "--out", str(tmp_path / "a"), "--n", "5", "--seed", "3").returncode == 0
    assert run_cli("synth", "--out", str(tmp_path / "b"), "--n", "5", "--seed", "3").returncode == 0
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))
    assert "already exists" in assert_one_line_error(run_cli("synth", "--out", str(tmp_path / "a"), "--n", "5"))
    (tmp_path / "file").write_text("")
    unwritable = run_cli("synth", "--out", str(tmp_path / "file" / "c"), "--n", "5")
    assert "file: File exists" in assert_one_line_error(unwritable)


def _predict(module, metadata: Path, split: str = "test"):
    frame = read_metadata(metadata)
    frame = frame[frame.split == split]
    x = normalize(decode_faces(frame.path, module.hparams.image_size))  # as training feeds the network
    with torch.inference_mode():
        age_out, logits = module.eval()(x)
    return frame, module.net.years(age_out), logits


def test_training_learns(checkpoint: Path, metadata_file: Path) -> None:
    module = load_module(checkpoint)
    frame, age, logits = _predict(module, metadata_file)
    true_age = torch.tensor(frame.age.to_numpy(), dtype=torch.float32)
    train_mean = read_metadata(metadata_file).query("split == 'train'").age.mean()
    baseline_mae = (true_age - train_mean).abs().mean().item()
    mae = (age - true_age).abs().mean().item()
    accuracy = (logits.argmax(1).numpy() == frame.gender.to_numpy()).mean()
    assert mae < 0.5 * baseline_mae, (mae, baseline_mae)
    assert accuracy > 0.85


def test_checkpoint_and_logs_are_written(checkpoint: Path) -> None:
    assert checkpoint.name == "best.ckpt"
    version_dir = checkpoint.parent.parent
    assert list(version_dir.glob("events.out.tfevents.*")), "TensorBoard logs missing"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(version_dir)).Reload().Tags()["scalars"]
    for stage in ("train", "val"):
        for name in ("loss", "loss_age", "loss_gender", "age_mae", "age_rmse", "gender_acc"):
            assert any(t.startswith(f"{stage}/{name}") for t in tags), f"{stage}/{name} not logged"


def test_export_then_load_gives_identical_outputs(model_tag: str, checkpoint: Path, metadata_file: Path) -> None:
    model = bentoml.models.get(model_tag)
    meta = model.info.metadata  # as stored: plain JSON of models.artifact.ModelMeta
    for key in ("backbone", "age_head", "head_width", "image_size", "normalisation", "gender_classes", "age_range"):
        assert key in meta
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["demo"] is True and model.info.labels["demo"] == "true"
    assert meta["dataset"]["name"] == "sample" and meta["dataset"]["n_test"] > 0
    assert set(meta["metrics"]) == {"val", "test"}
    assert meta["metrics"]["test"]["age_mse"] == pytest.approx(meta["metrics"]["test"]["age_rmse"] ** 2)

    module = load_module(checkpoint)
    net = load_network(model.path, stored_meta(model))
    frame, age, logits = _predict(module, metadata_file)
    x = normalize(decode_faces(frame.path, meta["image_size"]))
    with torch.inference_mode():
        age2, logits2 = net(x)
    assert torch.equal(age, net.years(age2)) and torch.equal(logits, logits2)


def test_fit_cli_trains_and_exports(metadata_file: Path, tmp_path: Path) -> None:
    home = tmp_path / "store"  # its own store: the session store keeps the one model the service tests serve
    args = [f"data.metadata={metadata_file}", f"logdir={tmp_path}", "trainer.max_epochs=1"]
    args += ["trainer.limit_train_batches=2", "trainer.enable_progress_bar=false"]
    result = run_cli("fit", "--config", "configs/demo.yaml", "--export", *args, BENTOML_HOME=str(home))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best checkpoint:" in result.stdout and "saved model age_gender:" in result.stdout
    assert len(list((home / "models" / MODEL_NAME).glob("*/model.yaml"))) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.backbone=resnet35"], "unknown backbone 'resnet35'; choose from resnet18, resnet34, resnet50"),
        (["model.age_weight=-1"], "model.age_weight must be >= 0"),
        (["model.lr_rate=1"], "unknown key model.lr_rate; choose from backbone"),
        (["data.seed=1"], "unknown key data.seed; choose from metadata"),  # the run's seed is the top-level one
        (["data.metadata=/nonexistent.csv"], "does not exist"),
        (["nonsense"], "must look like section.key=value"),
    ],
)
def test_fit_cli_bad_config(overrides: list[str], message: str, metadata_file: Path, tmp_path: Path) -> None:
    args = ["fit", "--config", "configs/demo.yaml", f"data.metadata={metadata_file}", f"logdir={tmp_path}"]
    assert message in assert_one_line_error(run_cli(*args, *overrides))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_export_cli_rejects_non_checkpoints(tmp_path: Path) -> None:
    fake = tmp_path / "model.ckpt"
    fake.write_text("not a checkpoint")
    assert "is not a checkpoint" in assert_one_line_error(run_cli("export", "--checkpoint", str(fake)))
    assert "does not exist" in assert_one_line_error(run_cli("export", "--checkpoint", str(tmp_path / "no.ckpt")))


def test_debug_raises_with_the_cause(tmp_path: Path) -> None:
    """--debug after the command's name (python -m predict checks AGE_GENDER_DEBUG=1: tests/test_batch.py)."""
    fake = tmp_path / "model.ckpt"
    fake.write_text("not a checkpoint")
    result = run_cli("export", "--checkpoint", str(fake), "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr
    # the one-line error, chained to what caused it (torch could not read the file)
    assert "The above exception was the direct cause of the following exception" in result.stderr
    assert "UserError:" in result.stderr and "is not a checkpoint" in result.stderr


def test_seeded_runs_are_reproducible(tiny_config: dict, tmp_path: Path) -> None:
    from training.fit import fit

    states = []
    for run in ("a", "b"):
        cfg = {**tiny_config, "logdir": str(tmp_path / run)}
        cfg["trainer"] = {**cfg["trainer"], "max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 1}
        states.append(load_module(fit(cfg)).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_demo_trains_and_exports_into_an_empty_store(tmp_path: Path) -> None:
    """What `make serve` runs on a fresh clone (smaller: 300 images, 1 epoch)."""
    home, work = tmp_path / "store", tmp_path / "demo"
    result = run_cli(
        "demo", "--if-missing", "--workdir", str(work), "--n", "300", "--epochs", "1", BENTOML_HOME=str(home)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training a DEMO model" in result.stdout and "saved model age_gender:" in result.stdout
    (model,) = (home / "models" / MODEL_NAME).glob("*/model.yaml")
    assert "demo: 'true'" in model.read_text()
    again = run_cli("demo", "--if-missing", "--workdir", str(work), BENTOML_HOME=str(home))
    assert again.returncode == 0 and "is in the store; not training" in again.stdout


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "tune_space.yaml")
)
def test_every_shipped_config_builds_its_model(config: str, metadata_file: Path) -> None:
    from training.config import load_config
    from training.module import AgeGenderModule

    cfg = load_config(ROOT / "configs" / config, [f"data.metadata={metadata_file}", "model.pretrained=false"])
    assert AgeGenderModule(**cfg["model"]).net.distribution == (cfg["model"].get("age_head") == "distribution")


def test_cpu_recipe_trains_with_warm_up_then_cosine(metadata_file: Path, tmp_path: Path) -> None:
    """configs/utkface_cpu.yaml end to end on sample data: augmented batches from memory, AdamW, and the
    learning rate rising over the warm-up epoch, then falling along a cosine to zero at the last step."""
    args = ["fit", "--config", "configs/utkface_cpu.yaml", f"data.metadata={metadata_file}", f"logdir={tmp_path}"]
    args += ["trainer.max_epochs=3", "data.batch_size=32", "data.num_workers=0", "trainer.log_every_n_steps=1"]
    args += ["trainer.limit_train_batches=4", "trainer.limit_val_batches=1"]
    result = run_cli(*args, "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (tmp_path / "utkface_cpu").iterdir()
    events = EventAccumulator(str(run)).Reload()
    lr = [e.value for e in events.Scalars("lr-AdamW")]  # one value per epoch, at its start
    peak, steps = 0.002, 4  # per epoch: limit_train_batches
    assert lr[0] == pytest.approx(peak / steps, rel=1e-3), lr  # first of the 4 warm-up steps
    assert lr[1] == pytest.approx(peak, rel=1e-3), lr  # warm-up done after epoch 0
    assert lr[2] == pytest.approx(peak / 2, rel=1e-3), lr  # the cosine halfway through the 8 steps after it
