"""`export`: a checkpoint -> model `age_gender` in the BentoML store, self-describing and with metrics.

Here, on the exact weights being stored: the gender temperature (and the distribution head's age
temperature, or the regression head's residual quantiles) are fitted on the first held-out split (val;
test where val was trained on: training/calibration.py), then validation
and test metrics are measured with the served answers (models/outputs.py), so the numbers in the store
always belong to the model next to them. The fp32 graph is quantised to INT8 and its accuracy cost measured
the same way (training/quantize.py). MODEL_CARD.md (training/card.py) is written into the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import bentoml
import torch

from models.artifact import (
    CARD_FILE,
    INT8_FILE,
    INTERVAL_LEVEL,
    MODEL_NAME,
    ONNX_FILE,
    WEIGHTS_FILE,
    Calibration,
    ModelMeta,
)
from models.network import export_onnx
from models.pipeline import Estimator
from models.runtime import TorchRuntime
from training import calibration, card, fingerprint, quantize
from training.atomic import atomic_path, ordinary_permissions
from training.checkpoint import datamodule_for, describe, held_out_splits, load_module, train_split_of
from training.data import UTKFaceDataModule
from training.scoring import build_report, metrics, predict, with_answers


def calibrate_and_measure(net: torch.nn.Module, meta: ModelMeta, datamodule: UTKFaceDataModule) -> dict:
    """Fit the calibration on the first held-out split, then score every held-out split with it. Sets
    meta.calibration and meta.metrics; returns the test split's report (the model card's tables)."""
    held_out = held_out_splits(datamodule)
    estimator = Estimator(TorchRuntime(net), meta)  # the served pipeline; the torch runtime: the weights as trained
    outputs = {s: predict(estimator, datamodule.split(s)) for s in held_out}
    if held_out:  # without held-out data: no temperature (1.0) and no regression intervals
        first = datamodule.split(held_out[0])
        fitted = calibration.fit(meta, *outputs[held_out[0]], first.age.to_numpy(), first.gender.to_numpy())
        meta.calibration = Calibration(split=held_out[0], **fitted)
    frames = {s: with_answers(datamodule.split(s), *outputs[s], meta, INTERVAL_LEVEL) for s in held_out}
    meta.metrics = {s: metrics(frame) for s, frame in frames.items()}
    return build_report(frames["test"], meta.gender_classes) if "test" in frames else {}


def save_model(
    net: torch.nn.Module,
    meta: ModelMeta,
    name: str = MODEL_NAME,
    train_split: Sequence[str] | None = None,
    model_card: str | None = None,
    graphs: Path | None = None,
) -> bentoml.Tag:
    """Weights, their ONNX graphs, the training images' hashes and the model card into the store: all of it
    or nothing. The graphs are copied from folder `graphs` (ONNX_FILE, and INT8_FILE where it holds one),
    else the fp32 graph is exported here.

    `bentoml.models.create` writes into a private temporary folder, then copies it into the store; that copy
    is not atomic, and an interrupt during it (KeyboardInterrupt is no Exception, which is all it cleans up
    after) leaves a half-copied version that breaks `bentoml models list`. So the model is saved into a
    staging store under $BENTOML_HOME/tmp (where BentoML keeps its own temporary folders), given ordinary
    permissions, and renamed into the store in one step. Whatever happens, both temporary folders go.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    labels = {"dataset": meta.dataset.name, "demo": str(meta.demo).lower(), "backbone": meta.backbone}
    store_dir = Path(BentoMLContainer.model_store_dir.get())
    staging_root = Path(BentoMLContainer.tmp_bento_store_dir.get())
    staging_root.mkdir(parents=True, exist_ok=True)
    staging, ref = Path(tempfile.mkdtemp(prefix=f"export-{name}-", dir=staging_root)), None
    try:
        with bentoml.models.create(
            name, labels=labels, metadata=meta.stored(), _model_store=ModelStore(staging)
        ) as ref:
            torch.save(net.state_dict(), ref.path_of(WEIGHTS_FILE))
            if graphs is None:
                export_onnx(net, meta.image_size, ref.path_of(ONNX_FILE))
            else:
                shutil.copyfile(graphs / ONNX_FILE, ref.path_of(ONNX_FILE))  # required
                if (graphs / INT8_FILE).is_file():
                    shutil.copyfile(graphs / INT8_FILE, ref.path_of(INT8_FILE))
            if train_split is not None:
                fingerprint.write(ref.path_of(fingerprint.FILE), train_split)
            if model_card is not None:
                Path(ref.path_of(CARD_FILE)).write_text(model_card)
        staged, target = staging / ref.tag.path(), store_dir / ref.tag.path()
        ordinary_permissions(staged)  # not the 0700 of the temporary folder it was copied from
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # rename would silently replace an empty folder
            raise FileExistsError(f"model {ref.tag} is already in the store")
        os.rename(staged, target)
        with atomic_path(target.parent / "latest") as tmp:
            tmp.write_text(ref.tag.version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if ref is not None:
            shutil.rmtree(ref.path, ignore_errors=True)
    return ref.tag


def export(checkpoint: str | Path, name: str = MODEL_NAME) -> bentoml.Tag:
    module = load_module(checkpoint)
    datamodule = datamodule_for(module)
    metadata = datamodule.hparams.metadata
    train_split = train_split_of(module, datamodule)
    if train_split[1] == "export":
        fingerprint.warn(
            f"{checkpoint} does not record which images it was trained on (written before `fit` recorded "
            f"them); storing split {'+'.join(datamodule.train_splits)} of {metadata} as it is now"
        )
    else:  # metrics on held-out splits of a metadata file re-run since training would include training images
        held_out = datamodule.frame[~datamodule.frame.split.isin(datamodule.train_splits)]
        fingerprint.check_held_out(
            set(train_split[0]),
            held_out.path.tolist(),
            what=f"the held-out splits of {metadata}",
            model=str(checkpoint),
            fix="restore the metadata file the checkpoint was trained with, or train again on this one",
        )
    meta = describe(module, datamodule, Path(checkpoint), train_split)
    test_report = calibrate_and_measure(module.net, meta, datamodule)
    with tempfile.TemporaryDirectory() as graphs:
        held_out = {s: datamodule.split(s) for s in held_out_splits(datamodule)}
        train = datamodule.split(*datamodule.train_splits)
        meta.int8 = quantize.quantize_and_measure(module.net, Path(graphs), meta, train, held_out)
        return save_model(module.net, meta, name, train_split[0], card.render(meta, test_report), Path(graphs))
