"""Training-side safety: interrupted exports leave nothing behind, written files get ordinary permissions,
`evaluate` refuses test images the model trained on, `tune` refuses to resume a changed study."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import bentoml
import optuna
import pandas as pd
import pytest
import torch
import yaml

from models.errors import UserError
from training import fingerprint
from training.atomic import atomic_dir, atomic_path

from .conftest import assert_one_line_error, older_release, run_cli

SPACE = {"model.lr": {"low": 1.0e-3, "high": 3.0e-3, "log": True}, "model.head_width": {"choices": [32, 64]}}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def quick_checkpoint(tiny_config: dict, tmp_path_factory) -> Path:
    """A checkpoint of a few training steps: these tests are about bookkeeping, not about what is learnt."""
    from training.fit import fit

    cfg = {**tiny_config, "logdir": str(tmp_path_factory.mktemp("safety_runs"))}
    cfg["trainer"] = {**cfg["trainer"], "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1}
    return fit(cfg)


@pytest.fixture(scope="module")
def safety_model(quick_checkpoint: Path) -> str:
    """Exported under its own name, so the session model and its `latest` stay as the other tests expect."""
    from training.export import export

    return str(export(quick_checkpoint, "safety_model"))


@pytest.fixture(scope="module")
def resplit_metadata(sample_dir: Path, tmp_path_factory) -> Path:
    """The same images, `metadata` re-run with another seed: its test split holds training images."""
    from training.utkface import build_metadata

    out = tmp_path_factory.mktemp("resplit") / "metadata.csv"
    build_metadata(sample_dir, out, seed=7)
    return out


def _store_snapshot(home: Path, name: str) -> dict[str, set]:
    models = home / "models"
    return {
        "store": {str(p.relative_to(models)) for p in models.rglob("*")} if models.exists() else set(),
        "home_tmp": set(os.listdir(home / "tmp")) if (home / "tmp").exists() else set(),
        # BentoML's own temporary folder (other processes on this machine may be exporting other names)
        "system_tmp": {p for p in os.listdir(tempfile.gettempdir()) if p.startswith(f"bentoml-model-{name}-")},
    }


# 1. an interrupted export leaves no partial model, nor temporary folders


@pytest.mark.parametrize("stage", ["writing the ONNX graph", "copying into the store"])
def test_interrupted_export_leaves_nothing(stage: str, bentoml_home: Path, monkeypatch) -> None:
    from models.artifact import Dataset, architecture
    from models.network import AgeGenderNet
    from training import export

    net = AgeGenderNet("resnet18", 16, 0.0, pretrained=False)
    meta = architecture("resnet18", 16, 0.0, 32, demo=True, dataset=Dataset(name="sample"))
    if stage == "writing the ONNX graph":

        def interrupted_onnx(net, image_size, path):
            Path(path).write_bytes(b"half an ONNX graph")
            raise KeyboardInterrupt

        monkeypatch.setattr(export, "export_onnx", interrupted_onnx)
    else:  # Ctrl-C after the first file of the model folder was copied
        copytree = shutil.copytree

        def interrupted_copytree(src, dst, *args, **kwargs):
            copied = []

            def copy(s, d, **kw):
                if copied:
                    raise KeyboardInterrupt
                copied.append(s)
                return shutil.copy2(s, d, **kw)

            return copytree(src, dst, *args, **{**kwargs, "copy_function": copy})

        monkeypatch.setattr(shutil, "copytree", interrupted_copytree)
    before = _store_snapshot(bentoml_home, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        export.save_model(net, meta, "interrupted")
    assert _store_snapshot(bentoml_home, "interrupted") == before
    with pytest.raises(bentoml.exceptions.NotFound):
        bentoml.models.list("interrupted")
    bentoml.models.list()  # the store still lists


# 2. ordinary permissions


def test_atomic_writes_get_ordinary_permissions(tmp_path: Path, umask_022) -> None:
    with atomic_path(tmp_path / "new.csv") as tmp:
        tmp.write_text("a\n")
    assert mode(tmp_path / "new.csv") == 0o644
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "x.txt").write_text("x")
    assert mode(tmp_path / "folder") == 0o755 and mode(tmp_path / "folder" / "x.txt") == 0o644
    os.umask(0o027)
    with atomic_path(tmp_path / "private.yaml") as tmp:
        tmp.write_text("a: 1\n")
    assert mode(tmp_path / "private.yaml") == 0o640
    (tmp_path / "kept.csv").write_text("old")
    os.chmod(tmp_path / "kept.csv", 0o664)
    with atomic_path(tmp_path / "kept.csv") as tmp:  # replacing a file keeps its mode, as open("w") does
        tmp.write_text("new")
    assert mode(tmp_path / "kept.csv") == 0o664


def test_synth_metadata_and_store_get_ordinary_permissions(tmp_path: Path, safety_model: str, umask_022) -> None:
    from training.synth import write_sample_dataset
    from training.utkface import build_metadata

    data = write_sample_dataset(tmp_path / "images", n=4, seed=0)
    build_metadata(data, tmp_path / "meta.csv", balance=False)
    assert mode(data) == 0o755 and {mode(p) for p in data.iterdir()} == {0o644}
    assert mode(tmp_path / "meta.csv") == 0o644
    folder = Path(bentoml.models.get(safety_model).path)
    assert mode(folder) == 0o755 and {mode(p) for p in folder.iterdir()} == {0o644}


# 3. the training split's fingerprint, and evaluate's refusal of test images the model trained on


def test_export_records_the_training_split(quick_checkpoint: Path, safety_model: str, metadata_file: Path) -> None:
    from training.checkpoint import load_module
    from training.utkface import read_metadata

    frame = read_metadata(metadata_file)
    expected = fingerprint.image_hashes(frame[frame.split == "train"].path)
    assert load_module(quick_checkpoint).train_split == expected  # recorded by fit, in the checkpoint
    model = bentoml.models.get(safety_model)
    recorded = model.info.metadata["dataset"]["train_split"]
    assert recorded["n_images"] == len(expected) == (frame.split == "train").sum()
    assert recorded["recorded_by"] == "fit" and recorded["sha256"] == fingerprint.digest(expected)
    assert fingerprint.read(Path(model.path) / fingerprint.FILE, recorded) == set(expected)


def test_evaluate_refuses_test_images_the_model_trained_on(
    safety_model: str, metadata_file: Path, resplit_metadata: Path, tmp_path: Path
) -> None:
    result = run_cli("evaluate", "--model", safety_model, "--metadata", str(resplit_metadata), "--out", str(tmp_path))
    error = assert_one_line_error(result)
    assert "were used to train" in error and str(metadata_file.resolve()) in error
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_metadata_file_resplit_since_training(
    quick_checkpoint: Path, resplit_metadata: Path, tmp_path: Path
) -> None:
    from training.export import export

    ckpt = torch.load(quick_checkpoint, map_location="cpu", weights_only=False)
    ckpt["training_config"]["data"]["metadata"] = str(resplit_metadata)  # as if re-run in place
    torch.save(ckpt, tmp_path / "moved.ckpt")
    with pytest.raises(UserError, match="held-out splits of .* were used to train"):
        export(tmp_path / "moved.ckpt", "never_saved")


def test_models_without_a_recorded_split_still_evaluate(
    safety_model: str, metadata_file: Path, tmp_path: Path, capsys, umask_022
) -> None:
    from models.artifact import stored_meta
    from models.network import load_network
    from training.evaluate import evaluate
    from training.export import save_model

    model = bentoml.models.get(safety_model)
    meta = dict(model.info.metadata)
    meta["dataset"] = {k: v for k, v in meta["dataset"].items() if k != "train_split"}  # as exported before
    old = str(save_model(load_network(model.path, stored_meta(model)), older_release(meta), "safety_old_model"))
    capsys.readouterr()
    report = evaluate(old, metadata_file, tmp_path / "report", batch_size=128)
    assert report["overall"]["n"] > 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "does not record the images it was trained on" in warnings[0]
    written = list((tmp_path / "report").iterdir())  # report, predictions and plots: ordinary permissions
    assert len(written) >= 5 and {mode(p) for p in written} == {0o644}


# 4. tune refuses to resume a study whose base config or search space changed


def test_tune_refuses_a_changed_study(tiny_config: dict, tmp_path: Path) -> None:
    from training.config import load_config
    from training.tune import tune

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    base = load_config(tmp_path / "base.yaml", [f"logdir={tmp_path}"])
    with pytest.raises(UserError, match="no complete trial"):  # creates the study, runs no trial
        tune(base, SPACE, "s", storage, 0, 1, tmp_path / "best.yaml")

    args = ["tune", "--config", str(tmp_path / "base.yaml"), "--space", str(tmp_path / "space.yaml"), "--study", "s"]
    args += ["--storage", storage, "--logdir", str(tmp_path), "--n-trials", "0", "trainer.max_epochs=9"]
    error = assert_one_line_error(run_cli(*args))
    assert "another base config (changed: trainer.max_epochs)" in error and "--study s_2" in error
    assert not optuna.load_study(study_name="s", storage=storage).trials

    from training.tune import check_identity, open_study

    # resuming unchanged, or on other hardware, or with another logdir, is fine
    check_identity(open_study("s", storage), load_config(tmp_path / "base.yaml", ["trainer.devices=2"]), SPACE)
    with pytest.raises(UserError, match=r"another search space \(changed: model\.head_width\)"):
        check_identity(open_study("s", storage), base, {**SPACE, "model.head_width": {"choices": [64, 128]}})
    moved = pd.read_csv(tiny_config["data"]["metadata"]).sample(frac=1, random_state=0)  # other content
    moved.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(UserError, match=r"another base config \(changed: data\.metadata\)"):
        check_identity(
            open_study("s", storage), {**base, "data": {**base["data"], "metadata": tmp_path / "other.csv"}}, SPACE
        )
