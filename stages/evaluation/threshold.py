"""The one threshold rule of every decision here: evaluate's metrics and confusion counts, the
figures, predict, `--watch` and the demo all call `flagged`, and every threshold is set by a rule
of this module. No sklearn here: the demo and predict import it without the metrics' dependencies.
"""
from __future__ import annotations

import numpy as np

from stages.core.errors import PipelineError, warn


def flagged(scores, threshold) -> np.ndarray:
    """Anomalous when score >= threshold (sklearn's precision_recall_curve rule, so F1-max's threshold
    means the same); a scalar score gives a numpy bool."""
    return np.asarray(scores, dtype=np.float64) >= threshold


def mean_std_threshold(val_scores, n_std=2.0) -> float:
    """The study's rule: mean + n_std * std of held-out good validation scores."""
    val_scores = np.asarray(val_scores, dtype=np.float64).ravel()
    if val_scores.size == 0:
        raise PipelineError("metrics: no validation scores to set the threshold from")
    if not np.isfinite(val_scores).all():
        raise PipelineError("metrics: validation scores contain NaN or infinite values")
    # Sample std (ddof=1) since the validation set is a sample; one score has no spread.
    if val_scores.size == 1:
        warn("one validation image: the threshold is its score (no spread to add); hold out more good images "
             "(preprocess.val_fraction)")
    std = float(np.std(val_scores, ddof=1)) if val_scores.size > 1 else 0.0
    return float(np.mean(val_scores)) + float(n_std) * std
