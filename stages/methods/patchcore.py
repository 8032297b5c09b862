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

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from stages.common import PipelineError
from stages.features import FeatureSet, finest_grid
from stages.methods.base import AnomalyDetector, Prediction
from stages.methods.neighbours import knn_distances
from stages.methods.sampler import check_ratio, greedy_coreset


def _project(features: torch.Tensor, dim: int) -> torch.Tensor:
    """(P, C) -> (P, dim) by adaptive average pooling over channels (the official 'MeanMapper')."""
    return F.adaptive_avg_pool1d(features.unsqueeze(1), dim).squeeze(1)


class PatchCore(AnomalyDetector):
    method = "patchcore"
    uses = "features"

    def __init__(
        self,
        device: str = "cpu",
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        patch_size: int = 3,
        pretrain_embed_dimension: int = 1024,
        target_embed_dimension: int = 1024,
        reweight: bool = False,
        num_neighbors: int = 9,
        smoothing_sigma: float = 4.0,
        seed: int = 0,
        batch_size: int = 8,
    ):
        super().__init__(
            device=device,
            coreset_ratio=coreset_ratio,
            projection_dim=projection_dim,
            patch_size=patch_size,
            pretrain_embed_dimension=pretrain_embed_dimension,
            target_embed_dimension=target_embed_dimension,
            reweight=reweight,
            num_neighbors=num_neighbors,
            smoothing_sigma=smoothing_sigma,
            seed=seed,
            batch_size=batch_size,
        )
        check_ratio(coreset_ratio)
        if patch_size < 1 or patch_size % 2 == 0:
            raise PipelineError(f"patch_size must be a positive odd integer, got {patch_size!r}")
        self.bank: torch.Tensor | None = None

    # -- features -----------------------------------------------------------------------------
    def embed(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Feature maps of a batch, finest first -> (N * h * w, D) patch embeddings and the grid (h, w)."""
        p = self.hparams["patch_size"]
        grid = finest_grid(maps)
        per_layer = []
        for layer in maps:
            layer = layer.float().to(self.device)
            n, c, h, w = layer.shape
            # locally aware: each position described by its p x p neighbourhood, (N, C*p*p, h*w)
            patches = F.unfold(layer, p, padding=p // 2)
            flat = _project(patches.transpose(1, 2).reshape(-1, c * p * p), self.hparams["pretrain_embed_dimension"])
            # projecting before upsampling equals the official order: both steps are linear
            layer = flat.reshape(n, h, w, -1).permute(0, 3, 1, 2)
            if (h, w) != grid:
                layer = F.interpolate(layer, size=grid, mode="bilinear", align_corners=False)
            per_layer.append(layer.permute(0, 2, 3, 1).reshape(-1, layer.shape[1]))
        stacked = torch.cat(per_layer, dim=1)
        return _project(stacked, self.hparams["target_embed_dimension"]), tuple(grid)

    def _batches(self, features: FeatureSet, desc: str):
        maps = list(features.feature_maps.values())
        if len(maps) == 0:
            raise PipelineError("patchcore needs at least one cached feature map layer")
        size = self.hparams["batch_size"]
        for start in tqdm(range(0, len(features), size), desc=desc, unit="batch"):
            yield self.embed([m[start : start + size] for m in maps])

    # -- estimator API ------------------------------------------------------------------------
    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "PatchCore":
        if len(train) == 0:
            raise PipelineError("no training images to build the memory bank")
        patches, filled = None, 0
        for embeddings, grid in self._batches(train, "embed train"):
            if patches is None:  # one allocation: no second copy of the full patch set
                patches = torch.empty(len(train) * grid[0] * grid[1], embeddings.shape[1])
            patches[filled : filled + len(embeddings)] = embeddings.cpu()
            filled += len(embeddings)
        selected = greedy_coreset(
            patches.to(self.device),
            self.hparams["coreset_ratio"],
            projection_dim=self.hparams["projection_dim"],
            seed=self.hparams["seed"],
        )
        self.bank = patches[selected.cpu()].contiguous()
        if self.hparams["reweight"] and self.hparams["num_neighbors"] > len(self.bank):
            raise PipelineError(
                f"num_neighbors={self.hparams['num_neighbors']} is larger than the memory bank ({len(self.bank)})"
            )
        return self

    def predict(self, inputs: FeatureSet) -> Prediction:
        bank = self.bank.to(self.device)
        height, width = inputs.image_size
        scores, maps = [], []
        for embeddings, grid in self._batches(inputs, "score"):
            distances, nearest = knn_distances(embeddings, bank, k=1)
            patch_scores = distances[:, 0].reshape(-1, grid[0] * grid[1])
            nearest = nearest[:, 0].reshape(-1, grid[0] * grid[1])
            embeddings = embeddings.reshape(patch_scores.shape[0], -1, embeddings.shape[-1])
            for i in range(len(patch_scores)):
                scores.append(self._image_score(patch_scores[i], nearest[i], embeddings[i], bank))
            upsampled = F.interpolate(
                patch_scores.reshape(-1, 1, *grid), size=(height, width), mode="bilinear", align_corners=False
            )[:, 0].cpu().numpy()
            sigma = self.hparams["smoothing_sigma"]
            maps.extend(gaussian_filter(m, sigma=sigma) if sigma > 0 else m for m in upsampled)
        return Prediction(image_scores=np.array(scores, dtype=np.float64), anomaly_maps=np.stack(maps).astype(np.float32))

    def _image_score(self, patch_scores, nearest, embeddings, bank) -> float:
        best = int(torch.argmax(patch_scores))
        score = patch_scores[best]
        if self.hparams["reweight"]:
            # Paper eq. 7: damp the score when the matched bank patch sits in a dense neighbourhood.
            _, support = knn_distances(bank[nearest[best]][None], bank, k=self.hparams["num_neighbors"])
            distances = torch.cdist(embeddings[best][None], bank[support[0]])[0]
            score = (1 - torch.softmax(distances, dim=0)[0]) * score
        return float(score)

    def get_state(self) -> dict:
        return {"bank": self.bank}

    def set_state(self, state: dict) -> None:
        self.bank = state["bank"]
