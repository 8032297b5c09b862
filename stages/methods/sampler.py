"""Greedy coreset subsampling (PatchCore, Roth et al. 2021, Sec. 3.2), vectorised.

Follows the official ApproximateGreedyCoresetSampler: features are randomly projected to a low
dimension (Johnson-Lindenstrauss), the minimum distance of every point to the coreset is kept
up to date, and the farthest point is added next. The selections are the official loop's; only
the order of the work differs (greedy_select).
"""
from __future__ import annotations

import contextlib

import torch

from stages.core.errors import PipelineError
from stages.core.progress import progress_bar
from stages.methods import neighbours

# Points searched between two passes over all of them. The selection does not depend on it
# (tests/test_methods.py), only the speed: fewer passes, each a larger matrix product.
CANDIDATES = 256
# Points per block of a pass: bounds its (centres x points) distance block to 8 MiB.
PASS_BLOCK = 8192


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


def greedy_select(
    reduced: torch.Tensor,
    ratio: float,
    generator: torch.Generator,
    n_starting_points: int = 10,
    progress: bool = True,
) -> torch.Tensor:
    """Greedy k-center on already projected rows; `generator` draws the starting points.

    The official loop (plain_greedy_select) adds the point farthest from the coreset, then lowers
    every point's distance with one pass over all points: memory-bound, one read of the (n, d)
    rows per selected point. Here the same selections come in rounds: the next points are searched
    among the current CANDIDATES farthest points, updated on their own, for as long as the best of
    them stays farther than the (CANDIDATES + 1)-th farthest point, a bound for every point outside
    them (distances only go down). One pass then lowers every point with all centres of the round
    at once, a matrix product instead of one vector product per centre. Same formula in the same
    order, same ties (lowest index first): the same indices as the plain loop on the tests' data and
    on 204,800 real Lite0 patches (bench/patchcore_devices.py; results in bench/results/). Only the
    library routine computing the products differs, so two points a rounding unit apart could in
    principle swap.
    """
    n_select = _n_select(len(reduced), ratio)
    if n_select >= len(reduced):
        return torch.arange(len(reduced))
    min_dist, squared_norms = _start(reduced, generator, n_starting_points)
    selected = torch.empty(n_select, dtype=torch.long)
    done = 0
    with progress_bar(total=n_select, show=progress, desc="coreset", unit="pt", mininterval=1.0) as bar:
        while done < n_select:
            with _one_thread(reduced.device):
                chosen = _select_among_farthest(reduced, squared_norms, min_dist, n_select - done)
            if not chosen:  # the farthest candidate ties with the bound: one step of the plain loop
                chosen = [int(torch.argmax(min_dist))]
            selected[done : done + len(chosen)] = torch.tensor(chosen)
            done += len(chosen)
            bar.update(len(chosen))
            if done < n_select:
                _lower_distances(reduced, squared_norms, min_dist, chosen)
    return selected.sort().values


def plain_greedy_select(reduced: torch.Tensor, ratio: float, generator: torch.Generator, n_starting_points: int = 10):
    """The official loop, one pass over all points per selected point: the reference greedy_select
    is tested against (and far slower on a CPU)."""
    n_select = _n_select(len(reduced), ratio)
    if n_select >= len(reduced):
        return torch.arange(len(reduced))
    min_dist, squared_norms = _start(reduced, generator, n_starting_points)
    columns = reduced.t().contiguous()  # (d, n): a row vector times this, as the previous version did
    chosen = []
    for _ in range(n_select):
        point = int(torch.argmax(min_dist))
        chosen.append(point)
        # ||x - p||^2 = -2 x.p + ||x||^2 + ||p||^2
        distances = (reduced[point : point + 1] @ columns)[0].mul_(-2).add_(squared_norms).add_(squared_norms[point])
        torch.minimum(min_dist, distances, out=min_dist)
    return torch.tensor(sorted(chosen))


def _n_select(n: int, ratio: float) -> int:
    check_ratio(ratio)
    return max(1, int(n * ratio))


def _start(reduced, generator, n_starting_points):
    """The starting distances (squared) and every point's squared norm."""
    n = len(reduced)
    n_start = min(n_starting_points, n)
    start = torch.randperm(n, generator=generator)[:n_start].to(reduced.device)
    # Approximate distance to the (not yet chosen) coreset: mean distance to a few random anchors.
    # Distances are kept squared from here on: the argmax and the minimum are the same.
    # Block by block: whole-matrix temporaries (reduced * reduced) would each be as large as `reduced`.
    # The greedy steps below write the same three terms in another order (-2 folded into the rows, the
    # plain loop's order), which their selections are tested against: they do not use the helper.
    blocks = reduced.split(PASS_BLOCK)
    anchors = reduced[start]
    min_dist = torch.cat(
        [neighbours.root(neighbours.squared_distances(block, anchors)).mean(dim=1) for block in blocks]
    ).square()
    squared_norms = torch.cat([neighbours.squared_norms(block) for block in blocks])
    return min_dist, squared_norms


def _select_among_farthest(reduced, squared_norms, min_dist, limit: int) -> list[int]:
    """The next greedy picks that can be proven from the farthest points alone (see greedy_select)."""
    n = len(min_dist)
    if CANDIDATES < n:
        values, index = torch.topk(min_dist, CANDIDATES + 1)
        bound, values, index = values[CANDIDATES], values[:CANDIDATES], index[:CANDIDATES]
    else:
        values, index = min_dist.clone(), torch.arange(n, device=min_dist.device)
        bound = torch.tensor(float("-inf"), device=min_dist.device)
    index, order = index.sort()  # argmax takes the first of equal values: the lowest index, as the plain loop
    values = values[order]
    rows, norms = reduced[index] * -2, squared_norms[index]  # x 2 is exact: same bits as scaling the product
    index_list = index.tolist()
    chosen = []
    # at most one pick per candidate: bounds the round's distance block (a point picked twice,
    # on rounding noise among duplicates, ends the round; the next one picks it as the plain loop)
    while len(chosen) < min(limit, len(index_list)):
        best = torch.argmax(values)
        best, farther = torch.stack([best, values[best] > bound]).tolist()  # one device sync per pick
        if not farther:
            break
        point = index_list[best]
        chosen.append(point)
        distances = (rows @ reduced[point]).add_(norms).add_(squared_norms[point])  # the plain loop's order
        torch.minimum(values, distances, out=values)
    return chosen


def _lower_distances(reduced, squared_norms, min_dist, chosen: list[int]) -> None:
    """min_dist = min(min_dist, squared distance to each chosen point), block by block."""
    centres = reduced[chosen] * -2
    centre_norms = squared_norms[chosen][:, None]
    for start in range(0, len(reduced), PASS_BLOCK):
        block = slice(start, start + PASS_BLOCK)
        distances = (centres @ reduced[block].t()).add_(squared_norms[block]).add_(centre_norms)
        torch.minimum(min_dist[block], distances.amin(dim=0), out=min_dist[block])


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """A round's small products on the CPU run faster on one thread: hand-offs cost more than they
    save, and on a busy machine they dominate (measured 30x slower with 2 threads under load)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
