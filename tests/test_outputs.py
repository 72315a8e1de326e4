"""models/outputs.py (raw outputs -> answers) and training/calibration.py on numbers whose answers are known."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from models.artifact import SCHEMA_VERSION, Calibration, ModelMeta, architecture
from models.errors import UserError
from models.outputs import answers, decode
from tests.conftest import ROOT
from training import calibration

CLASSES = ["male", "female"]
LOGITS = np.array([[2.0, 0.0], [0.0, 1.0]])


def test_distribution_decoding() -> None:
    meta = architecture("resnet18", 16, 0.0, 32, "distribution")
    peaked = np.full((1, 117), -50.0)
    peaked[0, 30] = 0.0  # all mass on year 30
    uniform = np.zeros((1, 117))
    rows = decode(np.concatenate([peaked, uniform]), LOGITS, meta, 0.8)
    age, low, high, minor = rows[:, :4].T
    assert age[0] == pytest.approx(30) and low[0] == pytest.approx(29.6, abs=0.01) and high[0] == pytest.approx(30.4)
    assert minor[0] == pytest.approx(0, abs=1e-6)
    # uniform over years 0..116, each year spread over [y - 0.5, y + 0.5]: the 10 % and 90 % points
    assert age[1] == pytest.approx(58) and low[1] == pytest.approx(11.2, abs=0.01) and high[1] == pytest.approx(104.8)
    assert minor[1] == pytest.approx(18 / 117)
    assert np.allclose(
        rows[:, 4:], [[np.exp(2) / (1 + np.exp(2)), 1 / (1 + np.exp(2))], [1 / (1 + np.e), np.e / (1 + np.e)]]
    )


def test_age_temperature_widens_the_interval() -> None:
    logits = -0.5 * ((np.arange(117) - 40) / 3.0) ** 2  # a Gaussian of 3 years around 40
    meta = architecture("resnet18", 16, 0.0, 32, "distribution")
    narrow = decode(logits[None], LOGITS[:1], meta, 0.8)[0]
    hot = meta.model_copy(update={"calibration": Calibration(age_temperature=4.0)})
    wide = decode(logits[None], LOGITS[:1], hot, 0.8)[0]
    assert narrow[0] == pytest.approx(40, abs=0.01) and wide[0] == pytest.approx(40, abs=0.01)
    assert narrow[2] - narrow[1] == pytest.approx(2 * 1.2816 * 3, abs=0.2)  # 80 % of a normal: +-1.28 sd
    assert wide[2] - wide[1] == pytest.approx(2 * (narrow[2] - narrow[1]), rel=0.05)  # T = 4: sd x 2


def test_regression_decoding_with_and_without_residuals() -> None:
    residuals = np.random.default_rng(0).normal(0, 5, 10_000)  # true - predicted, sd 5
    quantiles = calibration.residual_quantiles(np.zeros_like(residuals), residuals)
    meta = architecture("resnet18", 16, 0.0, 32, "regression", calibration=Calibration(residual_quantiles=quantiles))
    rows = decode(np.array([-3.0, 17.5, 60.0]), np.zeros((3, 2)), meta, 0.8)
    assert rows[0, 0] == 0  # clamped to the age range
    assert rows[1, 2] - rows[1, 1] == pytest.approx(2 * 1.2816 * 5, rel=0.05)
    assert rows[1, 3] == pytest.approx(0.5, abs=0.03) and rows[0, 3] > 0.99 and rows[2, 3] < 0.01
    old = decode(np.array([30.0]), np.zeros((1, 2)), architecture("resnet18", 16, 0.0, 32), 0.8)  # no residuals
    (answer,) = answers(old, CLASSES, 0.8)
    assert answer["age"] == 30 and answer["age_interval"] is None and answer["minor_probability"] is None


def test_answers_shape() -> None:
    rows = np.array([[31.234, 25.04, 38.96, 0.01234, 0.2, 0.8]], np.float32)
    (answer,) = answers(rows, CLASSES, 0.8)
    assert answer == {
        "age": 31.23,
        "age_interval": {"low": 25.0, "high": 39.0, "level": 0.8},
        "minor_probability": 0.0123,
        "gender": "female",
        "gender_probability": 0.8,
    }


def test_roc_auc_is_the_share_of_correctly_ordered_pairs() -> None:
    rng = np.random.default_rng(1)
    scores, positive = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4  # many ties
    pairs = [
        1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
        for i, j in itertools.product(np.flatnonzero(positive), np.flatnonzero(~positive))
    ]
    assert calibration.roc_auc(scores, positive) == pytest.approx(np.mean(pairs))
    assert calibration.roc_auc(scores, np.zeros(60, bool)) is None


def test_ece_and_temperature_on_known_miscalibration() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, (20_000, 1)) * np.array([[1.0, -1.0]])  # true logits of two classes
    labels = (rng.random(len(z)) < calibration.softmax(z)[:, 1]).astype(int)  # drawn from softmax(z)
    overconfident = 3 * z
    assert calibration.fit_temperature(overconfident, labels) == pytest.approx(3, rel=0.08)
    probs, probs3 = calibration.softmax(z), calibration.softmax(overconfident)
    assert calibration.ece(probs.max(1), probs.argmax(1) == labels) < 0.02
    assert calibration.ece(probs3.max(1), probs3.argmax(1) == labels) > 0.08


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"AGE_GENDER_SMALL_FACES": "false"}, "small_faces", False),
        ({"AGE_GENDER_SMALL_FACES": "On"}, "small_faces", True),
        ({"AGE_GENDER_INTERVAL_LEVEL": "0.9"}, "interval_level", 0.9),
        ({"AGE_GENDER_SMALL_FACES": ""}, "small_faces", True),  # set but empty: the default
        ({"AGE_GENDER_MAX_IMAGES": ""}, "max_images", 32),
        ({"AGE_GENDER_DEBUG": "Yes"}, "debug", True),
    ],
)
def test_settings_from_the_environment(monkeypatch, env: dict, field: str, value) -> None:
    from serving.settings import Settings

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert getattr(Settings.from_env(), field) == value


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AGE_GENDER_SMALL_FACES": "maybe"}, "not a valid bool"),
        ({"AGE_GENDER_DEBUG": "maybe"}, "AGE_GENDER_DEBUG='maybe' is not a valid bool"),
        ({"AGE_GENDER_SMALL_FACES": " "}, "AGE_GENDER_SMALL_FACES=' ' is not a valid bool"),  # not empty: checked
        ({"AGE_GENDER_INTERVAL_LEVEL": "0.99"}, "0.5 and 0.98"),
        ({"AGE_GENDER_MAX_BATCH_SIZE": "0"}, "AGE_GENDER_MAX_BATCH_SIZE must be at least 1, not 0"),
        ({"AGE_GENDER_DETECTOR_WORKERS": "-2"}, "AGE_GENDER_DETECTOR_WORKERS must be at least 0, not -2"),
        ({"AGE_GENDER_IDLE_TIMEOUT": "0"}, "AGE_GENDER_IDLE_TIMEOUT must be more than 0 seconds"),
        ({"AGE_GENDER_UPLOAD_TIMEOUT": "nan"}, "AGE_GENDER_UPLOAD_TIMEOUT must be more than 0 seconds, not nan"),
        ({"AGE_GENDER_MIN_UPLOAD_RATE": "nan"}, "AGE_GENDER_MIN_UPLOAD_RATE must be at least 0, not nan"),
        ({"AGE_GENDER_SCORE_THRESHOLD": "2"}, "AGE_GENDER_SCORE_THRESHOLD must be 0-1, not 2.0"),
        ({"AGE_GENDER_MIN_FACE_SIZE": "0"}, "AGE_GENDER_MIN_FACE_SIZE must be at least 1, not 0"),
        ({"AGE_GENDER_DETECTOR": "retina"}, "AGE_GENDER_DETECTOR: unknown detector 'retina'"),
        ({"AGE_GENDER_RUNTIME": "gpu"}, "AGE_GENDER_RUNTIME: unknown runtime 'gpu'; choose from auto, onnx"),
        ({"AGE_GENDER_CORS_ORIGINS": "notaurl"}, "AGE_GENDER_CORS_ORIGINS: 'notaurl' is not an origin"),
        ({"AGE_GENDER_MODEL": "!!bad"}, "AGE_GENDER_MODEL: '!!bad' is not a BentoML tag: a name, or name:version"),
        ({"AGE_GENDER_MODEL": "a:b:c"}, "AGE_GENDER_MODEL: 'a:b:c' is not a BentoML tag"),
        ({"AGE_GENDER_API_KEY": "secret\n"}, "AGE_GENDER_API_KEY starts or ends with whitespace"),
        ({"AGE_GENDER_API_KEY": "  "}, "AGE_GENDER_API_KEY starts or ends with whitespace"),
    ],
)
def test_bad_settings_name_the_variable(monkeypatch, env: dict, message: str) -> None:
    from models.errors import UserError
    from serving.settings import Settings

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=message):
        Settings.from_env()


def test_a_bad_setting_stops_the_service_in_one_line() -> None:
    env = {**os.environ, "AGE_GENDER_MAX_IMAGES": "abc"}
    env.pop("AGE_GENDER_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-c", "import serving.settings"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stderr == "error: AGE_GENDER_MAX_IMAGES='abc' is not a valid int\n", r.stderr


def test_model_metadata_round_trips_and_migrates() -> None:
    meta = architecture("resnet18", 16, 0.0, 32, "distribution", calibration=Calibration(split="val"))
    assert ModelMeta.load(meta.stored()) == meta
    assert None not in meta.stored().values()  # BentoML's metadata allows no None
    v1 = {k: v for k, v in meta.stored().items() if k not in ("schema_version", "age_head", "calibration")}
    old = ModelMeta.load(v1)  # stored before the schema version and the distribution head
    assert old.schema_version == SCHEMA_VERSION and old.age_head == "regression"
    assert old.calibration == Calibration() and old.int8 is None
    with pytest.raises(UserError, match="schema 3, newer than this release reads; upgrade"):
        ModelMeta.load({**meta.stored(), "schema_version": 3})
    with pytest.raises(UserError, match="metadata is not readable: age_head: "):
        ModelMeta.load({**meta.stored(), "age_head": "ordinal"})
