"""Metrics from per-image sufficient statistics, so one computation gives a metric, its curve and
its bootstrap interval.

A bootstrap resample of the test set is a vector of weights, one per image (how often it was
drawn), so every metric here takes a (resamples, images) weight matrix and returns one value per
row; weights of ones are the test set itself, the point estimate.

- Image level (ImageStats): the image scores themselves; AUROC (Mann-Whitney, ties count half) and
  F1-max ('anomalous when score >= threshold', sklearn's rule) are exact for any weights.
- Pixel level (PixelStats): each image's pixel scores counted on one set of bins (the quantiles of
  every test pixel's score): good pixels, defect pixels, and each defect region's pixels divided by
  the region's size (so a region fully above a threshold adds 1, as in MVTec's PRO). Pixel AUROC and
  the PRO curve are then sums over images; they equal the exact values up to the pixels that share
  a bin (with 8192 bins, within 1e-6 on the default run; tests/test_statistics.py bounds it by
  1e-4). Whole images are resampled, never pixels. Pixels outside an image's valid mask (the
  padding of preprocess.mode pad) are in none of these counts: padding is never a "good" pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.core.errors import PipelineError

# 8-connectivity, as in MVTec's official evaluation: diagonal neighbours join one region.
REGION_STRUCTURE = np.ones((3, 3), dtype=int)
CHUNK = 128  # resamples per matrix product: bounds the (resamples, bins) blocks


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    """(resamples, n) float64 weights; None -> one row of ones (the test set itself)."""
    if weights is None:
        return np.ones((1, n))
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise PipelineError(f"statistics: weights must be (resamples, {n}), got {weights.shape}")
    return weights


def _auroc_from_counts(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """AUROC per row from counts per ascending score group: P(pos > neg) + P(pos = neg) / 2."""
    below = np.cumsum(negative, axis=1) - negative
    wins = (positive * (below + 0.5 * negative)).sum(axis=1)
    return wins / (positive.sum(axis=1) * negative.sum(axis=1))


@dataclass(frozen=True)
class ImageStats:
    """Image scores grouped by distinct value: the sufficient statistics of image AUROC and F1-max."""

    groups: np.ndarray  # (N,) index of each image's score among the sorted distinct scores
    labels: np.ndarray  # (N,) 0 good, 1 defective
    values: np.ndarray  # (K,) the distinct scores, ascending

    @classmethod
    def from_scores(cls, labels, scores) -> "ImageStats":
        values, groups = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
        return cls(groups, np.asarray(labels, dtype=np.int64), values)

    def _counts(self, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        w = _weights(weights, len(self.labels))
        onehot = np.zeros((len(self.labels), len(self.values)))
        onehot[np.arange(len(self.labels)), self.groups] = 1.0
        good, bad = self.labels == 0, self.labels == 1
        return w[:, bad] @ onehot[bad], w[:, good] @ onehot[good]

    def auroc(self, weights: np.ndarray | None = None) -> np.ndarray:
        positive, negative = self._counts(weights)
        return _auroc_from_counts(positive, negative)

    def f1_max(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Best F1 = 2TP / (2TP + FP + FN) over the thresholds 'score >= each distinct score'."""
        positive, negative = self._counts(weights)
        tp = np.cumsum(positive[:, ::-1], axis=1)  # flagged defective images, threshold descending
        fp = np.cumsum(negative[:, ::-1], axis=1)
        fn = positive.sum(axis=1, keepdims=True) - tp
        return (2 * tp / (2 * tp + fp + fn)).max(axis=1)


@dataclass(frozen=True)
class PixelStats:
    """Per-image pixel counts on fixed bins; see the module docstring."""

    edges: np.ndarray  # (B + 1,) bin edges: bin b holds edges[b] <= score < edges[b + 1] (the last one closed)
    good: np.ndarray  # (N, B) good pixels per bin
    defect: np.ndarray  # (N, B) defect pixels per bin
    region_overlap: np.ndarray  # (N, B) sum over the image's regions of (its pixels in the bin / its size)
    regions: np.ndarray  # (N,) defect regions per image

    @classmethod
    def from_maps(cls, masks: np.ndarray, maps: np.ndarray, bins: int, valid: np.ndarray | None = None) -> "PixelStats":
        """`valid` (N, H, W) bool, None for all: the pixels that show the image. The others (preprocess.mode
        pad's padding) count nowhere: neither good nor defect, in no region, in no bin edge."""
        masks = np.asarray(masks).astype(bool)
        maps = np.asarray(maps, dtype=np.float64)
        if masks.ndim != 3 or masks.shape != maps.shape:
            raise PipelineError(f"metrics: masks and maps must both be (N, H, W) and the same shape "
                                f"(got {masks.shape} and {maps.shape})")
        if valid is not None:
            valid = np.asarray(valid).astype(bool)
            if valid.shape != masks.shape:
                raise PipelineError(f"metrics: the valid-pixel mask must be {masks.shape}, got {valid.shape}")
            if not valid.any():
                raise PipelineError("metrics: no valid pixel (every pixel is padding)")
            masks = masks & valid
        scored = maps if valid is None else maps[valid]  # the pixels that count; padding's scores never do
        if not np.isfinite(scored).all():
            raise PipelineError("metrics: anomaly maps contain NaN or infinite values")
        edges = np.unique(np.quantile(scored, np.linspace(0.0, 1.0, bins + 1)))
        if len(edges) == 1:  # every pixel has the same score: one bin
            edges = np.array([edges[0], edges[0]])
        n_bins = len(edges) - 1
        index = np.clip(np.searchsorted(edges, maps, side="right") - 1, 0, n_bins - 1)  # padding's: never counted
        key = np.arange(len(maps))[:, None, None] * n_bins + index
        count = lambda where, weights=None: np.bincount(  # noqa: E731
            key[where], weights=None if weights is None else weights, minlength=len(maps) * n_bins
        ).reshape(len(maps), n_bins).astype(np.float64)
        overlap = np.zeros((len(maps), n_bins))
        regions = np.zeros(len(maps))
        from scipy import ndimage  # here, not on top: the stages that read only names from stages.evaluation

        for i, mask in enumerate(masks):
            labelled, n = ndimage.label(mask, structure=REGION_STRUCTURE)
            regions[i] = n
            if n:
                sizes = np.bincount(labelled.ravel())
                overlap[i] = np.bincount(index[i][mask], weights=1.0 / sizes[labelled[mask]], minlength=n_bins)
        return cls(edges, count(~masks if valid is None else ~masks & valid), count(masks), overlap, regions)

    def _sums(self, weights, *tables):
        """Each table (N, B) summed over images with each row of weights: a (resamples, B) array per table,
        computed CHUNK resamples at a time."""
        w = _weights(weights, len(self.regions))
        for start in range(0, len(w), CHUNK):
            yield start, [w[start : start + CHUNK] @ table for table in tables]

    def defined(self) -> bool:
        """Pixel AUROC needs defect and good pixels somewhere in the test set."""
        return self.defect.sum() > 0 and self.good.sum() > 0

    def has_regions(self) -> bool:
        """The PRO curve needs a defect region and a good pixel."""
        return self.regions.sum() > 0 and self.good.sum() > 0

    def auroc(self, weights: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(len(_weights(weights, len(self.regions))))
        for start, (defect, good) in self._sums(weights, self.defect, self.good):
            out[start : start + len(defect)] = _auroc_from_counts(defect, good)
        return out

    def pro_curves(self, weights: np.ndarray | None = None):
        """(fpr, pro) per resample at the thresholds 'score >= each bin's lower edge', from the top:
        both (resamples, B + 1), starting at (0, 0)."""
        w = _weights(weights, len(self.regions))
        for start, (good, overlap) in self._sums(weights, self.good, self.region_overlap):
            regions = w[start : start + CHUNK] @ self.regions
            fpr = np.cumsum(good[:, ::-1], axis=1) / good.sum(axis=1, keepdims=True)
            pro = np.cumsum(overlap[:, ::-1], axis=1) / regions[:, None]
            zero = np.zeros((len(good), 1))
            yield start, np.minimum(np.hstack([zero, fpr]), 1.0), np.minimum(np.hstack([zero, pro]), 1.0)

    def aupro(self, fpr_limit: float, weights: np.ndarray | None = None) -> np.ndarray:
        """Area under the PRO curve up to fpr_limit, normalised (MVTec AD's AUPRO)."""
        out = np.empty(len(_weights(weights, len(self.regions))))
        for start, fpr, pro in self.pro_curves(weights):
            out[start : start + len(fpr)] = [area_up_to(f, p, fpr_limit) / fpr_limit for f, p in zip(fpr, pro)]
        return out

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel ROC of the test set at the bin edges (fpr, tpr), from (0, 0) to (1, 1)."""
        good, defect = self.good.sum(axis=0), self.defect.sum(axis=0)
        fpr = np.concatenate([[0.0], np.cumsum(good[::-1]) / good.sum()])
        tpr = np.concatenate([[0.0], np.cumsum(defect[::-1]) / defect.sum()])
        return fpr, tpr


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) up to x_max, interpolating the curve at x_max (MVTec's trapezoid).
    x ascending from 0 to 1."""
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))  # first point beyond x_max
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)
