"""Evaluation metrics: image-level AUROC/F1/threshold, pixel-level AUROC and MVTec's AUPRO."""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from stages.errors import PipelineError, warn

# 8-connectivity, as in MVTec's official evaluation: diagonal neighbours join one region.
_STRUCTURE = np.ones((3, 3), dtype=int)


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


def _masks_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise PipelineError(
            f"metrics: masks and maps must both be (N, H, W) and the same shape (got {masks.shape} and {maps.shape})"
        )
    if not np.isfinite(maps).all():
        raise PipelineError("metrics: anomaly maps contain NaN or infinite values")
    return masks, maps


def _both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and labels.min() != labels.max()


def image_auroc(labels, scores) -> float | None:
    """AUROC of image scores; None when only one class is present (AUROC is undefined then)."""
    labels, scores = _labels_scores(labels, scores)
    if not _both_classes(labels):
        return None
    return float(roc_auc_score(labels, scores))


def roc_points(labels, scores) -> list[dict]:
    """ROC curve points for plots/CSV; [] when only one class is present (the curve would be NaN)."""
    labels, scores = _labels_scores(labels, scores)
    if not _both_classes(labels):
        return []
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=True)
    # sklearn's first threshold is inf ("predict nothing"); JSON and CSV cannot hold it,
    # and any value above the top score means the same thing.
    thresholds = np.where(np.isfinite(thresholds), thresholds, scores.max() + 1.0)
    return [
        {"fpr": float(f), "tpr": float(t), "threshold": float(th)}
        for f, t, th in zip(fpr, tpr, thresholds)
    ]


def pixel_auroc(masks, maps) -> float | None:
    """AUROC over every pixel of every image; None when there are no defect (or no good) pixels."""
    masks, maps = _masks_maps(masks, maps)
    flat_masks = masks.ravel()
    if not flat_masks.any() or flat_masks.all():
        return None
    return float(roc_auc_score(flat_masks, maps.ravel()))


def _pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """FPR and PRO at every distinct threshold, as in MVTec's generic_util.compute_pro.

    Returns None when there are no defect regions or no defect-free pixels.
    """
    # Give each image's regions their own label range so one bincount sizes them all.
    regions = np.zeros(masks.shape, dtype=np.int64)
    num_regions = 0
    for i, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure=_STRUCTURE)
        regions[i] = np.where(labeled > 0, labeled + num_regions, 0)
        num_regions += n
    ok = regions == 0
    num_ok = int(ok.sum())
    if num_regions == 0 or num_ok == 0:
        return None

    region_sizes = np.bincount(regions.ravel(), minlength=num_regions + 1).astype(np.float64)
    # Each region pixel adds 1/size of its region, so a fully detected region adds exactly 1;
    # dividing by the region count then makes the cumulative sum the mean overlap per region.
    pro_changes = np.where(ok, 0.0, 1.0 / region_sizes[regions]).ravel()
    fp_changes = ok.ravel().astype(np.float64)

    # Lowering the threshold past each score (descending) adds that pixel to the prediction.
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    sorted_scores = maps.ravel()[order]
    fprs = np.cumsum(fp_changes[order]) / num_ok
    pros = np.cumsum(pro_changes[order]) / num_regions

    # Pixels with equal scores switch together: only the end of each run is a real threshold.
    keep = np.append(np.diff(sorted_scores) != 0, True)
    fprs = np.minimum(fprs[keep], 1.0)
    pros = np.minimum(pros[keep], 1.0)
    return np.concatenate(([0.0], fprs)), np.concatenate(([0.0], pros))


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray] | None:
    """FPR and PRO at every distinct threshold (for plots); None without defect regions or good pixels."""
    return _pro_curve(*_masks_maps(masks, maps))


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) up to x_max, interpolating the curve at x_max (MVTec's trapezoid)."""
    correction = 0.0
    if not np.any(x == x_max):
        # First point beyond x_max; x is sorted and starts at 0 < x_max <= 1 = x[-1].
        ins = int(np.searchsorted(x, x_max, side="right"))
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def aupro(masks, maps, fpr_limit=0.3) -> float | None:
    """Normalised area under the PRO curve up to fpr_limit (MVTec AD's official definition).

    Regions are 8-connected components of each ground-truth mask; the FPR counts all defect-free
    pixels of all images, good images included. None when there are no defect regions.
    """
    if not 0 < fpr_limit <= 1:
        raise PipelineError(f"metrics: fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = _masks_maps(masks, maps)
    curve = _pro_curve(masks, maps)
    if curve is None:
        return None
    fprs, pros = curve
    return _trapezoid(fprs, pros, fpr_limit) / fpr_limit


def f1_max(labels, scores) -> dict:
    """Best F1 over the PR curve; the threshold means 'anomalous when score >= threshold' (sklearn's rule).

    All values are None when there are no anomalous images (recall is undefined).
    """
    labels, scores = _labels_scores(labels, scores)
    if not labels.any():
        return {"f1": None, "threshold": None, "precision": None, "recall": None}
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


def mean_std_threshold(val_scores, n_std=2.0) -> float:
    """The study's rule: mean + n_std * std of held-out good validation scores."""
    val_scores = np.asarray(val_scores, dtype=np.float64).ravel()
    if val_scores.size == 0:
        raise PipelineError("metrics: no validation scores to set the threshold from")
    if not np.isfinite(val_scores).all():
        raise PipelineError("metrics: validation scores contain NaN or infinite values")
    # Sample std (ddof=1) since the validation set is a sample; one score has no spread.
    std = float(np.std(val_scores, ddof=1)) if val_scores.size > 1 else 0.0
    return float(np.mean(val_scores)) + float(n_std) * std


def threshold_report(labels, scores, threshold) -> dict:
    """Confusion counts and precision/recall/F1 when 'anomalous' means score >= threshold.

    The same rule as f1_max (sklearn's precision_recall_curve), so both thresholds mean the same
    thing. Undefined values are None, never 0: precision when nothing is flagged (tp + fp = 0),
    recall and F1 when the test set has no anomalous images (tp + fn = 0). Otherwise
    F1 = 2tp / (2tp + fp + fn), sklearn's formula (0 when nothing anomalous is found).
    """
    labels, scores = _labels_scores(labels, scores)
    pred = scores >= threshold
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


def evaluate(
    labels,
    scores,
    defect_types,
    val_scores,
    masks=None,
    maps=None,
    fpr_limit=0.3,
    n_std=2.0,
) -> dict:
    """All metrics in one JSON-serialisable dict (plain floats/ints, None where undefined)."""
    if (masks is None) != (maps is None):
        raise PipelineError("metrics: pixel metrics need both masks and maps")
    checked, _ = _labels_scores(labels, scores)
    if checked.size and not _both_classes(checked):
        has = "defective" if checked[0] == 1 else "good"
        undefined = (
            "image AUROC and per-defect AUROC"
            if has == "defective"
            else "image AUROC, F1-max, threshold recall and F1 (and precision when nothing is flagged)"
        )
        warn(f"the test set has only {has} images: {undefined} are undefined and reported as null")
    best = f1_max(labels, scores)
    threshold = mean_std_threshold(val_scores, n_std)
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
    if masks is not None:
        result["pixel_auroc"] = pixel_auroc(masks, maps)
        result["aupro"] = aupro(masks, maps, fpr_limit)
    return result
