"""Decoding-quality metrics: Poisson log-likelihood, bits per spike, Pearson r, R^2, AUROC.

Bits per spike (as in the Neural Latents Benchmark) compares predicted expected counts with a
baseline forecast, usually each unit's mean count per window on the training data:

    bits/spike = (log L(model) - log L(baseline)) / (spikes * ln 2)

0 means no better than the mean; the simulator's true rates give the oracle's figure.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MIN_RATE = 1e-9  # expected counts are floored here so log(0) never occurs


def poisson_log_likelihood(counts: np.ndarray, expected: np.ndarray) -> float:
    """sum(k log(lambda) - lambda - log(k!)) over all entries."""
    expected = np.maximum(np.asarray(expected, dtype=np.float64), MIN_RATE)
    counts = np.asarray(counts, dtype=np.float64)
    log_factorial = torch.lgamma(torch.from_numpy(counts + 1.0)).numpy()
    return float(np.sum(counts * np.log(expected) - expected - log_factorial))


def bits_per_spike(counts: np.ndarray, expected: np.ndarray, baseline: np.ndarray) -> float:
    """Information gained per spike by `expected` over `baseline` (both broadcast to counts)."""
    spikes = float(np.sum(counts))
    if spikes == 0:
        return float("nan")
    baseline = np.broadcast_to(baseline, np.shape(counts))
    gain = poisson_log_likelihood(counts, expected) - poisson_log_likelihood(counts, baseline)
    return gain / (spikes * math.log(2.0))


def pearson_r(predicted: np.ndarray, actual: np.ndarray) -> float:
    predicted, actual = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    if predicted.std() == 0 or actual.std() == 0:
        return 0.0
    return float(np.corrcoef(predicted, actual)[0, 1])


def r_squared(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Coefficient of determination (1 - SSE / SST); variance-weighted over columns if 2-D."""
    predicted, actual = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    residual = np.sum((actual - predicted) ** 2)
    total = np.sum((actual - actual.mean(axis=0)) ** 2)
    return float(1.0 - residual / total) if total > 0 else 0.0


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for boolean `labels` (rank-based Mann-Whitney U).

    The probability that a positive scores above a negative, ties counting one half (tied
    scores share their average rank); 0.5 is chance. NaN when either class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    _, tie_group, tie_sizes = np.unique(scores, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(tie_sizes)  # ranks are 1-based
    ranks = (last_rank - (tie_sizes - 1) / 2.0)[tie_group]
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))
