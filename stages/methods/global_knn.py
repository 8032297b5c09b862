"""Global-embedding kNN: the study's 'ResNet50 + kNN' and 'ViT + kNN'.

Memory bank = one global embedding per training image; image score = mean Euclidean distance to
the k nearest training embeddings. Image-level only (no anomaly maps).
"""
from __future__ import annotations

import torch

from stages.common import PipelineError
from stages.features import FeatureSet
from stages.methods.base import AnomalyDetector, Prediction
from stages.methods.neighbours import knn_distances


class GlobalKNN(AnomalyDetector):
    method = "global_knn"
    uses = "features"

    def __init__(self, device: str = "cpu", k: int = 50, top_variance_dims: int | None = None):
        super().__init__(device=device, k=k, top_variance_dims=top_variance_dims)
        if not isinstance(k, int) or k < 1:
            raise PipelineError(f"k must be a positive integer, got {k!r}")
        if top_variance_dims is not None and (not isinstance(top_variance_dims, int) or top_variance_dims < 1):
            raise PipelineError(f"top_variance_dims must be a positive integer or null, got {top_variance_dims!r}")
        self.k = k
        self.top_variance_dims = top_variance_dims
        self.bank: torch.Tensor | None = None
        self.dims: torch.Tensor | None = None  # kept embedding dimensions

    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "GlobalKNN":
        embeddings = train.global_embeddings.float()
        if self.k > len(embeddings):
            raise PipelineError(f"k={self.k} is larger than the memory bank ({len(embeddings)} training images)")
        if self.top_variance_dims is not None:
            if self.top_variance_dims > embeddings.shape[1]:
                raise PipelineError(
                    f"top_variance_dims={self.top_variance_dims} exceeds the embedding size {embeddings.shape[1]}"
                )
            variance = embeddings.var(dim=0)
            # stable sort so ties are broken the same way on every run
            order = torch.sort(variance, descending=True, stable=True).indices
            self.dims = order[: self.top_variance_dims].sort().values
        else:
            self.dims = torch.arange(embeddings.shape[1])
        self.bank = embeddings[:, self.dims].contiguous()
        return self

    def predict(self, inputs: FeatureSet) -> Prediction:
        queries = inputs.global_embeddings.float()[:, self.dims].to(self.device)
        distances, _ = knn_distances(queries, self.bank.to(self.device), k=self.k)
        return Prediction(image_scores=distances.mean(dim=1).double().cpu().numpy(), anomaly_maps=None)

    def get_state(self) -> dict:
        return {"bank": self.bank, "dims": self.dims}

    def set_state(self, state: dict) -> None:
        self.bank, self.dims = state["bank"], state["dims"]
