"""Curve points for `dvc plots`, written by evaluate@<category>-<model> next to roc.csv and scores.csv.

- pr.csv: image-level precision-recall;
- pixel_roc.csv and pro.csv: pixel-level ROC and MVTec's PRO curve, thinned to at most
  `figures.curve_points` vertices (a category has 10^7-10^8 pixels; DVC and the browser need far fewer);
- confusion.csv: one row per test image, actual vs predicted at the validation threshold, for
  DVC's `confusion` template.

They are written in evaluate because that stage already holds every test anomaly map in memory:
writing them elsewhere would mean scoring the whole test set twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from stages import metrics
from stages.outputs import write_csv


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


def pixel_roc_rows(masks: np.ndarray, maps: np.ndarray, max_points: int) -> list[dict]:
    flat_masks = np.asarray(masks, bool).ravel()
    if not flat_masks.any() or flat_masks.all():
        return [{"fpr": 0.0, "tpr": 0.0}]
    fpr, tpr, _ = roc_curve(flat_masks, np.asarray(maps, np.float32).ravel(), drop_intermediate=True)
    keep = thin_curve(fpr, tpr, max_points)
    return [{"fpr": float(fpr[i]), "tpr": float(tpr[i])} for i in keep]


def pro_rows(masks: np.ndarray, maps: np.ndarray, max_points: int) -> list[dict]:
    curve = metrics.pro_curve(masks, maps)
    if curve is None:
        return [{"fpr": 0.0, "pro": 0.0}]
    fpr, pro = curve
    keep = thin_curve(fpr, pro, max_points)
    return [{"fpr": float(fpr[i]), "pro": float(pro[i])} for i in keep]


def confusion_rows(names, labels, scores, threshold: float) -> list[dict]:
    """'anomalous' means score > threshold, as in metrics.threshold_report."""
    word = {0: "good", 1: "anomalous"}
    return [
        {"image": n, "actual": word[int(l)], "predicted": word[int(float(s) > threshold)]}
        for n, l, s in zip(names, labels, scores)
    ]


def write_curves(plot_dir: Path, test, prediction, threshold: float, max_points: int, with_maps: bool) -> None:
    """Write pr.csv, confusion.csv and, when the model gives maps and the category has masks,
    pixel_roc.csv and pro.csv (placeholders of one point otherwise, since DVC needs every declared output)."""
    plot_dir = Path(plot_dir)
    write_csv(plot_dir / "pr.csv", pr_rows(test.labels, prediction.image_scores))
    write_csv(
        plot_dir / "confusion.csv", confusion_rows(test.names, test.labels, prediction.image_scores, threshold)
    )
    if with_maps:
        pixel_roc = pixel_roc_rows(test.masks, prediction.anomaly_maps, max_points)
        pro = pro_rows(test.masks, prediction.anomaly_maps, max_points)
    else:
        pixel_roc, pro = [{"fpr": 0.0, "tpr": 0.0}], [{"fpr": 0.0, "pro": 0.0}]
    write_csv(plot_dir / "pixel_roc.csv", pixel_roc)
    write_csv(plot_dir / "pro.csv", pro)
