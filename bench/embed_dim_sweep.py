"""PatchCore embedding size on real EfficientNet-Lite0 features: accuracy, speed and memory per dimension.

Generates a synthetic carpet category (stages.data.synthetic: good training images, a test set
with the five defect types and exact masks), preprocesses it at 256 px (resize 256, crop 256),
extracts Lite0 blocks.2 + blocks.4 maps once (cached under --workdir), then fits our PatchCore
(coreset 0.1, defaults otherwise) with pretrain_embed_dimension = target_embed_dimension = each
--dims value, each in a fresh process so its peak RSS is its own, and scores the test set:
image AUROC, pixel AUROC, AUPRO (FPR <= 0.3), fit time, ms per test image (PatchCore scoring of
cached features, anomaly maps included), fit peak RSS (the process right after the fit:
torch, the cached features and the fit). Picks the smallest dimension whose pixel AUROC is
within --tolerance of the largest one's.

    python bench/embed_dim_sweep.py                                    # 200 train, 20 good + 5 x 8 defect test images
    python bench/embed_dim_sweep.py --dims 128 256 384 512 1024 --n-train 200
    python bench/embed_dim_sweep.py --n-train 50 --dims 128 1024      # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_data  # noqa: E402


def run_one(workdir: Path, dim: int, coreset_ratio: float, num_neighbors: int) -> dict:
    import torch

    from stages.features.cache import load_features
    from stages.methods.patchcore import PatchCore

    train, test = load_features(workdir / "features_train.pt"), load_features(workdir / "features_test.pt")
    split = bench_data.load(workdir, "test")
    baseline = bench_data.peak_rss_mib()
    model = PatchCore(
        fit={"coreset_ratio": coreset_ratio, "pretrain_embed_dimension": dim, "target_embed_dimension": dim},
        score={"num_neighbors": num_neighbors},
    )
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    fit_peak = bench_data.peak_rss_mib()
    start = time.perf_counter()
    prediction = model.predict(test)
    score_s = time.perf_counter() - start
    return {
        "dim": dim,
        "bank": len(model.bank),
        **bench_data.metrics(split, prediction.image_scores, prediction.anomaly_maps),
        "fit_s": round(fit_s, 1),
        "score_ms_per_image": round(1000 * score_s / len(test), 1),
        "fit_peak_rss_mib": round(fit_peak),
        "added_by_fit_mib": round(fit_peak - baseline),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256, 384, 512, 1024])
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test-good", type=int, default=20)
    parser.add_argument("--n-test-per-cell", type=int, default=2, help="test images per defect type and level")
    parser.add_argument("--image-size", type=int, default=256, help="generated, resized and cropped size")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--num-neighbors", type=int, default=9)
    parser.add_argument("--tolerance", type=float, default=0.002, help="pixel AUROC below the largest dim's")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/patchcore-bench/embed_dim_sweep"))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one dim, print JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.workdir, args.one, args.coreset_ratio, args.num_neighbors)))
        return

    size = args.image_size
    start = time.perf_counter()
    bench_data.prepare(args.workdir, args.n_train, args.n_test_good, args.n_test_per_cell, size, size, size)
    if not (args.workdir / "features_test.pt").is_file():
        from stages.features.cache import save_features

        model = bench_data.lite0_model()
        for split in ("train", "test"):
            save_features(
                args.workdir / f"features_{split}.pt", bench_data.extract(bench_data.load(args.workdir, split), model)
            )
    print(f"data + features ready in {time.perf_counter() - start:.0f} s ({args.workdir})", file=sys.stderr)

    rows = []
    for dim in args.dims:
        load = bench_data.loadavg()
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(dim),
            "--workdir",
            str(args.workdir),
            "--coreset-ratio",
            str(args.coreset_ratio),
            "--num-neighbors",
            str(args.num_neighbors),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if out.returncode != 0:
            sys.exit(f"dim {dim} failed:\n{out.stderr}")
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "loadavg_before": load})
        print(rows[-1], file=sys.stderr)

    from stages.data.synthetic import DEFAULT_LEVELS

    n_test = args.n_test_good + 5 * len(DEFAULT_LEVELS) * args.n_test_per_cell
    print(
        f"\nPatchCore on EfficientNet-Lite0 blocks.2 + blocks.4 features, {size} px, {args.n_train} train / "
        f"{n_test} test images, coreset {args.coreset_ratio}, {args.num_neighbors} neighbours\n"
    )
    print(
        "| embed dim | bank | image AUROC | pixel AUROC | AUPRO | fit (s) | ms / test image | fit peak RSS (MiB) | "
        "added by fit (MiB) | load avg before |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dim']} | {r['bank']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | "
            f"{r['fit_s']} | {r['score_ms_per_image']} | {r['fit_peak_rss_mib']} | {r['added_by_fit_mib']} | "
            f"{r['loadavg_before']} |"
        )
    largest = max(rows, key=lambda r: r["dim"])
    ok = [r for r in rows if r["pixel_auroc"] >= largest["pixel_auroc"] - args.tolerance]
    chosen = min(ok, key=lambda r: (r["dim"], r["fit_s"]))
    print(
        f"\nsmallest dim with pixel AUROC within {args.tolerance} of dim {largest['dim']} "
        f"({largest['pixel_auroc']:.4f}): {chosen['dim']} ({chosen['pixel_auroc']:.4f})"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
