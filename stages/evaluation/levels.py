"""Metrics per difficulty level of a synthetic ladder, and each model's detection limit.

A category whose test split carries levels (stages/data/levels.py: the synthetic carpet) is scored
level by level: level k's image AUROC compares every good test image with the defective images of
level k only; its pixel AUROC and AUPRO take the pixels of those same images. Each is computed on
the test set itself and on every bootstrap resample evaluate draws (stages/evaluation/bootstrap.py,
stratified by level, so every resample holds each level's count of defects and all good images'
count), with the same per-image statistics as the overall metrics (stages/evaluation/statistics.py).

The detection limit at an AUROC threshold (0.9 and 0.75) is read off the image AUROC curve over the
ladder, easiest level first: the first level k whose AUROC is below the threshold, interpolated
linearly with the level before it, gives a position (k - 1) + (A[k-1] - t) / (A[k-1] - A[k]) between
1 and L. Position 0 means the AUROC is below the threshold already at the easiest level; L + 1 that
it never falls below it. The same rule on every resample's curve gives the limit's distribution;
its interval is the resamples' percentile interval taken at observed values (no interpolation, so a
bound can be 0 or L + 1). A position maps to physical values by interpolating the ladder's delta_e,
area and width geometrically between neighbouring levels.
"""
from __future__ import annotations

import math

import numpy as np

from stages.evaluation.statistics import CHUNK, ImageStats, PixelStats, _auroc_from_counts, area_up_to

THRESHOLDS = (0.9, 0.75)  # image AUROC at which a detection limit is read off
METRICS = ("image_auroc", "pixel_auroc", "aupro")
LADDER_KEYS = ("delta_e", "area", "width")


def names(ladder: np.ndarray) -> list[str]:
    return [f"L{k}" for k in range(1, len(ladder) + 1)]


def _pixel_metrics(pixels: PixelStats, good: np.ndarray, levels_rows: list[np.ndarray], weights: np.ndarray,
                   fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel AUROC and AUPRO of each level on each row of weights, (resamples, L) each: PixelStats.auroc and
    .aupro on the good images plus that level's defective images (the bins stay those of the whole test
    set). The good images' weighted counts are the same for every level, so they are summed once per
    block of resamples."""
    auroc, aupro = np.empty((len(weights), len(levels_rows))), np.empty((len(weights), len(levels_rows)))
    for start in range(0, len(weights), CHUNK):
        block = weights[start : start + CHUNK]
        good_images = block[:, good] @ pixels.good[good]  # good images hold no defect pixels and no regions
        for k, rows in enumerate(levels_rows):
            w = block[:, rows]
            good_pixels = good_images + w @ pixels.good[rows]
            auroc[start : start + len(block), k] = _auroc_from_counts(w @ pixels.defect[rows], good_pixels)
            # the PRO curve from the top bin down, starting at (0, 0), as PixelStats.pro_curves
            fpr = np.cumsum(good_pixels[:, ::-1], axis=1) / good_pixels.sum(axis=1, keepdims=True)
            pro = np.cumsum((w @ pixels.region_overlap[rows])[:, ::-1], axis=1) / (w @ pixels.regions[rows])[:, None]
            zero = np.zeros((len(block), 1))
            fpr, pro = np.minimum(np.hstack([zero, fpr]), 1.0), np.minimum(np.hstack([zero, pro]), 1.0)
            aupro[start : start + len(block), k] = [area_up_to(f, p, fpr_limit) / fpr_limit for f, p in zip(fpr, pro)]
    return auroc, aupro


def per_level(labels, scores, levels, ladder, pixels: PixelStats | None, fpr_limit: float,
              weights: np.ndarray | None = None) -> dict[str, np.ndarray | None]:
    """Each metric per level: a (resamples, L) array (one row, the test set itself, without weights);
    None where the metric is undefined (no good test images, no anomaly maps or masks)."""
    labels, scores, levels = np.asarray(labels), np.asarray(scores, dtype=np.float64), np.asarray(levels)
    rows_of = [(labels == 0) | (levels == k) for k in range(1, len(ladder) + 1)]
    weight = (lambda rows: None) if weights is None else (lambda rows: weights[:, rows])  # images of one level
    out: dict[str, np.ndarray | None] = dict.fromkeys(METRICS)
    if not (labels == 0).any() or any(not (levels[rows] > 0).any() for rows in rows_of):
        return out  # no good images, or a level without defective images: nothing to compare
    out["image_auroc"] = np.stack(
        [ImageStats.from_scores(labels[rows], scores[rows]).auroc(weight(rows)) for rows in rows_of], axis=1
    )
    if pixels is not None:
        good = labels == 0
        defective = [levels == k for k in range(1, len(ladder) + 1)]
        counted = [(pixels.defect[rows].sum(), pixels.regions[rows].sum()) for rows in defective]
        if all(defect > 0 for defect, _ in counted) and pixels.good.sum() > 0:
            auroc, aupro = _pixel_metrics(pixels, good, defective, np.ones((1, len(labels))) if weights is None
                                          else np.asarray(weights, dtype=np.float64), fpr_limit)
            out["pixel_auroc"] = auroc
            out["aupro"] = aupro if all(regions > 0 for _, regions in counted) else None
    return out


def limit_position(curve: np.ndarray, threshold: float) -> float:
    """Where an AUROC curve over the ladder (easiest first) falls below `threshold`: a position in
    [1, L) interpolated between levels, 0 when it is below already at level 1, L + 1 when never."""
    below = np.flatnonzero(np.asarray(curve) < threshold)
    if len(below) == 0:
        return float(len(curve) + 1)
    k = int(below[0])  # 0-based: level k + 1
    if k == 0:
        return 0.0
    before, after = float(curve[k - 1]), float(curve[k])
    return k + (before - threshold) / (before - after)  # level k (1-based) + the fraction towards level k + 1


def physical(ladder: np.ndarray, position: float) -> dict[str, float | None]:
    """The ladder's delta_e, area and width at a position, geometrically interpolated; None outside [1, L]."""
    if not 1.0 <= position <= len(ladder):
        return dict.fromkeys(LADDER_KEYS)
    k = max(min(int(math.floor(position)), len(ladder) - 1), 1)  # the level below (1-based); at L: L - 1
    fraction = position - k
    low, high = ladder[k - 1], ladder[min(k, len(ladder) - 1)]
    if fraction in (0.0, 1.0):  # on a level: its own values
        values = low if fraction == 0.0 else high
    else:
        values = np.where(low == high, low, np.exp((1.0 - fraction) * np.log(low) + fraction * np.log(high)))
    return {key: float(v) for key, v in zip(LADDER_KEYS, values)}


def detection_limits(point: np.ndarray, resampled: np.ndarray, ladder: np.ndarray, confidence: float) -> dict:
    """{'auroc_0.9': {...}, 'auroc_0.75': {...}}: each limit's position with its interval, and the ladder's
    physical values there (module docstring)."""
    tail = (1.0 - confidence) / 2.0
    result = {}
    for threshold in THRESHOLDS:
        positions = np.array([limit_position(curve, threshold) for curve in resampled])
        low, high = np.quantile(positions, [tail, 1.0 - tail], method="inverted_cdf")
        value = limit_position(point, threshold)
        entry = {"level": value, "low": float(low), "high": float(high)}
        for name, at in (("", value), ("_low", low), ("_high", high)):
            entry.update({f"{key}{name}": v for key, v in physical(ladder, float(at)).items()})
        result[f"auroc_{threshold:g}"] = entry
    return result


def _by_level(values: np.ndarray | None, labels: list[str]) -> dict | None:
    return None if values is None else {name: float(v) for name, v in zip(labels, values)}


def summarise(per_seed: dict[int, dict], resampled: list[dict], ladder: np.ndarray, levels: np.ndarray,
              confidence: float) -> dict:
    """The metrics file's `levels` block: per level, the mean over seeds of each metric, its spread over
    seeds and the bootstrap interval of the seed mean; the ladder; the detection limits; each seed's own."""
    from stages.evaluation.bootstrap import interval

    labels = names(ladder)
    seeds = list(per_seed)
    summary: dict = {
        "ladder": {
            name: {**{key: float(v) for key, v in zip(LADDER_KEYS, ladder[k])}, "defects": int(np.sum(levels == k + 1))}
            for k, name in enumerate(labels)
        }
    }
    means, spread, bounds = {}, {}, {}
    for metric in METRICS:
        points = [per_seed[s][metric] for s in seeds]
        if any(p is None for p in points):
            means[metric] = spread[metric] = bounds[metric] = None
            continue
        stacked = np.concatenate(points, axis=0)  # (seeds, L)
        means[metric] = stacked.mean(axis=0)
        spread[metric] = stacked.std(axis=0, ddof=1) if len(seeds) > 1 else None
        samples = np.mean([r[metric] for r in resampled], axis=0)  # (resamples, L): the seed mean on each
        bounds[metric] = {name: list(interval(samples[:, k], confidence)) for k, name in enumerate(labels)}
        if metric == "image_auroc":
            summary["detection_limit"] = detection_limits(means[metric], samples, ladder, confidence)
    summary.update({metric: _by_level(means[metric], labels) for metric in METRICS})
    summary["seed_std"] = {metric: _by_level(spread[metric], labels) for metric in METRICS}
    summary["interval"] = {"confidence": confidence, **bounds}
    summary["per_seed"] = {
        str(s): {metric: _by_level(None if r[metric] is None else r[metric][0], labels) for metric in METRICS}
        for s, r in per_seed.items()
    }
    return summary
