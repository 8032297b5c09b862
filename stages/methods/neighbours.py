"""Euclidean distances between rows, the one way every method computes them: the squared distance as a
matrix product, ||q - b||^2 = ||b||^2 - 2 q.b + ||q||^2 (torch.cdist takes its square root with the
CPU-dependent float32 sqrt, so its bytes differ between Intel and AMD), its root by `root`, and `nearest`, the bank row
nearest each query, block by block so memory stays bounded whatever the bank size.

Users: PatchCore (`nearest`; the eq. 7 support search), the global kNN's scorer and the coreset's
starting distances (stages/methods/sampler.py). Each keeps its own order of the same three terms (see the
comments where an order differs).

Under `numerics: strict` on the CPU the product runs in numpy's OpenBLAS, pinned to its Haswell (AVX2)
kernels (stages/core/numerics.py), not in torch's MKL: MKL is the same on Intel and AMD only on its
vendor-neutral SSE2 path, 3 to 4 times slower than OpenBLAS's AVX2 kernels, which are one code path
whatever the vendor (bench/cross_cpu_check.py: identical bytes natively and under emulated Intel and
AMD CPUs; the speed: bench/nn_product.py). An ONNX export traces torch's own product.
"""
from __future__ import annotations

import torch

from stages.core import numerics

# Largest distance block `nearest` holds at once (float32 elements): 2**24 = 64 MiB.
MAX_BLOCK_ELEMENTS = 2**24


def exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x), the same bits on every CPU: computed in float64 and rounded back (a correctly rounded
    float32 sqrt). torch's float32 sqrt goes through MKL's vector math, whose result differs between
    Intel and AMD CPUs in the last bit even in MKL's reproducible mode; its float64 path does not."""
    return x.double().sqrt().to(x.dtype)


def squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n,): ||x||^2 of every row (a bank's are computed once, at fit or scorer build)."""
    return (rows * rows).sum(dim=1)


def bank_terms(queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor) -> torch.Tensor:
    """(Q, B): ||b||^2 - 2 q.b, the squared distance less ||q||^2. That term is the same along a query's
    row, so the row's minimum and order are those of the full distance (up to rounding ties)."""
    return _bank_terms(queries, bank, bank_norms, openblas=_on_openblas(queries, bank))


def _bank_terms(queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor, openblas: bool) -> torch.Tensor:
    if queries.shape[-1] != bank.shape[-1]:  # one message whichever library multiplies
        raise ValueError(f"the queries have {queries.shape[-1]} features, the bank's rows {bank.shape[-1]}")
    if openblas:
        import numpy as np

        # -2 folded into the queries is exact (a power of two), so each value is fl(||b||^2 - 2 q.b), as
        # addmm's: one rounding of the same dot product, one pass fewer over the (Q, B) block
        scaled = np.ascontiguousarray(queries.numpy()) * np.float32(-2.0)
        product = np.matmul(scaled, np.ascontiguousarray(bank.numpy()).T)
        product += bank_norms.numpy()
        return torch.from_numpy(product)
    return torch.addmm(bank_norms, queries, bank.t(), alpha=-2.0)


def _on_openblas(queries: torch.Tensor, bank: torch.Tensor) -> bool:
    """Strict numerics, float32 on the CPU, no gradient, not being traced into an ONNX graph: the product
    (and `nearest`'s row minimum) in numpy."""
    return (numerics.active_mode() == "strict" and queries.device.type == "cpu" and bank.device.type == "cpu"
            and queries.dtype == bank.dtype == torch.float32 and not torch.onnx.is_in_onnx_export()
            and not torch.jit.is_tracing() and not (torch.is_grad_enabled()
                                                     and (queries.requires_grad or bank.requires_grad)))


def squared_distances(
    queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """(Q, B): ||q - b||^2 for every pair, as a matrix product. Not clamped: rounding can leave a tiny
    negative value (a point against itself); `root` clamps. A TopK over it picks the same values either
    way, so callers that only take values clamp after their TopK (the exported graph keeps its order)."""
    if bank_norms is None:
        bank_norms = squared_norms(bank)
    return bank_terms(queries, bank, bank_norms) + (queries * queries).sum(dim=1, keepdim=True)


def root(squared: torch.Tensor) -> torch.Tensor:
    """Euclidean distances from squared ones: negative rounding residue clamped to 0, then exact_sqrt."""
    return exact_sqrt(squared.clamp_min(0.0))


def nearest(
    queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor, max_elements: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance and index of the nearest bank row for every query: a matrix product and a
    minimum, block by block (blocks of at most `max_elements` distances, default MAX_BLOCK_ELEMENTS)."""
    rows = max(1, (max_elements or MAX_BLOCK_ELEMENTS) // max(1, len(bank)))
    distances, indices = [], []
    # The exported graph scores one image: all its queries in one block. (A traced split would fix the
    # block sizes in the graph, which onnxruntime then refuses: a bank over MAX_BLOCK_ELEMENTS / patches.)
    whole = len(queries) <= rows or torch.onnx.is_in_onnx_export()
    for block in [queries] if whole else queries.split(rows):
        openblas = _on_openblas(block, bank)  # decided once: the product and the minimum go the same way
        best, index = _row_minimum(_bank_terms(block, bank, bank_norms, openblas), numpy_pass=openblas)
        # ||q||^2 added to the minimum alone (B times fewer additions): the same value as adding it
        # first and taking the minimum, since rounding is monotone (x <= y gives fl(x + c) <= fl(y + c)).
        # The index is the true minimum's; adding first could tie two values and pick the lower index.
        distances.append(root(best + squared_norms(block)))
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def _row_minimum(terms: torch.Tensor, numpy_pass: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's minimum and the index of its first occurrence. numpy's argmin gives the same value and
    index as torch's min (a minimum is exact; both take the first of tied values) in a third of its time
    on the CPU (a vectorised pass; torch's min with indices is not)."""
    if not numpy_pass:
        return terms.min(dim=1)
    import numpy as np

    values = terms.numpy()
    index = values.argmin(axis=1)
    return torch.from_numpy(np.take_along_axis(values, index[:, None], axis=1)[:, 0]), torch.from_numpy(index)

