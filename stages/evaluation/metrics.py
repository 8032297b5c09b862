"""Evaluation metrics: image-level AUROC/F1/threshold, pixel-level AUROC and MVTec's AUPRO."""
from __future__ import annotations

import numpy as np

from stages.core.errors import PipelineError, warn
from stages.evaluation.statistics import ImageStats, PixelStats
from stages.evaluation.threshold import flagged, mean_std_threshold

DEFAULT_BINS = 8192  # params.yaml evaluate.bins


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs once, so sklearn never sees NaNs or non-binary labels."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or len(labels) != len(scores):
        raise PipelineError(
            f"metrics: labels and scores must be 1-D and the same length (got {labels.shape} and {scores.shape})"
        )
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise PipelineError("metrics: labels must be 0 (good) or 1 (anomalous)")
    if not np.isfinite(scores).all():
        raise PipelineError("metrics: scores contain NaN or infinite values")
    return labels.astype(np.int64), scores


def _both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and labels.min() != labels.max()


def image_auroc(labels, scores) -> float | None:
    """AUROC of image scores; None when only one class is present (AUROC is undefined then)."""
    labels, scores = _labels_scores(labels, scores)
    if not _both_classes(labels):
        return None
    from sklearn.metrics import roc_auc_score  # here, not on top: compare, report and the summary chart read

    return float(roc_auc_score(labels, scores))  # only this module's names (sklearn takes 0.5 s to import)


def roc_points(labels, scores) -> list[dict]:
    """ROC curve points for plots/CSV; [] when only one class is present (the curve would be NaN)."""
    labels, scores = _labels_scores(labels, scores)
    if not _both_classes(labels):
        return []
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=True)
    # sklearn's first threshold is inf ("predict nothing"); JSON and CSV cannot hold it,
    # and any value above the top score means the same thing.
    thresholds = np.where(np.isfinite(thresholds), thresholds, scores.max() + 1.0)
    return [
        {"fpr": float(f), "tpr": float(t), "threshold": float(th)}
        for f, t, th in zip(fpr, tpr, thresholds)
    ]


def pixel_auroc(masks, maps, bins: int = DEFAULT_BINS, valid=None) -> float | None:
    """AUROC over every valid pixel of every image (`valid`: None for all, else (N, H, W) bool, False on
    padding); None when there are no defect (or no good) pixels."""
    stats = PixelStats.from_maps(masks, maps, bins, valid)
    return float(stats.auroc()[0]) if stats.defined() else None


def aupro(masks, maps, fpr_limit=0.3, bins: int = DEFAULT_BINS, valid=None) -> float | None:
    """Normalised area under the PRO curve up to fpr_limit (MVTec AD's official definition).

    Regions are 8-connected components of each ground-truth mask; the FPR counts all defect-free
    pixels of all images, good images included; pixels outside `valid` (padding) count nowhere. None
    when there are no defect regions.
    """
    check_fpr_limit(fpr_limit)
    stats = PixelStats.from_maps(masks, maps, bins, valid)
    return _aupro(stats, fpr_limit)


def check_fpr_limit(fpr_limit) -> None:
    if not 0 < fpr_limit <= 1:
        raise PipelineError(f"metrics: fpr_limit must be in (0, 1], got {fpr_limit}")


def _aupro(stats: PixelStats, fpr_limit: float) -> float | None:
    return float(stats.aupro(fpr_limit)[0]) if stats.has_regions() else None


def f1_max(labels, scores) -> dict:
    """Best F1 over the PR curve; the threshold means 'anomalous when score >= threshold' (sklearn's rule).

    All values are None when there are no anomalous images (recall is undefined).
    """
    labels, scores = _labels_scores(labels, scores)
    if not labels.any():
        return {"f1": None, "threshold": None, "precision": None, "recall": None}
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last PR point (precision 1, recall 0) has no threshold; drop it.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return {
        "f1": float(f1[best]),
        "threshold": float(thresholds[best]),
        "precision": float(precision[best]),
        "recall": float(recall[best]),
    }


def threshold_report(labels, scores, threshold) -> dict:
    """Confusion counts and precision/recall/F1 when 'anomalous' means score >= threshold.

    The same rule as f1_max (sklearn's precision_recall_curve), so both thresholds mean the same
    thing. Undefined values are None, never 0: precision when nothing is flagged (tp + fp = 0),
    recall and F1 when the test set has no anomalous images (tp + fn = 0). Otherwise
    F1 = 2tp / (2tp + fp + fn), sklearn's formula (0 when nothing anomalous is found).
    """
    labels, scores = _labels_scores(labels, scores)
    pred = flagged(scores, threshold)
    actual = labels == 1
    tp = int(np.sum(pred & actual))
    fp = int(np.sum(pred & ~actual))
    tn = int(np.sum(~pred & ~actual))
    fn = int(np.sum(~pred & actual))
    return {
        "threshold": float(threshold),
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fn else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def per_defect_auroc(labels, scores, defect_types) -> dict[str, float]:
    """AUROC of the good test images against each defect type's images, keyed by type (sorted).

    Values are None when there are no good images to compare against.
    """
    labels, scores = _labels_scores(labels, scores)
    defect_types = np.asarray(defect_types, dtype=object)
    if defect_types.shape != labels.shape:
        raise PipelineError(
            f"metrics: defect_types must match labels in length (got {len(defect_types)} and {len(labels)})"
        )
    good = labels == 0
    result: dict[str, float] = {}
    for defect in sorted({str(t) for t in defect_types[labels == 1]}):
        subset = good | ((labels == 1) & (defect_types == defect))
        result[defect] = image_auroc(labels[subset], scores[subset])
    return result


def evaluate(labels, scores, defect_types, val_scores, pixels: PixelStats | None = None, fpr_limit=0.3,
             n_std=2.0, threshold: float | None = None) -> dict:
    """All metrics of one fit in one JSON-serialisable dict (plain floats/ints, None where undefined).
    `pixels`: the test set's pixel statistics, when the model gives maps and the category has masks.
    `threshold`: the one evaluate.threshold_rule set (threshold.validation_threshold); None: mean + n_std·σ."""
    checked, _ = _labels_scores(labels, scores)
    check_fpr_limit(fpr_limit)
    if checked.size and not _both_classes(checked):
        has = "defective" if checked[0] == 1 else "good"
        undefined = (
            "image AUROC and per-defect AUROC"
            if has == "defective"
            else "image AUROC, F1-max, threshold recall and F1 (and precision when nothing is flagged)"
        )
        warn(f"the test set has only {has} images: {undefined} are undefined and reported as null")
    best = f1_max(labels, scores)
    threshold = mean_std_threshold(val_scores, n_std) if threshold is None else float(threshold)
    report = threshold_report(labels, scores, threshold)
    result = {
        "image_auroc": image_auroc(labels, scores),
        "image_f1_max": best["f1"],
        "image_f1_max_threshold": best["threshold"],
        "threshold": threshold,
        "threshold_precision": report["precision"],
        "threshold_recall": report["recall"],
        "threshold_f1": report["f1"],
        "tp": report["tp"],
        "fp": report["fp"],
        "tn": report["tn"],
        "fn": report["fn"],
        "per_defect_auroc": per_defect_auroc(labels, scores, defect_types),
    }
    if pixels is not None:
        result["pixel_auroc"] = float(pixels.auroc()[0]) if pixels.defined() else None
        result["aupro"] = _aupro(pixels, fpr_limit)
    return result


# The metrics with bootstrap intervals, and how each is computed on a resample (weights per image).
INTERVAL_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
# how the report, the comparison and the summary chart name a metric
METRIC_TITLES = {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC", "aupro": "AUPRO",
                 "image_f1_max": "Image F1-max"}
HEADLINE_METRICS = ("image_auroc", "pixel_auroc", "aupro")  # the report's tables and the summary chart


def resampled(
    labels, scores, pixels: PixelStats | None, weights: np.ndarray, fpr_limit: float
) -> dict[str, np.ndarray | None]:
    """Each interval metric on every resample (a row of weights); None where the metric is undefined."""
    labels, scores = _labels_scores(labels, scores)
    images = ImageStats.from_scores(labels, scores)
    both = _both_classes(labels)
    return {
        "image_auroc": images.auroc(weights) if both else None,
        "image_f1_max": images.f1_max(weights) if labels.any() else None,
        "pixel_auroc": pixels.auroc(weights) if pixels is not None and pixels.defined() else None,
        "aupro": pixels.aupro(fpr_limit, weights) if pixels is not None and pixels.has_regions() else None,
    }


# The metrics reported as a mean over seeds (with their spread); the others stay per seed.
SEED_METRICS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "threshold_precision",
    "threshold_recall",
    "threshold_f1",
)


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def mean_over_seeds(resampled: list[dict]) -> dict[str, np.ndarray | None]:
    """The seed mean of each metric on every resample (None where a seed has it undefined)."""
    return {
        name: None if any(r[name] is None for r in resampled) else np.mean([r[name] for r in resampled], axis=0)
        for name in resampled[0]
    }


def summarise_seeds(per_seed: dict[int, dict], resampled: dict, confidence: float, resamples: int) -> dict:
    """One model's metrics file: seed means, their spread over seeds, bootstrap intervals, each seed's own."""
    from stages.evaluation.bootstrap import interval

    seeds = list(per_seed)
    results = [per_seed[s] for s in seeds]
    summary: dict = {"seeds": seeds}
    spread = {}
    for name in SEED_METRICS:
        if name not in results[0]:
            continue
        values = [r[name] for r in results]
        summary[name] = _mean(values)
        spread[name] = float(np.std(values, ddof=1)) if len(values) > 1 and None not in values else None
    types = results[0]["per_defect_auroc"]
    summary["per_defect_auroc"] = {t: _mean([r["per_defect_auroc"][t] for r in results]) for t in types}
    summary["seed_std"] = spread
    summary["interval"] = {
        "confidence": confidence,
        "resamples": resamples,
        **{
            name: None if resampled.get(name) is None else list(interval(resampled[name], confidence))
            for name in INTERVAL_METRICS
            if name in summary
        },
    }
    summary["per_seed"] = {str(s): r for s, r in zip(seeds, results)}
    return summary
