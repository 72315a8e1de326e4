"""Each service class called in-process (BentoML makes dependencies local instances; no batching)."""

from __future__ import annotations

import asyncio
import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.photos import ASTRONAUT_FACE_CENTRE, astronaut, box_centre, encode
from models.artifact import array_preprocess_for, stored_meta

from .conftest import SERVER_LIMITS, served_graph


@pytest.fixture(scope="module")
def service(model_tag: str):
    # read when serving.settings is imported; the same small limits as the served process (given back after
    # this module: later tests' servers and training subprocesses inherit the environment)
    saved = dict(os.environ)
    os.environ.update({"AGE_GENDER_MODEL": model_tag, **{k: str(v) for k, v in SERVER_LIMITS.items()}})
    import serving.settings

    importlib.reload(serving.settings)
    import service as module

    yield importlib.reload(module)  # service.py sets OMP_NUM_THREADS for its own processes: given back too
    os.environ.clear()
    os.environ.update(saved)


def test_detector_returns_aligned_crops(service, monkeypatch) -> None:
    out = service.FaceDetection().detect(encode(astronaut()))
    # the detector settings reach the detector: the fixture's environment, then a changed one
    assert service.FaceDetection().finder.detector.max_faces == SERVER_LIMITS["AGE_GENDER_MAX_FACES"]
    from serving.settings import Settings

    monkeypatch.setenv("AGE_GENDER_SMALL_FACES", "false")
    monkeypatch.setattr(service, "SETTINGS", Settings.from_env())
    assert service.FaceDetection().finder.detector.small_faces is False
    assert (out["width"], out["height"]) == (512, 512)
    assert out["crops"].shape == (1, 200, 200, 3) and out["crops"].dtype == np.uint8
    centre = box_centre(dict(zip(("x", "y", "width", "height"), out["boxes"][0], strict=True)))
    assert np.linalg.norm(centre - ASTRONAUT_FACE_CENTRE) < 20


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "empty"),
        (b"plain text", 415, "not an image"),
        (encode(astronaut())[:2000], 400, "corrupt or truncated"),
        (encode(Image.new("RGB", (4000, 4000)), "PNG"), 413, "limit"),
    ],
)
def test_detector_errors(service, data: bytes, status: int, message: str) -> None:
    """A UserError crosses from the detector process as data ({"error", "kind"}), raised again by the API as
    the same kind, which names its status."""
    from models.errors import UserError, raised
    from serving.answers import status_of

    out = service.FaceDetection().detect(data)
    assert message in out["error"]
    with pytest.raises(UserError, match=message) as caught:
        raised(out)
    assert status_of(caught.value) == status


def test_model_service_matches_the_network(service, model_tag: str) -> None:
    import bentoml

    model = service.AgeGenderModel()
    crops = np.random.default_rng(0).integers(0, 256, (5, 200, 200, 3), dtype=np.uint8)
    out = model.predict(crops)  # age, interval low, high, P(minor), P(male), P(female)
    assert out.shape == (5, 6) and np.allclose(out[:, 4:].sum(1), 1, atol=1e-5)
    stored = bentoml.models.get(model_tag)
    meta = stored_meta(stored)
    age_logits, logits = served_graph(stored.path, meta, array_preprocess_for(meta)(crops))
    calibration = meta.calibration
    p_age = (age_logits / calibration.age_temperature).softmax(1)  # (5, 117) over years 0..116
    assert np.allclose(out[:, 0], (p_age @ torch.arange(117.0)).numpy(), atol=1e-3)
    assert np.all((out[:, 1] <= out[:, 0]) & (out[:, 0] <= out[:, 2]))
    assert np.allclose(out[:, 3], p_age[:, :18].sum(1).numpy(), atol=1e-4)
    assert np.allclose(out[:, 4:], (logits / calibration.gender_temperature).softmax(1).numpy(), atol=1e-5)
    assert model.info()["tag"] == model_tag


def test_entry_service_in_process(service, tmp_path: Path) -> None:
    path = tmp_path / "astronaut.jpg"
    astronaut().save(path)
    api = service.AgeGender()
    result = asyncio.run(api.predict(image=path))
    assert len(result.faces) == 1 and result.faces[0].gender in ("male", "female")
    info = asyncio.run(api.model_info())
    assert info.demo is True and info.dataset == "sample"
