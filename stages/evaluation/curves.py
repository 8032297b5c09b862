"""Curve points for `dvc plots`, written by evaluate@<category>-<model> next to roc.csv and scores.csv.

- pr.csv: image-level precision-recall;
- pixel_roc.csv and pro.csv: pixel-level ROC and MVTec's PRO curve from the pixel statistics the
  metrics use (stages/evaluation/statistics.py), thinned to at most `figures.curve_points` vertices;
- confusion.csv: one row per test image, actual vs predicted at the validation threshold, for
  DVC's `confusion` template.

They are written in evaluate because that stage already holds every test anomaly map in memory:
writing them elsewhere would mean scoring the whole test set twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve

from stages.core.outputs import write_csv
from stages.evaluation.statistics import PixelStats
from stages.evaluation.threshold import flagged


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ~max_points vertices of a monotone curve, spread evenly along x and along y.

    Keeps real vertices (no interpolation), always the first and the last, so the curve's ends and
    its shape at both steep and flat parts survive.
    """
    n = len(x)
    if n <= max_points:
        return np.arange(n)
    half = max(2, max_points // 2)
    keep = {0, n - 1}
    for values in (np.asarray(x, np.float64), np.asarray(y, np.float64)):
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            continue
        order = np.argsort(values, kind="stable")
        targets = np.linspace(lo, hi, half)
        positions = np.searchsorted(values[order], targets).clip(0, n - 1)
        keep.update(order[positions].tolist())
    return np.array(sorted(keep)[: max_points + 2])


def pr_rows(labels, scores) -> list[dict]:
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if labels.size == 0 or labels.min() == labels.max():
        return [{"recall": 0.0, "precision": 0.0, "threshold": 0.0}]
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    thresholds = np.append(thresholds, scores.max() + 1.0)  # the last point (recall 0) has none
    return [
        {"recall": float(r), "precision": float(p), "threshold": float(t)}
        for r, p, t in zip(recall[::-1], precision[::-1], thresholds[::-1])
    ]


def pixel_roc_rows(pixels: PixelStats, max_points: int) -> list[dict]:
    """Pixel ROC from the same statistics as pixel AUROC (thresholds at the bin edges)."""
    if not pixels.defined():
        return [{"fpr": 0.0, "tpr": 0.0}]
    fpr, tpr = pixels.roc_curve()
    keep = thin_curve(fpr, tpr, max_points)
    return [{"fpr": float(fpr[i]), "tpr": float(tpr[i])} for i in keep]


def pro_rows(pixels: PixelStats, max_points: int) -> list[dict]:
    """The PRO curve AUPRO integrates (the same statistics, the same thresholds)."""
    if not pixels.has_regions():
        return [{"fpr": 0.0, "pro": 0.0}]
    _, fpr, pro = next(pixels.pro_curves())
    fpr, pro = fpr[0], pro[0]
    keep = thin_curve(fpr, pro, max_points)
    return [{"fpr": float(fpr[i]), "pro": float(pro[i])} for i in keep]


def confusion_rows(names, labels, scores, threshold: float) -> list[dict]:
    """Actual vs predicted at the threshold, by the one threshold rule (threshold.flagged: score >= threshold)."""
    word = {0: "good", 1: "anomalous"}
    predicted = flagged(scores, threshold)
    return [
        {"image": n, "actual": word[int(label)], "predicted": word[int(p)]}
        for n, label, p in zip(names, labels, predicted)
    ]


def write_curves(plot_dir: Path, test, scores, pixels: PixelStats | None, threshold: float, max_points: int) -> None:
    """Write pr.csv, confusion.csv and, when there are pixel statistics (a model with maps on a
    category with masks), pixel_roc.csv and pro.csv (placeholders of one point otherwise, since DVC
    needs every declared output)."""
    plot_dir = Path(plot_dir)
    write_csv(plot_dir / "pr.csv", pr_rows(test.labels, scores))
    write_csv(plot_dir / "confusion.csv", confusion_rows(test.names, test.labels, scores, threshold))
    if pixels is not None:
        pixel_roc, pro = pixel_roc_rows(pixels, max_points), pro_rows(pixels, max_points)
    else:
        pixel_roc, pro = [{"fpr": 0.0, "tpr": 0.0}], [{"fpr": 0.0, "pro": 0.0}]
    write_csv(plot_dir / "pixel_roc.csv", pixel_roc)
    write_csv(plot_dir / "pro.csv", pro)
