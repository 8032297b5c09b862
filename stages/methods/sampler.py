"""Greedy coreset subsampling (PatchCore, Roth et al. 2021, Sec. 3.2), vectorised.

Follows the official ApproximateGreedyCoresetSampler: features are randomly projected to a low
dimension (Johnson-Lindenstrauss), the minimum distance of every point to the coreset is kept
up to date with one matrix-vector pass per selected point, and the farthest point is added next.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from stages.common import PipelineError


def check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise PipelineError(f"coreset_ratio must be in (0, 1], got {ratio!r}")


class RandomProjection:
    """The coreset's seeded random projection (the official code uses an untrained nn.Linear(bias=False));
    any such map roughly preserves distances, which is all the farthest-point search needs.

    Built once per fit and applied batch by batch, so the full-dimension features never have to
    be held at once; `generator` then draws the starting points, as in one-shot use.
    """

    def __init__(self, in_dim: int, projection_dim: int | None, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.matrix = None
        if projection_dim is not None and projection_dim < in_dim:
            self.matrix = torch.randn(in_dim, projection_dim, generator=self.generator) / projection_dim**0.5

    @property
    def out_dim(self) -> int | None:
        return None if self.matrix is None else self.matrix.shape[1]

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        return features if self.matrix is None else features @ self.matrix.to(features.device)


def greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    projection_dim: int | None = 128,
    n_starting_points: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Indices (sorted) of the `ratio` fraction of rows chosen by approximate greedy k-center."""
    projection = RandomProjection(features.shape[1], projection_dim, seed)
    return greedy_select(projection(features), ratio, projection.generator, n_starting_points, progress)


def greedy_select(
    reduced: torch.Tensor,
    ratio: float,
    generator: torch.Generator,
    n_starting_points: int = 10,
    progress: bool = True,
) -> torch.Tensor:
    """Greedy k-center on already projected rows; `generator` draws the starting points."""
    check_ratio(ratio)
    n = len(reduced)
    n_select = max(1, int(n * ratio))
    if n_select >= n:
        return torch.arange(n)
    n_start = min(n_starting_points, n)
    start = torch.randperm(n, generator=generator)[:n_start].to(reduced.device)
    # Approximate distance to the (not yet chosen) coreset: mean distance to a few random anchors.
    # Distances are kept squared from here on: the argmax and the minimum are the same.
    min_dist = torch.cdist(reduced, reduced[start]).mean(dim=1).square()
    squared_norms = (reduced * reduced).sum(dim=1)
    columns = reduced.t().contiguous()  # (d, n): a row vector times this is the fastest product
    dist_row = torch.empty(1, n, device=reduced.device)
    dist = dist_row[0]
    selected = torch.empty(n_select, dtype=torch.long)
    threads = torch.get_num_threads()
    if reduced.device.type == "cpu":
        # Each step is a small (d x n) product; thread hand-offs cost more than they save,
        # and on a busy machine they dominate (measured 30x slower with 2 threads under load).
        torch.set_num_threads(1)
    try:
        for step in tqdm(range(n_select), desc="coreset", unit="pt", disable=not progress, mininterval=1.0):
            index = int(torch.argmax(min_dist))
            selected[step] = index
            # ||x - p||^2 = ||x||^2 - 2 x.p + ||p||^2: one vector-matrix product per step
            torch.matmul(reduced[index : index + 1], columns, out=dist_row)
            dist.mul_(-2).add_(squared_norms).add_(squared_norms[index])
            torch.minimum(min_dist, dist, out=min_dist)
    finally:
        torch.set_num_threads(threads)
    return selected.sort().values
