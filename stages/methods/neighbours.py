"""Chunked nearest-neighbour search: memory stays bounded whatever the bank size."""
from __future__ import annotations

import torch

# Largest distance block held at once (float32 elements): 2**24 = 64 MiB.
MAX_BLOCK_ELEMENTS = 2**24


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
            block = torch.cdist(q, bank[b_start : b_start + bank_chunk])
            # reduce the block to its own top-k first, then merge with the running top-k (2k columns)
            d, i = torch.topk(block, min(k, block.shape[1]), dim=1, largest=False)
            del block
            i += b_start
            if best_d is not None:
                d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                d, pos = torch.topk(d, k, dim=1, largest=False)
                i = torch.gather(i, 1, pos)
            best_d, best_i = d, i
        all_dists.append(best_d)
        all_index.append(best_i)
    return torch.cat(all_dists), torch.cat(all_index)
