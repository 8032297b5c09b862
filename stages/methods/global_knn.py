"""Global-embedding kNN: the study's 'ResNet50 + kNN' and 'ViT + kNN'.

Memory bank = one global embedding per training image (optionally only its highest-variance
dimensions); image score = mean Euclidean distance to the k nearest training embeddings.
Image-level only (no anomaly maps).
"""
from __future__ import annotations

import dataclasses

import torch

from stages.errors import PipelineError, warn
from stages.features import FeatureSet
from stages.methods.base import AnomalyDetector, Prediction
from stages.methods.neighbours import knn_distances
from stages.schema import Schema, option


@dataclasses.dataclass(frozen=True)
class Fit(Schema):
    top_variance_dims: int | None = option(None, "keep only this many highest-variance embedding dimensions (null: all)", ge=1)


@dataclasses.dataclass(frozen=True)
class Score(Schema):
    k: int = option(50, "image score = mean distance to the k nearest training embeddings", ge=1)


class GlobalKNN(AnomalyDetector):
    method = "global_knn"
    uses = "features"
    Fit = Fit
    Score = Score

    bank: torch.Tensor | None = None
    dims: torch.Tensor | None = None  # kept embedding dimensions

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

    def predict(self, inputs: FeatureSet) -> Prediction:
        k = self.score_params.k
        if k > len(self.bank):  # e.g. a few-shot run: every training image is a neighbour
            warn(f"k={k} is larger than the memory bank ({len(self.bank)} training images); using k={len(self.bank)}")
            k = len(self.bank)
        queries = inputs.global_embeddings.float()[:, self.dims].to(self.device)
        distances, _ = knn_distances(queries, self.bank.to(self.device), k=k)
        return Prediction(image_scores=distances.mean(dim=1).double().cpu().numpy(), anomaly_maps=None)

    def get_state(self) -> dict:
        return {"bank": self.bank, "dims": self.dims}

    def set_state(self, state: dict) -> None:
        self.bank, self.dims = state["bank"], state["dims"]
