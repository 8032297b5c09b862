"""Peak memory of the fit stage with one seed and with three: `python -m stages.fit` itself, on cached
features of a backbone's shapes (random values, float32 as the extract stage writes them).

The fit stage holds one seed at a time (each saved, then released before the next), so a three-seed
fit should peak where a one-seed fit does; a stage that kept every fitted detector until the end
would add (seeds - 1) fitted states. Each fit runs in its own process; its peak resident memory is
the kernel's count for that process (wait4). `--code` runs another checkout's stages on the same
features, for the figure before a change:

    python bench/fit_seeds_memory.py --method padim --images 200 --image-size 224 --dimensions 550
    python bench/fit_seeds_memory.py --method patchcore --images 200 --image-size 224
    python bench/fit_seeds_memory.py --method padim --images 40 --image-size 112 --dimensions 300 --code /path/to/old

Prints one JSON line per run: the method and sizes, the peak RSS of the one- and the three-seed fit,
their difference, the size of one fitted state on disk, the times and the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # WideResNet50's cached maps: (channels, stride)
    "padim": {"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16)},  # PaDiM's layer1-3
    "patchcore": {"layer2": (512, 8), "layer3": (1024, 16)},  # PatchCore's layer2 + layer3
}
CATEGORY, BACKBONE, MODEL = "carpet", "wide_resnet50_2", "m"


def model_entry(args) -> dict:
    """The paper configurations' model (configs/padim_paper.yaml, configs/patchcore_paper.yaml)."""
    config = yaml.safe_load((REPO / "configs" / f"{args.method}_paper.yaml").read_text())
    entry = next(iter(config["models"].values()))
    entry = {key: entry[key] for key in ("method", "fit", "score")}
    if args.method == "padim":
        entry["fit"]["dimensions"] = args.dimensions
    return {**entry, "backbone": BACKBONE}


def write_features(project: Path, args) -> None:
    import torch

    from stages.core.paths import features_dir
    from stages.data.prepared import write_inputs
    from stages.features.cache import FeatureSet, save_features

    folder = project / features_dir(CATEGORY, BACKBONE)
    folder.mkdir(parents=True)
    size = args.image_size
    for split, n, seed in (("train", args.images, 0), ("val", 2, 1)):
        g = torch.Generator().manual_seed(seed)
        maps = {layer: torch.randn(n, c, size // s, size // s, generator=g)
                for layer, (c, s) in SHAPES[args.method].items()}
        save_features(folder / f"{split}.pt", FeatureSet(torch.randn(n, 2048, generator=g), maps, (size, size),
                                                         [f"{split}/{i:03d}.png" for i in range(n)]))
    recipe = {"name": BACKBONE, "arch": BACKBONE, "layers": list(SHAPES[args.method]), "weights": None}
    write_inputs(folder, {"resize": size, "crop_size": size}, recipe, args.images)


def fit(project: Path, seeds: list[int], code: Path) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["fit_seeds"] = seeds
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.rmtree(project / "models", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(code), TQDM_DISABLE="1")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "stages.fit", CATEGORY, MODEL], cwd=project, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"fit with seeds {seeds} failed: {stderr.decode(errors='replace').strip()[-500:]}")
    states = sorted((project / "models").rglob("model.pt"))
    return {"peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "seconds": round(time.perf_counter() - start, 1),
            "state_gib": round(states[0].stat().st_size / 2**30, 3), "states": len(states)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(SHAPES), required=True)
    parser.add_argument("--images", type=int, default=200, help="training images")
    parser.add_argument("--image-size", type=int, default=224, help="side of the (cropped) images")
    parser.add_argument("--dimensions", type=int, default=550, help="PaDiM's random channels (d)")
    parser.add_argument("--code", default=str(REPO), help="the checkout whose stages/ runs the fit")
    parser.add_argument("--numerics", choices=("strict", "fast"), default="strict")
    parser.add_argument("--workdir", help="where the project is built (default: a temporary folder)")
    parser.add_argument("--out", help="also append the JSON line to this file")
    args = parser.parse_args()

    project = Path(args.workdir or tempfile.mkdtemp(prefix="fit-seeds-"))
    project.mkdir(parents=True, exist_ok=True)
    try:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params.update(device="cpu", numerics=args.numerics)
        params["data"]["categories"] = [CATEGORY]
        params["backbones"] = {BACKBONE: {"layers": list(SHAPES[args.method])}}
        params["models"] = {MODEL: model_entry(args)}
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        write_features(project, args)
        load = os.getloadavg()
        one, three = fit(project, [0], Path(args.code)), fit(project, [0, 1, 2], Path(args.code))
        result = {
            "method": args.method, "images": args.images, "image_size": args.image_size,
            "dimensions": args.dimensions if args.method == "padim" else None, "numerics": args.numerics,
            "code": str(Path(args.code).resolve()), "one_seed": one, "three_seeds": three,
            "extra_gib": round(three["peak_rss_gib"] - one["peak_rss_gib"], 3),
            "load": [round(x, 2) for x in (*load, *os.getloadavg())], "cores": os.cpu_count(),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(project, ignore_errors=True)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
