"""Anomaly-map post-processing every method shares, as torch modules: upsample to the image, smooth,
reduce to a score. They run in eager torch (evaluate, predict) and export as they are to ONNX
(stages/export.py), so both runtimes compute the same graph.

One Gaussian smoothing for all methods, scipy.ndimage.gaussian_filter's (the official PatchCore
code's): 'reflect' borders (d c b a | a b c d), kernel truncated at 4 sigma, normalised to sum 1,
applied along rows then columns; so the same `smoothing_sigma` means the same blur for every model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SCORES = ("max", "mean")  # how a map becomes an image score
TRUNCATE = 4.0  # scipy's default: the kernel reaches 4 sigma
# Upper bound of every method's score.smoothing_sigma. The papers blur with sigma 4 (PatchCore, and
# anomalib's PaDiM); at 64 the kernel already reaches 256 px on each side, more than a 224 px map, so a
# larger sigma only flattens the map. The bound keeps the padded map at most (crop + 8 sigma + 1)^2 floats:
# a scoring.json from elsewhere with sigma 1e6 would ask for 7 GB per image (and 1e308 overflows).
MAX_SMOOTHING_SIGMA = 64.0


def gaussian_kernel(sigma: float) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian: radius int(4 sigma + 0.5), weights summing to 1."""
    radius = int(TRUNCATE * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return weights / weights.sum()


def reflect_indices(n: int, radius: int) -> np.ndarray:
    """Indices of a length-n axis padded by `radius` on both sides with scipy's 'reflect' rule
    (the edge value repeated: d c b a | a b c d | d c b a), for any radius."""
    positions = np.arange(-radius, n + radius)
    period = 2 * n
    folded = np.mod(positions, period)
    return np.where(folded < n, folded, period - 1 - folded)


class GaussianSmoothing(nn.Module):
    """(N, H, W) -> (N, H, W): separable Gaussian blur with scipy's borders; sigma 0 leaves maps as they are."""

    def __init__(self, size: tuple[int, int], sigma: float):
        super().__init__()
        self.sigma = float(sigma)
        if self.sigma <= 0:
            return
        kernel = torch.tensor(gaussian_kernel(self.sigma), dtype=torch.float32)
        radius = len(kernel) // 2
        self.register_buffer("kernel", kernel, persistent=False)
        self.register_buffer("rows", torch.tensor(reflect_indices(size[0], radius)), persistent=False)
        self.register_buffer("columns", torch.tensor(reflect_indices(size[1], radius)), persistent=False)

    def forward(self, maps: Tensor) -> Tensor:
        if self.sigma <= 0:
            return maps
        x = maps[:, None]
        x = F.conv2d(x.index_select(2, self.rows), self.kernel.view(1, 1, -1, 1))
        x = F.conv2d(x.index_select(3, self.columns), self.kernel.view(1, 1, 1, -1))
        return x[:, 0]


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) maps at model resolution -> (N, H, W), bilinear as in PatchCore."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


class MapHead(nn.Module):
    """Raw (N, h, w) maps -> (scores, maps), in every scorer's order: the maps upsampled to the image
    size and smoothed, and one score per image, their max or mean (None for a method that scores
    otherwise)."""

    def __init__(self, size: tuple[int, int], sigma: float, image_score: str | None = "max"):
        super().__init__()
        self.size, self.image_score = tuple(size), image_score
        self.smooth = GaussianSmoothing(self.size, sigma)

    def forward(self, raw: Tensor) -> tuple[Tensor | None, Tensor]:
        maps = self.smooth(upsample(raw.float(), self.size))
        if self.image_score is None:
            return None, maps
        flat = maps.flatten(1)
        return flat.amax(dim=1) if self.image_score == "max" else flat.mean(dim=1), maps


def resize_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in): the weights of torch's antialiased bilinear resize along one axis (read off by
    resizing the identity), so a resize is two matrix products, which ONNX has (its Resize has no
    antialiasing in torch's exporter)."""
    # width 2, left as it is (torch's antialiased kernel treats an axis of size 1 differently)
    eye = torch.eye(n_in).reshape(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 2).contiguous()
    out = F.interpolate(eye, size=(n_out, 2), mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0, :, 0].t().contiguous()
