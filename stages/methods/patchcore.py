"""PatchCore (Roth et al., arXiv 2106.08265), following the official implementation.

Locally aware patch features from two mid-level layers: every position is described by its
zero-padded 3x3 neighbourhood (the official PatchMaker unfold), whose C*9 values are
average-pooled to `pretrain_embed_dimension` per layer (MeanMapper); coarser layers are
upsampled bilinearly to the finest grid; the layers are concatenated and pooled to
`target_embed_dimension` (Aggregator). A greedy coreset of the training patches is the memory
bank; a test patch's score is its Euclidean distance to the nearest bank patch (the paper's
distance; the official code's faiss returns it squared, which leaves image AUROC unchanged).
Image score = max patch score (optionally the paper's eq. 7 reweighting); anomaly map = patch
scores upsampled bilinearly to the image size and Gaussian-smoothed (sigma 4).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages.core.errors import PipelineError
from stages.core.schema import Schema, option
from stages.features.cache import FeatureSet, finest_grid
from stages.methods.base import AnomalyDetector
from stages.methods.maps import MAX_SMOOTHING_SIGMA, MapHead
from stages.methods.neighbours import exact_sqrt, nearest, squared_distances, squared_norms
from stages.methods.sampler import RandomProjection, greedy_select


def channel_pooling(in_dim: int, out_dim: int) -> torch.Tensor:
    """(in_dim, out_dim): adaptive average pooling over channels (the official MeanMapper,
    F.adaptive_avg_pool1d) as a matrix, so embedding is a matrix product in both runtimes."""
    pool = torch.zeros(in_dim, out_dim)
    for j in range(out_dim):
        lo, hi = (j * in_dim) // out_dim, -((-(j + 1) * in_dim) // out_dim)  # floor, ceil: adaptive pooling's windows
        pool[lo:hi, j] = 1.0 / (hi - lo)
    return pool


class PatchEmbedder(nn.Module):
    """Feature maps of a batch, in layer order -> (N * h * w, D) locally aware patch embeddings on the
    finest grid (h, w): each position described by its p x p neighbourhood (the official PatchMaker
    unfold), averaged to pretrain_embed_dimension per layer (MeanMapper), coarser layers upsampled
    bilinearly, the layers concatenated and averaged to target_embed_dimension (Aggregator)."""

    def __init__(self, channels: list[int], patch_size: int, pretrain_dim: int, target_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.layer_pooling = nn.ParameterList(
            [nn.Parameter(channel_pooling(c * patch_size**2, pretrain_dim), requires_grad=False) for c in channels])
        self.register_buffer("aggregate", channel_pooling(len(channels) * pretrain_dim, target_dim))

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        grid = finest_grid(maps)
        per_layer = []
        for layer, pooling in zip(maps, self.layer_pooling):
            n, c, h, w = layer.shape
            patches = F.unfold(layer.float(), p, padding=p // 2)  # (N, C*p*p, h*w)
            flat = patches.transpose(1, 2).reshape(-1, c * p * p) @ pooling
            # pooling before upsampling equals the official order: both steps are linear
            layer = flat.reshape(n, h, w, -1).permute(0, 3, 1, 2)
            if (h, w) != grid:
                layer = F.interpolate(layer, size=grid, mode="bilinear", align_corners=False)
            per_layer.append(layer.permute(0, 2, 3, 1).reshape(-1, layer.shape[1]))
        return torch.cat(per_layer, dim=1) @ self.aggregate, tuple(grid)


class PatchCoreScorer(nn.Module):
    """Feature maps -> (image scores, anomaly maps): each patch's distance to its nearest bank patch;
    image score = the largest (optionally the paper's eq. 7 reweighting); the map = patch distances
    upsampled and smoothed."""

    def __init__(self, embedder: PatchEmbedder, bank: torch.Tensor, score: "Score", image_size: tuple[int, int]):
        super().__init__()
        self.embedder, self.reweight, self.k = embedder, score.reweight, score.num_neighbors
        self.register_buffer("bank", bank.float())
        self.register_buffer("bank_norms", squared_norms(self.bank))
        self.head = MapHead(image_size, score.smoothing_sigma, image_score=None)

    def forward(self, *maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings, (h, w) = self.embedder(list(maps))
        n = maps[0].shape[0]
        distances, index = nearest(embeddings, self.bank, self.bank_norms)
        distances, index = distances.reshape(n, h * w), index.reshape(n, h * w)
        scores, best = distances.max(dim=1)
        if self.reweight:
            scores = scores * self._eq7_weight(embeddings.reshape(n, h * w, -1), index, best)
        _, amap = self.head(distances.reshape(n, h, w))
        return scores, amap

    def _eq7_weight(self, embeddings, index, best):
        """Paper eq. 7: 1 - softmax over the distances from the most anomalous patch to the k bank
        patches nearest its match (the match first): damps a score whose match sits in a dense region."""
        rows = torch.arange(len(best), device=best.device)
        patch, match = embeddings[rows, best], self.bank[index[rows, best]]
        # the full squared distances, not clamped: TopK returns indices, and which of two tied values it
        # returns depends on the values, so this order of the terms is kept (the same support as ever)
        to_bank = squared_distances(match, self.bank, self.bank_norms)
        support = torch.topk(to_bank, self.k, dim=1, largest=False).indices  # (N, k), the match itself first
        # k distances only: from the differences themselves (a sum of squares, never negative)
        distances = exact_sqrt((self.bank[support] - patch[:, None]).pow(2).sum(-1))
        return 1.0 - torch.softmax(distances, dim=1)[:, 0]


def _odd(value: int) -> bool:
    return value % 2 == 1


@dataclasses.dataclass(frozen=True)
class Fit(Schema):
    coreset_ratio: float = option(0.1, "fraction of the training patches kept in the memory bank", gt=0, le=1)
    projection_dim: int | None = option(128, "random projection for the approximate greedy coreset (null: none)", ge=1)
    patch_size: int = option(
        3, "neighbourhood of a locally aware patch feature", ge=1, check=_odd, allowed="an odd integer >= 1"
    )
    pretrain_embed_dimension: int = option(1024, "per-layer feature size after average pooling (MeanMapper)", ge=1)
    target_embed_dimension: int = option(1024, "patch feature size after the Aggregator", ge=1)
    batch_size: int = option(8, "images embedded at once while fitting", ge=1)


@dataclasses.dataclass(frozen=True)
class Score(Schema):
    num_neighbors: int = option(9, "bank neighbourhood of the eq. 7 reweighting", ge=1)
    reweight: bool = option(False, "the paper's eq. 7 image-score reweighting")
    smoothing_sigma: float = option(4.0, "Gaussian blur of the anomaly map, in pixels",
                                   ge=0, le=MAX_SMOOTHING_SIGMA)
    batch_size: int = option(8, "images scored at once", ge=1)


class PatchCore(AnomalyDetector):
    method = "patchcore"
    uses = "features"
    Fit = Fit
    Score = Score

    bank: torch.Tensor | None = None
    channels: list[int] | None = None  # channels of each cached layer, for the embedder
    fitted_attributes = ("bank", "channels")

    def embedder(self, channels: list[int]) -> PatchEmbedder:
        fit = self.fit_params
        return PatchEmbedder(channels, fit.patch_size, fit.pretrain_embed_dimension, fit.target_embed_dimension)

    def _batches(self, features: FeatureSet, size: int, desc: str):
        maps = list(features.feature_maps.values())
        if len(maps) == 0:
            raise PipelineError("patchcore needs at least one cached feature map layer")
        embedder = self.embedder([m.shape[1] for m in maps]).to(self.device)
        for start in tqdm(range(0, len(features), size), desc=desc, unit="batch"):
            with torch.no_grad():
                yield embedder([m[start : start + size].float().to(self.device) for m in maps])

    def draws_random_numbers(self) -> bool:
        return self.fit_params.coreset_ratio < 1  # the coreset's projection and starting points

    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "PatchCore":
        """Streamed: pass 1 keeps only the coreset's random projection of every patch (128-d by
        default), the greedy selection runs on that, pass 2 re-embeds and gathers the selected
        full-dimension patches. Memory grows with the bank, not with patches x dimension."""
        if len(train) == 0:
            raise PipelineError("no training images to build the memory bank")
        fit = self.fit_params
        self.channels = [int(m.shape[1]) for m in train.feature_maps.values()]
        projection, reduced, offset = None, None, 0
        for embeddings, grid in self._batches(train, fit.batch_size, "embed train"):
            if projection is None:
                projection = RandomProjection(embeddings.shape[1], fit.projection_dim, self.seed)
                # filled in place: a list of batches plus their concatenation would hold it twice
                reduced = torch.empty(
                    len(train) * grid[0] * grid[1], projection.out_dim or embeddings.shape[1], device=embeddings.device
                )
            reduced[offset : offset + len(embeddings)] = projection(embeddings)
            offset += len(embeddings)
        if offset != len(reduced):
            raise PipelineError(f"the feature maps hold {offset} patches, not {len(reduced)} ({len(train)} images)")
        selected = greedy_select(reduced, fit.coreset_ratio, projection.generator).to(self.device)
        del reduced
        bank, offset, filled = None, 0, 0
        for embeddings, _ in self._batches(train, fit.batch_size, "gather bank"):
            # `selected` is sorted: the rows of this batch are one slice of it
            lo, hi = torch.searchsorted(
                selected, torch.tensor([offset, offset + len(embeddings)], device=self.device)
            ).tolist()
            if bank is None:
                bank = torch.empty(len(selected), embeddings.shape[1])  # filled in place, held once
            bank[filled : filled + hi - lo] = embeddings[selected[lo:hi] - offset].cpu()
            filled += hi - lo
            offset += len(embeddings)
        self.bank = bank
        return self

    def scorer(self, image_size: tuple[int, int]) -> PatchCoreScorer:
        self._require_fitted()
        score = self.score_params
        if score.reweight and score.num_neighbors > len(self.bank):
            raise PipelineError(
                f"num_neighbors={score.num_neighbors} is larger than the memory bank ({len(self.bank)})"
            )
        return PatchCoreScorer(self.embedder(self.channels), self.bank, score, image_size)

    def get_state(self) -> dict:
        return {"bank": self.bank, "channels": list(self.channels)}

    def set_state(self, state: dict) -> None:
        if "channels" not in state:
            raise PipelineError(
                "patchcore: fitted before models recorded their layers' channels (run the fit stage again)"
            )
        self.bank, self.channels = state["bank"], [int(c) for c in state["channels"]]
