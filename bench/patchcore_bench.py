"""Time PatchCore fit and scoring, and record peak memory, as the number of training images grows.

Each size runs in a fresh process so its peak RSS is its own: "fit peak" is the process's peak
RSS right after the fit (torch, the input features and the fit itself), "added" what fit + scoring
add on top of the RSS after importing torch and building the features. Features are random
tensors with the shapes a backbone gives at the image size (strides 8 and 16; extraction itself
is not timed: DVC caches it).

    python bench/patchcore_bench.py                       # efficientnet_lite0 shapes, 25/50/100/200, 224 px
    python bench/patchcore_bench.py --sizes 50 100 200 391 --image-size 256
    python bench/patchcore_bench.py --shapes wide_resnet50_2 --sizes 25 50
    python bench/patchcore_bench.py --sizes 200 --image-size 256 --embed-dim 256
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # mid-level maps: (channels, stride)
    "efficientnet_lite0": [(40, 8), (112, 16)],
    "wide_resnet50_2": [(512, 8), (1024, 16)],
}


def run_one(n_train: int, n_test: int, shapes: str, coreset_ratio: float, image_size: int, embed_dim: int) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stages.features.cache import FeatureSet
    from stages.methods.patchcore import PatchCore

    def features(n: int, seed: int) -> FeatureSet:
        g = torch.Generator().manual_seed(seed)
        maps = {
            f"layer{i}": torch.randn(n, c, image_size // stride, image_size // stride, generator=g).half()
            for i, (c, stride) in enumerate(SHAPES[shapes])
        }
        return FeatureSet(torch.zeros(n, 1), maps, (image_size, image_size), [str(i) for i in range(n)])

    train, test = features(n_train, 0), features(n_test, 1)
    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch + the features
    dims = {"pretrain_embed_dimension": embed_dim, "target_embed_dimension": embed_dim}
    model = PatchCore(fit={"coreset_ratio": coreset_ratio, **dims})
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    fit_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    model.predict(test)
    score_s = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n_train": n_train,
        "patches": n_train * (image_size // SHAPES[shapes][0][1]) ** 2,
        "bank": len(model.bank),
        "fit_s": round(fit_s, 1),
        "score_s": round(score_s, 1),
        "score_ms_per_image": round(1000 * score_s / n_test, 1),
        "fit_peak_rss_mib": round(fit_peak_mib),
        "peak_rss_mib": round(peak_mib),
        "added_mib": round(peak_mib - baseline_mib),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="efficientnet_lite0")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--embed-dim", type=int, default=1024, help="pretrain and target embedding dimension")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = parser.parse_args()
    if args.one is not None:
        print(
            json.dumps(run_one(args.one, args.n_test, args.shapes, args.coreset_ratio, args.image_size, args.embed_dim))
        )
        return
    rows = []
    for n in args.sizes:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(n),
            "--n-test",
            str(args.n_test),
            "--shapes",
            args.shapes,
            "--coreset-ratio",
            str(args.coreset_ratio),
            "--image-size",
            str(args.image_size),
            "--embed-dim",
            str(args.embed_dim),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    print(
        f"PatchCore, {args.shapes} feature shapes at {args.image_size} px, embedding {args.embed_dim}, "
        f"coreset {args.coreset_ratio}, {args.n_test} test images\n"
    )
    print(
        "| train images | patches | bank | fit (s) | ms / test image | fit peak RSS (MiB) | added by PatchCore (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n_train']} | {r['patches']} | {r['bank']} | {r['fit_s']} | "
            f"{r['score_ms_per_image']} | {r['fit_peak_rss_mib']} | {r['added_mib']} |"
        )


if __name__ == "__main__":
    main()
