"""Network outputs -> what users read: age, its central interval, P(minor), gender and its probability.

The one place where a runtime's raw outputs become answers; the service, `evaluate` and `export` call it.
numpy only (the serving processes have no torch). Everything it needs is in the model's metadata:
- age head "distribution": the answer is the expected age of the softmax over years 0..116 (its logits
  divided by the age temperature fitted at export); the interval and P(age < 18) are read off the same
  distribution.
- age head "regression": the answer is the number, clamped to the age range; interval and P(minor) come
  from the residuals (true - predicted age) measured on a held-out split at export, stored as their
  percentiles 1..99. Models exported before that have neither: both are None.
- gender: softmax of the logits divided by the temperature fitted at export (1.0 when none was).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.artifact import MINOR_AGE, ModelMeta

PERCENTILES = np.arange(1, 100) / 100  # where a regression model's residual quantiles are stored
COLUMNS = ("age", "age_low", "age_high", "minor_probability")  # then one probability per gender class


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def check_level(level: float) -> float:
    # a regression model's residuals are stored at percentiles 1..99: a central interval up to 98 %
    if not 0.5 <= level <= 0.98:
        raise ValueError(f"interval level must be between 0.5 and 0.98, got {level}")
    return level


def _age_from_distribution(logits: np.ndarray, meta: ModelMeta, level: float) -> tuple[np.ndarray, ...]:
    p = softmax(logits.astype(np.float64) / meta.calibration.age_temperature)  # (B, K) over years 0..K-1
    cdf = np.cumsum(p, 1)
    age = p @ np.arange(p.shape[1])
    # each year's mass spread evenly over [year - 0.5, year + 0.5]: the interval's ends are read off the
    # piecewise-linear CDF, so its coverage is its level, not more (whole-year ends would add up to a
    # boundary year's mass on each side)
    edges = np.arange(p.shape[1] + 1) - 0.5
    tails = ((1 - level) / 2, (1 + level) / 2)
    low, high = np.array([np.interp(tails, np.concatenate([[0.0], c]), edges) for c in cdf]).reshape(-1, 2).T
    return age, low, high, cdf[:, MINOR_AGE - 1]  # P(age <= 17)


def _age_from_regression(age: np.ndarray, meta: ModelMeta, level: float) -> tuple[np.ndarray, ...]:
    quantiles = meta.calibration.residual_quantiles
    if quantiles is None:  # exported before residuals were measured
        nan = np.full(len(age), np.nan)
        return age, nan, nan, nan
    q = np.asarray(quantiles, np.float64)
    low = age + np.interp((1 - level) / 2, PERCENTILES, q)
    high = age + np.interp((1 + level) / 2, PERCENTILES, q)
    # P(true < 18) = P(residual < 17.5 - age): ages are whole years, so half a year is the boundary
    minor = np.interp(MINOR_AGE - 0.5 - age, q, PERCENTILES, left=0.0, right=1.0)
    return age, low, high, minor


def decode(age_out: np.ndarray, gender_logits: np.ndarray, meta: ModelMeta, level: float) -> np.ndarray:
    """Runtime outputs for B faces -> (B, 4 + C) float32 in COLUMNS order, then P(class) for the model's
    gender classes. Unknown values (an old regression model's interval and P(minor)) are NaN."""
    lo, hi = meta.age_range
    if meta.age_head == "distribution":
        age, low, high, minor = _age_from_distribution(age_out, meta, level)
    else:
        age, low, high, minor = _age_from_regression(np.clip(age_out.astype(np.float64), lo, hi), meta, level)
    gender = softmax(gender_logits.astype(np.float64) / meta.calibration.gender_temperature)  # (B, C)
    columns = [np.clip(age, lo, hi), np.clip(low, lo, hi), np.clip(high, lo, hi), minor]
    return np.concatenate([np.stack(columns, 1), gender], 1).astype(np.float32)


def answers(rows: np.ndarray, classes: list[str], level: float) -> list[dict[str, Any]]:
    """decode's rows -> one JSON-ready answer per face, as the REST API returns them."""
    out = []
    for age, low, high, minor, *probs in rows.tolist():
        k = int(np.argmax(probs))
        out.append(
            {
                "age": round(age, 2),
                "age_interval": None
                if np.isnan(low)
                else {"low": round(low, 1), "high": round(high, 1), "level": level},
                "minor_probability": None if np.isnan(minor) else round(minor, 4),
                "gender": classes[k],
                "gender_probability": round(probs[k], 4),
            }
        )
    return out
