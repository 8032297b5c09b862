"""Peak memory and time of a PaDiM fit (and scoring) on random features of a backbone's shapes.

Memory grows with positions x d^2 (a d x d covariance per position of the finest grid): at 224 px,
WideResNet50 layer1-3 give 56 x 56 = 3136 positions of 256 + 512 + 1024 = 1792 channels. Features are
random tensors of the cached shapes and dtype (extraction is not measured: DVC caches it). One
configuration per process, so the process's peak RSS is the fit's; run it under /usr/bin/time -v
for the kernel's own count ("Maximum resident set size"):

    /usr/bin/time -v python bench/padim_memory.py --dimensions 100
    /usr/bin/time -v python bench/padim_memory.py --dimensions 550
    /usr/bin/time -v python bench/padim_memory.py --dimensions 550 --positions-per-pass 784
    python bench/padim_memory.py --shapes efficientnet_lite0 --dimensions 100 --device cuda

Prints one JSON line: the RSS before the fit (torch + the features), the peak after the fit and
after scoring, the fitted state's size, the times, and on CUDA the peak allocated GPU memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

SHAPES = {  # cached mid-level maps: (channels, stride)
    "wide_resnet50_2": [(256, 4), (512, 8), (1024, 16)],  # layer1, layer2, layer3
    "resnet18": [(64, 4), (128, 8), (256, 16)],
    "efficientnet_lite0": [(40, 8), (112, 16)],  # blocks.2, blocks.4
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="wide_resnet50_2")
    parser.add_argument("--dimensions", type=int, default=100, help="fit.dimensions (0: all channels)")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=16, help="images scored after the fit (0: none)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--positions-per-pass", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32",
                        help="of the cached maps (the extract stage writes float32)")
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stages.features.cache import FeatureSet
    from stages.methods.padim import PaDiM

    def features(n: int, seed: int) -> FeatureSet:
        g = torch.Generator().manual_seed(seed)
        size = args.image_size
        # drawn in the cache's dtype directly: a draw in another one and a cast would raise the peak
        # before the fit starts
        dtype = getattr(torch, args.cache_dtype)
        maps = {f"layer{i + 1}": torch.randn(n, c, size // s, size // s, generator=g, dtype=dtype)
                for i, (c, s) in enumerate(SHAPES[args.shapes])}
        return FeatureSet(torch.zeros(n, 1), maps, (size, size), [str(i) for i in range(n)])

    train = features(args.n_train, 0)
    before_mib = peak_mib()
    fit = {"dimensions": args.dimensions or None, "batch_size": args.batch_size,
           "positions_per_pass": args.positions_per_pass}
    model = PaDiM(fit=fit, score={"batch_size": args.batch_size}, device=args.device)
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    fit_peak_mib = peak_mib()
    gpu_fit_mib = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    state_mib = sum(t.numel() * t.element_size() for t in (model.mean, model.whitening, model.dims)) / 2**20
    score_s = None
    if args.n_test:
        test = features(args.n_test, 1)
        start = time.perf_counter()
        model.predict(test)
        score_s = time.perf_counter() - start
    positions = (args.image_size // SHAPES[args.shapes][0][1]) ** 2
    print(json.dumps({
        "shapes": args.shapes, "image_size": args.image_size, "n_train": args.n_train, "positions": positions,
        "channels": sum(c for c, _ in SHAPES[args.shapes]), "dimensions": len(model.dims),
        "batch_size": args.batch_size, "positions_per_pass": args.positions_per_pass, "device": args.device,
        "cache_dtype": args.cache_dtype,
        "rss_before_fit_mib": round(before_mib), "rss_peak_after_fit_mib": round(fit_peak_mib),
        "rss_peak_after_scoring_mib": round(peak_mib()), "state_mib": round(state_mib),
        "gpu_peak_fit_mib": None if gpu_fit_mib is None else round(gpu_fit_mib),
        "fit_s": round(fit_s, 1), "score_s": None if score_s is None else round(score_s, 2), "n_test": args.n_test,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
