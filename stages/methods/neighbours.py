"""Chunked nearest-neighbour search: memory stays bounded whatever the bank size."""
from __future__ import annotations

import torch

# Largest distance block held at once (float32 elements): 2**24 = 64 MiB.
MAX_BLOCK_ELEMENTS = 2**24


def exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x), the same bits on every CPU: computed in float64 and rounded back (a correctly rounded
    float32 sqrt). torch's float32 sqrt goes through MKL's vector math, whose result differs between
    Intel and AMD CPUs in the last bit even in MKL's reproducible mode; its float64 path does not."""
    return x.double().sqrt().to(x.dtype)


def squared_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """||q - b||^2 for every pair, as a matrix product (torch.cdist takes its square root with the
    CPU-dependent float32 sqrt)."""
    squared = torch.addmm((bank * bank).sum(dim=1), queries, bank.t(), alpha=-2.0)
    return (squared + (queries * queries).sum(dim=1, keepdim=True)).clamp_min(0.0)


def _chunk(n_other: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, n_other))


def knn_distances(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, max_elements: int = MAX_BLOCK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances and indices of the k nearest bank rows for every query row.

    Queries and bank are both processed in chunks, keeping a running top-k, so the distance
    block never exceeds `max_elements` however large the bank is.
    """
    if k > len(bank):
        raise ValueError(f"k={k} is larger than the bank ({len(bank)})")
    bank_chunk = max(k, min(len(bank), int(max_elements**0.5) * 4))
    query_chunk = _chunk(bank_chunk, max_elements)
    all_dists, all_index = [], []
    for q_start in range(0, len(queries), query_chunk):
        q = queries[q_start : q_start + query_chunk]
        best_d = best_i = None
        for b_start in range(0, len(bank), bank_chunk):
            block = squared_distances(q, bank[b_start : b_start + bank_chunk])
            # reduce the block to its own top-k first, then merge with the running top-k (2k columns)
            d, i = torch.topk(block, min(k, block.shape[1]), dim=1, largest=False)
            del block
            i += b_start
            if best_d is not None:
                d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                d, pos = torch.topk(d, k, dim=1, largest=False)
                i = torch.gather(i, 1, pos)
            best_d, best_i = d, i
        all_dists.append(exact_sqrt(best_d))
        all_index.append(best_i)
    return torch.cat(all_dists), torch.cat(all_index)
