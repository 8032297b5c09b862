"""Stratified bootstrap of a test set: resample weights, percentile intervals, paired differences.

Good and defective test images are resampled separately (each resample keeps both counts, so
AUROC is always defined; on a synthetic ladder each level's defective images apart too); a
resample is a weight per image, the number of times it was drawn
(stages/evaluation/statistics.py turns weights into metrics). The weights depend only on the category, the
test labels and `evaluate.bootstrap.seed`, never on the model: every model of a category is
scored on the same resamples, which makes differences between models paired (a model compared
with itself differs by exactly 0 on every resample), and categories get independent resamples.
"""
from __future__ import annotations

import zlib

import numpy as np


def stratified_weights(labels, resamples: int, seed: int, category: str, strata=None) -> np.ndarray:
    """(resamples, N) counts: each row draws n_good good and n_defective defective images with replacement.

    `strata` (N,) integers, when given, replace the labels as the groups resampled apart: the
    difficulty levels of a synthetic ladder (0 good, 1..L), so every resample keeps each level's
    count and per-level metrics are defined on every resample. Without strata the draws are those of
    the two labels, as they always were.
    """
    labels = np.asarray(labels)
    groups = labels if strata is None else np.asarray(strata)
    rng = np.random.default_rng([int(seed), zlib.crc32(category.encode())])
    weights = np.zeros((resamples, len(labels)))
    for group in (0, 1) if strata is None else np.unique(groups):
        members = np.flatnonzero(groups == group)
        if len(members) == 0:
            continue
        draws = rng.integers(0, len(members), size=(resamples, len(members)))
        rows = np.repeat(np.arange(resamples), len(members))
        np.add.at(weights, (rows, members[draws.ravel()]), 1.0)
    return weights


def interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap values (linear interpolation between order statistics)."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values, dtype=np.float64), [tail, 1.0 - tail])
    return float(low), float(high)


def summarise(point: float, values: np.ndarray, confidence: float) -> dict:
    """A point estimate with its interval: {'value', 'low', 'high'}."""
    low, high = interval(values, confidence)
    return {"value": float(point), "low": low, "high": high}
