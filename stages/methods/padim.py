"""PaDiM (Defard et al., arXiv 2011.08785): a multivariate Gaussian per feature position, Mahalanobis distance.

Every cached layer is upsampled to the finest grid (nearest, as anomalib and the reference code's
embedding_concat do) and the layers are concatenated; a seeded random subset of `dimensions` of the
concatenated channels is kept (the paper: 100 of ResNet18's 448, 550 of WideResNet50's 1792). At each
position (i, j) the training images give a mean mu_ij and a covariance
Sigma_ij = 1/(N-1) sum_k (x_k - mu)(x_k - mu)^T + eps I (eps = `regularisation`, the paper's 0.01).
A test position's score is its Mahalanobis distance sqrt((x - mu)^T Sigma^-1 (x - mu)); the map is
upsampled bilinearly to the image size and Gaussian-smoothed (sigma 4, stages/methods/maps.py), the
image score is its max.

Memory: positions x d^2. The fit streams over batches of training images with running float64 sums
of x and x x^T per position (never an array of all training features), optionally a part of the
positions per pass. The inverse covariance is stored as its Cholesky factor W = L^-1 (Sigma = L L^T,
so Sigma^-1 = W^T W) in float32, and the distance is ||W (x - mu)||: the same size and the same
batched matrix product as the plain inverse, but a sum of squares has no cancellation: on covariances
of condition number 1e5 float32 keeps the distance within 4e-6 of float64, where x^T Sigma^-1 x with
a float32 Sigma^-1 is off by 3e-4 (tests/test_padim.py).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from stages.core.errors import PipelineError
from stages.core.schema import Schema, option
from stages.features.cache import FeatureSet, finest_grid
from stages.methods.base import AnomalyDetector
from stages.methods.maps import IMAGE_SCORES, MAX_SMOOTHING_SIGMA, MapHead
from stages.methods.neighbours import exact_sqrt

UPSAMPLING = ("nearest", "bilinear")  # how the coarser layers reach the finest grid
FACTOR_BLOCK = 64  # positions factorised at once: bounds the float64 Cholesky workspace


@dataclasses.dataclass(frozen=True)
class Fit(Schema):
    dimensions: int | None = option(100, "seeded random subset of the concatenated channels modelled per position "
                                         "(the paper: 100 for ResNet18, 550 for WideResNet50; null: all)", ge=1)
    regularisation: float = option(0.01, "eps of Sigma + eps * I: keeps every covariance invertible (the paper's 0.01)",
                                   gt=0)
    upsample: str = option("nearest", "how coarser layers reach the finest grid before concatenation "
                                      "(nearest: anomalib and the reference code)", choices=UPSAMPLING)
    batch_size: int = option(8, "training images accumulated at once", ge=1)
    positions_per_pass: int | None = option(
        None,
        "positions whose covariances one pass over the training images "
        "accumulates (null: all in one pass; fewer: less memory, more passes)",
        ge=1,
    )


@dataclasses.dataclass(frozen=True)
class Score(Schema):
    image_score: str = option(
        "max", "how the anomaly map becomes the image score (the paper: max)", choices=IMAGE_SCORES
    )
    smoothing_sigma: float = option(4.0, "Gaussian blur of the anomaly map, in pixels of the prepared image",
                                   ge=0, le=MAX_SMOOTHING_SIGMA)
    batch_size: int = option(8, "images scored at once", ge=1)


def split_dimensions(dims: Tensor, layer_channels: list[int]) -> list[Tensor]:
    """Sorted indices into the concatenated channels -> the kept channels of each layer."""
    keep, offset = [], 0
    for c in layer_channels:
        keep.append(dims[(dims >= offset) & (dims < offset + c)] - offset)
        offset += c
    return keep


def embed(maps: list[Tensor], keep: list[Tensor], mode: str) -> Tensor:
    """A batch's maps (B, C_l, h_l, w_l) -> (B, h * w, d) float32 on the finest grid, the kept channels
    only. Keeping channels before upsampling equals keeping them after: both act per channel."""
    grid = finest_grid(maps)
    out = []
    for layer, index in zip(maps, keep):
        if len(index) == 0:
            continue
        x = layer.index_select(1, index.to(layer.device)).float()
        if tuple(x.shape[-2:]) != tuple(grid):
            x = F.interpolate(x, size=grid, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
        out.append(x)
    # contiguous (B, positions, d): the batched products below are 30x slower on the channels-first layout
    return torch.cat(out, dim=1).flatten(2).transpose(1, 2).contiguous()


class PaDiMScorer(nn.Module):
    """Feature maps -> (image scores, anomaly maps at the image size): the fitted Gaussians as a module."""

    def __init__(self, detector: "PaDiM", image_size: tuple[int, int]):
        super().__init__()
        self.layer_channels, self.grid = list(detector.layer_channels), tuple(detector.grid)
        self.mode = detector.fit_params.upsample
        for i, index in enumerate(split_dimensions(detector.dims, self.layer_channels)):
            self.register_buffer(f"keep{i}", index, persistent=False)
        # shared with the detector, not copied; persistent, so that the ONNX exporter writes them as initializers:
        # a non-persistent buffer is traced as a Constant node inside the protobuf, and at the paper's settings
        # (d = 550 at 56 x 56 positions, 3.5 GiB) the export failed on protobuf's 2 GiB limit, where initializers
        # go to files beside model.onnx
        self.register_buffer("mean", detector.mean)
        self.register_buffer("whitening", detector.whitening)
        score = detector.score_params
        self.head = MapHead(image_size, float(score.smoothing_sigma), score.image_score)

    def distances(self, *maps: Tensor) -> Tensor:
        """(N, h, w) Mahalanobis distances at the feature grid, before upsampling and smoothing."""
        channels = [m.shape[1] for m in maps]
        if channels != self.layer_channels or tuple(finest_grid(list(maps))) != self.grid:
            grid = finest_grid(list(maps))
            raise PipelineError(
                f"padim: the features have {channels} channels on a {grid[0]}x{grid[1]} grid, the model "
                f"was fitted on {self.layer_channels} on {self.grid[0]}x{self.grid[1]} (re-run the fit stage)"
            )
        keep = [getattr(self, f"keep{i}") for i in range(len(maps))]
        delta = (embed(list(maps), keep, self.mode) - self.mean).permute(1, 2, 0)  # (positions, d, N)
        # ||W (x - mu)||: a batched matrix product, a sum of squares (never negative)
        distances = exact_sqrt(torch.bmm(self.whitening, delta).pow(2).sum(dim=1))  # (positions, N)
        return distances.t().reshape(-1, *self.grid)

    def forward(self, *maps: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.distances(*maps))


class PaDiM(AnomalyDetector):
    method = "padim"
    uses = "features"
    Fit = Fit
    Score = Score

    dims: Tensor | None = None  # (d,) int64: the kept channels of the concatenated layers, sorted
    mean: Tensor | None = None  # (h * w, d) float32
    whitening: Tensor | None = None  # (h * w, d, d) float32, lower triangular: W = L^-1, Sigma = L L^T
    grid: tuple[int, int] | None = None
    layer_channels: list[int] | None = None  # channels of each layer the model was fitted on
    fitted_attributes = ("dims", "mean", "whitening", "grid", "layer_channels")

    def draws_random_numbers(self) -> bool:
        return self.fit_params.dimensions is not None  # the random channel subset

    def choose_dimensions(self, channels: int) -> Tensor:
        """The seeded subset of `channels` concatenated channels (sorted; all of them for null)."""
        d = self.fit_params.dimensions
        if d is None:
            return torch.arange(channels)
        if d > channels:
            raise PipelineError(
                f"fit.dimensions={d} is more than the {channels} channels of the cached feature maps "
                f"(at most {channels}, or null for all)"
            )
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(channels, generator=generator)[:d].sort().values

    @torch.no_grad()
    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "PaDiM":
        n = len(train)
        if n < 2:
            raise PipelineError(
                f"padim needs at least 2 training images to estimate a covariance per position, got {n}"
            )
        maps = list(train.feature_maps.values())
        if not maps:
            raise PipelineError("padim: the feature cache holds no feature maps")
        layer_channels = [m.shape[1] for m in maps]
        dims = self.choose_dimensions(sum(layer_channels))
        grid = tuple(finest_grid(maps))
        positions = grid[0] * grid[1]
        per_pass = min(self.fit_params.positions_per_pass or positions, positions)
        passes = -(-positions // per_pass)
        mean = torch.empty(positions, len(dims))  # filled pass by pass, held once
        whitening = torch.empty(positions, len(dims), len(dims))
        keep = split_dimensions(dims, layer_channels)
        for number, lo in enumerate(range(0, positions, per_pass), start=1):
            hi = min(lo + per_pass, positions)
            desc = "fit gaussians" if passes == 1 else f"fit gaussians {number}/{passes}"
            self._gaussians(maps, keep, lo, hi, mean[lo:hi], whitening[lo:hi], grid[1], desc)
        self.dims, self.mean, self.whitening, self.grid, self.layer_channels = (
            dims,
            mean,
            whitening,
            grid,
            layer_channels,
        )
        return self

    def _gaussians(
        self,
        maps: list[Tensor],
        keep: list[Tensor],
        lo: int,
        hi: int,
        mean: Tensor,
        whitening: Tensor,
        width: int,
        desc: str,
    ) -> None:
        """Mean and whitening matrix of positions lo..hi-1, written into `mean` and `whitening`, from one
        streamed pass over the training images."""
        fit, n = self.fit_params, len(maps[0])
        shift, sums, products = None, None, None
        for start in tqdm(range(0, n, fit.batch_size), desc=desc, unit="batch"):
            # a batch of the cache at a time: the kept channels on the grid never exist for all images at once
            batch = [m[start : start + fit.batch_size].to(self.device) for m in maps]
            x = embed(batch, keep, fit.upsample)[:, lo:hi].double()
            if shift is None:
                # sums of x - shift, not of x: sum x x^T - n mu mu^T would cancel where |mu| >> std
                shift = x.mean(dim=0)
                sums = torch.zeros_like(shift)
                products = torch.zeros(*shift.shape, shift.shape[1], dtype=torch.float64, device=x.device)
            x = (x - shift).transpose(0, 1)  # (positions, B, d)
            sums += x.sum(dim=1)
            products.baddbmm_(x.transpose(1, 2), x)
        centre = sums / n
        mean.copy_(shift + centre)
        eye = torch.eye(products.shape[-1], dtype=torch.float64, device=products.device)
        for start in range(0, len(products), FACTOR_BLOCK):
            block = slice(start, start + FACTOR_BLOCK)
            c = centre[block]
            # the unbiased sample covariance (N - 1), as the paper and anomalib, plus eps I; in place:
            # these sums are not read again
            cov = products[block].baddbmm_(c[:, :, None], c[:, None, :], alpha=-n).div_(n - 1)
            cov.diagonal(dim1=1, dim2=2).add_(fit.regularisation)
            lower, info = torch.linalg.cholesky_ex(cov)
            if bool((info != 0).any()):
                row, col = divmod(lo + start + int(torch.nonzero(info)[0]), width)
                raise PipelineError(
                    f"the covariance at feature position ({row}, {col}) is not positive definite "
                    "(non-finite features? raise fit.regularisation)"
                )
            whitening[block] = torch.linalg.solve_triangular(lower, eye.expand_as(cov), upper=False)

    def scorer(self, image_size: tuple[int, int]) -> nn.Module:
        self._require_fitted()
        return PaDiMScorer(self, image_size)

    def get_state(self) -> dict:
        return {
            "dims": self.dims,
            "mean": self.mean,
            "whitening": self.whitening,
            "grid": list(self.grid),
            "layer_channels": list(self.layer_channels),
        }

    def set_state(self, state: dict) -> None:
        self.dims, self.mean, self.whitening = state["dims"], state["mean"], state["whitening"]
        self.grid, self.layer_channels = tuple(state["grid"]), [int(c) for c in state["layer_channels"]]
