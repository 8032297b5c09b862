"""The nearest-neighbour search under `numerics: strict`: MKL's vendor-neutral path against OpenBLAS's Haswell kernels.

Times stages.methods.neighbours.nearest (each query's nearest bank row: a matrix product and a row
minimum, block by block) as the pipeline runs it under strict numerics (numpy's OpenBLAS pinned to its
Haswell kernels, numpy's argmin), against the way it ran before (torch.addmm on MKL in its COMPATIBLE
mode, torch's min), at PatchCore's shapes: one test image's patches against the bank of 391 training
images, for EfficientNet-Lite0 at 256 px (bench/compare_anomalib.py's 128-d bank) and WideResNet50 at
224 px (the paper configuration's 1024-d bank). Random features (the time depends on the shapes only);
the best of --repeats runs; both ways must pick the same bank rows (checked).

    python bench/nn_product.py --json bench/results/nn_product.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import stages  # noqa: E402,F401  (applies ./params.yaml's numerics before torch is imported)
from stages.core import numerics  # noqa: E402

# (name, queries per image, bank rows, dimension): 10 % of 391 images' patches
SHAPES = [
    ("EfficientNet-Lite0 256 px, 128-d (compare_anomalib)", 1024, 40038, 128),
    ("WideResNet50 224 px, 1024-d (patchcore_paper)", 784, 30654, 1024),
]


def before(queries, bank, bank_norms):
    """The search as it ran before: torch's addmm (MKL) and torch's min, in the same blocks."""
    import torch

    from stages.methods.neighbours import MAX_BLOCK_ELEMENTS, root, squared_norms

    rows = max(1, MAX_BLOCK_ELEMENTS // len(bank))
    distances, indices = [], []
    for block in queries.split(rows):
        best, index = torch.addmm(bank_norms, block, bank.t(), alpha=-2.0).min(dim=1)
        distances.append(root(best + squared_norms(block)))
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def best_of(fn, repeats: int, *args) -> tuple[float, object]:
    result = fn(*args)  # warm-up (thread pools, first-touch pages)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if numerics.active_mode() != "strict":
        raise SystemExit("run it with numerics: strict in ./params.yaml (what it measures)")
    numerics.configure_torch()
    import torch

    from stages.methods.neighbours import nearest, squared_norms

    rows = []
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, n_queries, n_bank, dim in SHAPES:
            queries = torch.randn(n_queries, dim, generator=generator)
            bank = torch.randn(n_bank, dim, generator=generator)
            norms = squared_norms(bank)
            old_s, (old_d, old_i) = best_of(before, args.repeats, queries, bank, norms)
            new_s, (new_d, new_i) = best_of(nearest, args.repeats, queries, bank, norms)
            if not torch.equal(old_i, new_i):
                raise SystemExit(f"{name}: the two ways picked different bank rows")
            rows.append({"shape": name, "queries": n_queries, "bank": n_bank, "dim": dim,
                         "mkl_compatible_ms": round(1000 * old_s, 1), "openblas_haswell_ms": round(1000 * new_s, 1),
                         "speed_up": round(old_s / new_s, 2),
                         "max_abs_distance_difference": float((old_d - new_d).abs().max())})
    print(f"nearest(), {numerics.describe()}, {platform.processor() or platform.machine()}, best of {args.repeats}")
    print("| shape | queries x bank x dim | MKL COMPATIBLE (ms) | OpenBLAS Haswell (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['queries']} x {r['bank']} x {r['dim']} | {r['mkl_compatible_ms']} | "
              f"{r['openblas_haswell_ms']} | {r['speed_up']}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
