"""PatchCore on the CPU and on a CUDA GPU from the same cached features: same coreset, same metrics, how fast.

Reads what the pipeline caches (an extract stage's features and a preprocess stage's test split),
so it runs where no backbone weights are installed:

    python bench/patchcore_devices.py \\
        --features data/features/carpet.category/efficientnet_lite0.features \\
        --test-split data/features/carpet.category/pixels.features/test.npz --dims 128 1024

For each embedding dimension and device: fit time, ms per test image (PatchCore only: features are
cached), peak GPU memory, image AUROC, pixel AUROC, AUPRO. It also checks on the real training
patches that the coreset's rounds (stages.methods.sampler.greedy_select) pick what the plain
one-pass-per-point loop picks (on the GPU; on the CPU without one), and compares the rounds' picks
on the CPU and on the GPU from the same input.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_data  # noqa: E402  (puts the repository root on sys.path)

from stages.data.prepared import load_split  # noqa: E402
from stages.features.cache import load_features  # noqa: E402
from stages.methods.patchcore import PatchCore  # noqa: E402
from stages.methods.sampler import greedy_select, plain_greedy_select  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, round(time.perf_counter() - start, 2)


def check_rounds(train, devices: list[str], ratio: float) -> dict:
    """The coreset's rounds against the plain loop on the real 128-d training patches (the plain loop
    on the last device only: on a CPU it takes minutes), and the rounds' picks across devices."""
    reduced = torch.cat([e for e, _ in PatchCore(fit={"pretrain_embed_dimension": 128,
                                                      "target_embed_dimension": 128})._batches(train, 8, "embed")])
    result = {"patches": len(reduced)}
    picks = {}
    for device in devices:
        points = reduced.to(device)
        greedy_select(points[:4096], ratio, torch.Generator().manual_seed(0), progress=False)  # warm-up
        picks[device], result[f"rounds_s_{device}"] = _timed(
            device,
            lambda points=points: greedy_select(points, ratio, torch.Generator().manual_seed(0), progress=False),
        )
    device = devices[-1]
    plain, result[f"plain_s_{device}"] = _timed(
        device, lambda: plain_greedy_select(reduced.to(device), ratio, torch.Generator().manual_seed(0)))
    result[f"rounds_equal_plain_{device}"] = bool(torch.equal(picks[device], plain))
    result["selected"] = len(plain)
    if len(devices) > 1:
        result["rounds_common_cpu_cuda"] = len(set(picks["cpu"].tolist()) & set(picks["cuda"].tolist()))
    return result


def run(train, test, split, dim: int, device: str, ratio: float) -> dict:
    params = {"coreset_ratio": ratio, "pretrain_embed_dimension": dim, "target_embed_dimension": dim}
    if device.startswith("cuda"):
        PatchCore(fit=params, device=device).fit(test)  # warm-up: CUDA context, cuBLAS handles
        torch.cuda.reset_peak_memory_stats()
    model = PatchCore(fit=params, device=device)
    _, fit_s = _timed(device, lambda: model.fit(train))
    prediction, score_s = _timed(device, lambda: model.predict(test))
    return {
        "dim": dim, "device": device, "bank": list(model.bank.shape), "fit_s": fit_s,
        "ms_per_test_image": round(1000 * score_s / len(test), 1),
        "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None,
        **bench_data.metrics(split, prediction.image_scores, prediction.anomaly_maps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, required=True, help="an extract stage's .features folder")
    parser.add_argument("--test-split", type=Path, required=True, help="a preprocess stage's test.npz")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    train, test = load_features(args.features / "train.pt"), load_features(args.features / "test.pt")
    split = load_split(args.test_split)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}; "
          f"{len(train)} train / {len(test)} test images at {train.image_size}", flush=True)
    check = check_rounds(train, devices, args.coreset_ratio)
    print("coreset rounds vs plain loop:", check, flush=True)
    rows = []
    for dim in args.dims:
        for device in devices:
            row = run(train, test, split, dim, device, args.coreset_ratio)
            rows.append(row)
            print(row, flush=True)
    print("\n| dim | device | bank | fit (s) | ms / test image | GPU peak (MiB) | image AUROC | pixel AUROC | AUPRO |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dim']} | {r['device']} | {r['bank'][0]} x {r['bank'][1]} | {r['fit_s']} | "
            f"{r['ms_per_test_image']} | "
            f"{r['gpu_peak_mib'] or '-'} | {r['image_auroc']:.4f} | "
            f"{r['pixel_auroc']:.4f} | {r['aupro']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"rounds_check": check, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
