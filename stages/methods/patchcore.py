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

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from stages.errors import PipelineError
from stages.features import FeatureSet, finest_grid
from stages.methods.base import AnomalyDetector, Prediction
from stages.methods.maps import smooth, upsample
from stages.methods.neighbours import knn_distances
from stages.methods.sampler import RandomProjection, greedy_select
from stages.schema import Schema, option


def _project(features: torch.Tensor, dim: int) -> torch.Tensor:
    """(P, C) -> (P, dim) by adaptive average pooling over channels (the official 'MeanMapper')."""
    return F.adaptive_avg_pool1d(features.unsqueeze(1), dim).squeeze(1)


def _odd(value: int) -> bool:
    return value % 2 == 1


@dataclasses.dataclass(frozen=True)
class Fit(Schema):
    coreset_ratio: float = option(0.1, "fraction of the training patches kept in the memory bank", gt=0, le=1)
    projection_dim: int | None = option(128, "random projection for the approximate greedy coreset (null: none)", ge=1)
    patch_size: int = option(3, "neighbourhood of a locally aware patch feature", ge=1, check=_odd, allowed="an odd integer >= 1")
    pretrain_embed_dimension: int = option(1024, "per-layer feature size after average pooling (MeanMapper)", ge=1)
    target_embed_dimension: int = option(1024, "patch feature size after the Aggregator", ge=1)
    batch_size: int = option(8, "images embedded at once while fitting", ge=1)


@dataclasses.dataclass(frozen=True)
class Score(Schema):
    num_neighbors: int = option(9, "bank neighbourhood of the eq. 7 reweighting", ge=1)
    reweight: bool = option(False, "the paper's eq. 7 image-score reweighting")
    smoothing_sigma: float = option(4.0, "Gaussian blur of the anomaly map, in pixels", ge=0)
    batch_size: int = option(8, "images scored at once", ge=1)


class PatchCore(AnomalyDetector):
    method = "patchcore"
    uses = "features"
    Fit = Fit
    Score = Score

    bank: torch.Tensor | None = None

    # -- features -----------------------------------------------------------------------------
    def embed(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Feature maps of a batch, finest first -> (N * h * w, D) patch embeddings and the grid (h, w)."""
        fit = self.fit_params
        p = fit.patch_size
        grid = finest_grid(maps)
        per_layer = []
        for layer in maps:
            layer = layer.float().to(self.device)
            n, c, h, w = layer.shape
            # locally aware: each position described by its p x p neighbourhood, (N, C*p*p, h*w)
            patches = F.unfold(layer, p, padding=p // 2)
            flat = _project(patches.transpose(1, 2).reshape(-1, c * p * p), fit.pretrain_embed_dimension)
            # projecting before upsampling equals the official order: both steps are linear
            layer = flat.reshape(n, h, w, -1).permute(0, 3, 1, 2)
            if (h, w) != grid:
                layer = F.interpolate(layer, size=grid, mode="bilinear", align_corners=False)
            per_layer.append(layer.permute(0, 2, 3, 1).reshape(-1, layer.shape[1]))
        stacked = torch.cat(per_layer, dim=1)
        return _project(stacked, fit.target_embed_dimension), tuple(grid)

    def _batches(self, features: FeatureSet, size: int, desc: str):
        maps = list(features.feature_maps.values())
        if len(maps) == 0:
            raise PipelineError("patchcore needs at least one cached feature map layer")
        for start in tqdm(range(0, len(features), size), desc=desc, unit="batch"):
            yield self.embed([m[start : start + size] for m in maps])

    # -- estimator API ------------------------------------------------------------------------
    def draws_random_numbers(self) -> bool:
        return self.fit_params.coreset_ratio < 1  # the coreset's projection and starting points
    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "PatchCore":
        """Streamed: pass 1 keeps only the coreset's random projection of every patch (128-d by
        default), the greedy selection runs on that, pass 2 re-embeds and gathers the selected
        full-dimension patches. Memory grows with the bank, not with patches x dimension."""
        if len(train) == 0:
            raise PipelineError("no training images to build the memory bank")
        fit = self.fit_params
        projection, reduced, offset = None, None, 0
        for embeddings, grid in self._batches(train, fit.batch_size, "embed train"):
            if projection is None:
                projection = RandomProjection(embeddings.shape[1], fit.projection_dim, self.seed)
                # filled in place: a list of batches plus their concatenation would hold it twice
                reduced = torch.empty(len(train) * grid[0] * grid[1], projection.out_dim or embeddings.shape[1],
                                      device=embeddings.device)
            reduced[offset : offset + len(embeddings)] = projection(embeddings)
            offset += len(embeddings)
        if offset != len(reduced):
            raise PipelineError(f"the feature maps hold {offset} patches, not {len(reduced)} ({len(train)} images)")
        selected = greedy_select(reduced, fit.coreset_ratio, projection.generator).to(self.device)
        del reduced
        bank, offset, filled = None, 0, 0
        for embeddings, _ in self._batches(train, fit.batch_size, "gather bank"):
            # `selected` is sorted: the rows of this batch are one slice of it
            lo, hi = torch.searchsorted(selected, torch.tensor([offset, offset + len(embeddings)], device=self.device)).tolist()
            if bank is None:
                bank = torch.empty(len(selected), embeddings.shape[1])  # filled in place, held once
            bank[filled : filled + hi - lo] = embeddings[selected[lo:hi] - offset].cpu()
            filled += hi - lo
            offset += len(embeddings)
        self.bank = bank
        return self

    def predict(self, inputs: FeatureSet) -> Prediction:
        score = self.score_params
        if score.reweight and score.num_neighbors > len(self.bank):
            raise PipelineError(f"num_neighbors={score.num_neighbors} is larger than the memory bank ({len(self.bank)})")
        bank = self.bank.to(self.device)
        scores, maps = [], []
        for embeddings, grid in self._batches(inputs, score.batch_size, "score"):
            distances, nearest = knn_distances(embeddings, bank, k=1)
            patch_scores = distances[:, 0].reshape(-1, grid[0] * grid[1])
            nearest = nearest[:, 0].reshape(-1, grid[0] * grid[1])
            embeddings = embeddings.reshape(patch_scores.shape[0], -1, embeddings.shape[-1])
            for i in range(len(patch_scores)):
                scores.append(self._image_score(patch_scores[i], nearest[i], embeddings[i], bank))
            maps.append(smooth(upsample(patch_scores.reshape(-1, *grid), inputs.image_size), score.smoothing_sigma))
        return Prediction(image_scores=np.array(scores, dtype=np.float64), anomaly_maps=np.concatenate(maps))

    def _image_score(self, patch_scores, nearest, embeddings, bank) -> float:
        best = int(torch.argmax(patch_scores))
        score = patch_scores[best]
        if self.score_params.reweight:
            # Paper eq. 7: damp the score when the matched bank patch sits in a dense neighbourhood.
            _, support = knn_distances(bank[nearest[best]][None], bank, k=self.score_params.num_neighbors)
            distances = torch.cdist(embeddings[best][None], bank[support[0]])[0]
            score = (1 - torch.softmax(distances, dim=0)[0]) * score
        return float(score)

    def get_state(self) -> dict:
        return {"bank": self.bank}

    def set_state(self, state: dict) -> None:
        self.bank = state["bank"]
