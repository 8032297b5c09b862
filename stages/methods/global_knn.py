"""Global-embedding kNN: the study's 'ResNet50 + kNN' and 'ViT + kNN'.

Memory bank = one global embedding per training image (optionally only its highest-variance
dimensions); image score = mean Euclidean distance to the k nearest training embeddings.
Image-level only (no anomaly maps).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from stages.core.errors import PipelineError, warn
from stages.core.schema import Schema, option
from stages.features.cache import FeatureSet
from stages.methods.base import AnomalyDetector
from stages.methods.neighbours import root, squared_distances, squared_norms


@dataclasses.dataclass(frozen=True)
class Fit(Schema):
    top_variance_dims: int | None = option(
        None, "keep only this many highest-variance embedding dimensions (null: all)", ge=1
    )


@dataclasses.dataclass(frozen=True)
class Score(Schema):
    k: int = option(50, "image score = mean distance to the k nearest training embeddings", ge=1)


class KNNScorer(nn.Module):
    """Global embeddings -> (image scores, no maps): mean Euclidean distance to the k nearest
    training embeddings (a matrix product and a TopK)."""

    def __init__(self, bank: torch.Tensor, dims: torch.Tensor, k: int):
        super().__init__()
        self.k = k
        self.register_buffer("bank", bank.float())
        self.register_buffer("bank_norms", squared_norms(self.bank))
        self.register_buffer("dims", dims.long())

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, None]:
        queries = embeddings.float().index_select(1, self.dims)
        squared = squared_distances(queries, self.bank, self.bank_norms)
        # root() clamps after the TopK: the same k values as clamping first (clamping is monotone)
        nearest = torch.topk(squared, self.k, dim=1, largest=False).values
        return root(nearest).mean(dim=1), None


class GlobalKNN(AnomalyDetector):
    method = "global_knn"
    uses = "features"
    uses_global_embedding = True
    Fit = Fit
    Score = Score

    bank: torch.Tensor | None = None
    dims: torch.Tensor | None = None  # kept embedding dimensions
    fitted_attributes = ("bank", "dims")

    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "GlobalKNN":
        embeddings = train.global_embeddings.float()
        if len(embeddings) == 0:
            raise PipelineError("no training images to build the memory bank")
        top = self.fit_params.top_variance_dims
        if top is not None:
            if top > embeddings.shape[1]:
                raise PipelineError(f"top_variance_dims={top} exceeds the embedding size {embeddings.shape[1]}")
            variance = embeddings.var(dim=0)
            # stable sort so ties are broken the same way on every run
            order = torch.sort(variance, descending=True, stable=True).indices
            self.dims = order[:top].sort().values
        else:
            self.dims = torch.arange(embeddings.shape[1])
        self.bank = embeddings[:, self.dims].contiguous()
        return self

    def scorer(self, image_size: tuple[int, int]) -> "KNNScorer":
        self._require_fitted()
        k = self.score_params.k
        if k > len(self.bank):  # e.g. a few-shot run: every training image is a neighbour
            warn(f"k={k} is larger than the memory bank ({len(self.bank)} training images); using k={len(self.bank)}")
            k = len(self.bank)
        return KNNScorer(self.bank, self.dims, k)

    def get_state(self) -> dict:
        return {"bank": self.bank, "dims": self.dims}

    def set_state(self, state: dict) -> None:
        self.bank, self.dims = state["bank"], state["dims"]
