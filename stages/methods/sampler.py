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


def greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    projection_dim: int | None = 128,
    n_starting_points: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Indices (sorted) of the `ratio` fraction of rows chosen by approximate greedy k-center."""
    check_ratio(ratio)
    n = len(features)
    n_select = max(1, int(n * ratio))
    if n_select >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    reduced = features.float()
    if projection_dim is not None and projection_dim < features.shape[1]:
        # Seeded random projection (the official code uses an untrained nn.Linear(bias=False));
        # any such map roughly preserves distances, which is all the farthest-point search needs.
        matrix = torch.randn(features.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        reduced = reduced @ matrix.to(reduced.device)
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
