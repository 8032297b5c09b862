"""Anomaly-map post-processing every method shares: upsample to the image, smooth, reduce to a score.

One Gaussian smoothing for all methods: scipy.ndimage.gaussian_filter (reflect borders, kernel
truncated at 4 sigma), as the official PatchCore code smooths its maps, so the same `smoothing_sigma`
means the same blur for every model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

IMAGE_SCORES = ("max", "mean")  # how a map becomes an image score


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each (H, W) map in an (N, H, W) stack; sigma 0 leaves them as they are."""
    if sigma <= 0:
        return maps
    return gaussian_filter(maps, sigma=(0, sigma, sigma))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) maps at model resolution -> (N, H, W) float32 numpy, bilinear as in PatchCore."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return maps.cpu().numpy().astype(np.float32, copy=False)


def finish_maps(raw: torch.Tensor, size: tuple[int, int], sigma: float, image_score: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """Raw (N, h, w) maps -> smoothed maps at the image size and one score per image (max or mean)."""
    maps = smooth(upsample(raw, size), sigma)
    flat = maps.reshape(len(maps), -1)
    scores = flat.max(axis=1) if image_score == "max" else flat.mean(axis=1)
    return maps, scores.astype(np.float64)
