"""Calibration, fitted at export on a held-out split and stored in the model's metadata, and the numbers
that say how well it holds: expected calibration error, interval coverage, ROC AUC. numpy only.

- Gender: temperature scaling (Guo et al., 2017): one scalar T dividing the logits, chosen to minimise
  the negative log-likelihood on the split. It changes probabilities, never the predicted class.
- Distribution age head: the same temperature scaling of the age logits against the true year, so that
  the distribution is as wide as the errors are (its intervals then hold about their level).
- Regression age head: the residuals (true - predicted age) at percentiles 1..99, from which
  models/outputs.py reads intervals and P(minor).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.artifact import INTERVAL_LEVEL, Calibration, ModelMeta
from models.outputs import PERCENTILES, decode, softmax

ECE_BINS = 15


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits / temperature)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T in [0.25, 20] minimising the NLL of softmax(logits / T): a log-spaced grid, then a finer one
    around its best point (one parameter; no optimiser needed). The lower bound: on a split the model
    separates perfectly the NLL falls without end as T -> 0; one lucky split must not make every answer
    certain."""
    logits = logits.astype(np.float64)
    grid = np.exp(np.linspace(np.log(0.25), np.log(20), 89))
    best = min(grid, key=lambda t: nll(logits, labels, t))
    fine = np.clip(best * np.exp(np.linspace(-0.06, 0.06, 61)), 0.25, 20)  # the coarse step is 0.05 in log T
    return float(min(fine, key=lambda t: nll(logits, labels, t)))


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per non-empty bin of the top class's probability: the points
    of a reliability diagram. confidence (N,) in [0, 1], correct (N,) bool."""
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    return [
        (float(confidence[which == b].mean()), float(correct[which == b].mean()), int((which == b).sum()))
        for b in range(bins)
        if (which == b).any()
    ]


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - mean confidence| per bin, weighted by the bin's share."""
    return float(sum(n * abs(acc - conf) for conf, acc, n in reliability(confidence, correct, bins)) / len(correct))


def residual_quantiles(predicted: np.ndarray, true: np.ndarray) -> list[float]:
    return [round(float(q), 3) for q in np.quantile(true - predicted, PERCENTILES)]


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney U);
    None when the split has only one class."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks within ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit(meta: ModelMeta, age_out: np.ndarray, logits: np.ndarray, true_age: np.ndarray, gender: np.ndarray):
    """-> the metadata's `calibration` entry (without the split's name), fitted on one held-out split's raw
    network outputs: age output (as the network's forward), gender logits (N, C)."""
    out: dict[str, Any] = {"gender_temperature": round(fit_temperature(logits, gender), 4)}
    if meta.age_head == "distribution":
        out["age_temperature"] = round(fit_temperature(age_out, np.rint(true_age).astype(int)), 4)
    else:
        uncalibrated = meta.model_copy(update={"calibration": Calibration()})
        served = decode(age_out, logits, uncalibrated, INTERVAL_LEVEL)[:, 0]  # clamped, as served
        out["residual_quantiles"] = residual_quantiles(served, true_age)
    return out
