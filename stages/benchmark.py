"""What each model costs, measured on this machine: fit time and memory, scoring time per image on
both runtimes, size on disk, and how far the ONNX graph is from torch.

    python -m stages.benchmark                        # every model of params.yaml, first category
    python -m stages.benchmark --models patchcore_effnet --repeats 5 --out bench/results/cost

Run it after `dvc repro` (it reads the fitted and exported models and the prepared test images). It
writes nothing `dvc repro` writes, and times vary from run to run (so they stay out of the
pipeline's byte-identical outputs): OUT.json (every number, with the machine, the date, the load
and the numerics mode), OUT.md (the table docs/explanation/performance.md shows) and OUT.png (accuracy against latency).

- fit: `python -m stages.fit` of the model run again in a scratch copy of the project's inputs,
  in its own process: wall seconds (all seeds, interpreter start included) and that process's peak RSS;
- scoring: ms per test image on the prepared test images, backbone included, after one warm-up
  pass, the median of `--repeats` passes: torch (the pipeline's code, as predict runs it) and onnx
  (the exported graph in onnxruntime);
- size: the fitted model (every seed) and the exported graph;
- parity: the largest relative score difference and absolute map difference, onnx against torch.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stages.core import numerics
from stages.core.cli import run_main
from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path, write_json
from stages.core.params import load_params, param
from stages.core.paths import MODELS_ROOT, export_dir, metrics_file, model_dir, pixels_dir
from stages.data.prepared import load_split
from stages.deploy.onnx_model import OnnxModel
from stages.deploy.parity import parity
from stages.deploy.torch_model import FittedModel

DEFAULT_OUT = Path("bench/results/cost")


def machine() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numerics": numerics.describe(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg())}


def folder_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def measure_fit(category: str, name: str) -> dict:
    """The fit stage again, in a scratch copy of what it reads, in a child process of its own."""
    with tempfile.TemporaryDirectory(prefix="benchmark-fit-") as scratch:
        scratch = Path(scratch)
        shutil.copy("params.yaml", scratch / "params.yaml")
        shutil.copytree(
            Path("data/features") / f"{category}.category", scratch / "data/features" / f"{category}.category"
        )
        if Path("weights").is_dir():
            shutil.copytree("weights", scratch / "weights")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), TQDM_DISABLE="1")
        # the stage as `python -m stages.fit` runs it, reporting its own peak RSS when it ends
        script = (
            "import resource, runpy, sys\n"
            f"sys.argv = ['stages.fit', {category!r}, {name!r}]\n"
            "try:\n    runpy.run_module('stages.fit', run_name='__main__')\n"
            "finally:\n    print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        )
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", script], cwd=scratch, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        lines = result.stderr.strip().splitlines()
        if result.returncode != 0 or not lines or not lines[-1].startswith("peak_kib "):
            raise PipelineError(f"benchmark: the fit of {name} failed: {(lines or ['?'])[-2:]}")
    return {"fit_s": round(wall, 1), "fit_peak_rss_mib": round(int(lines[-1].split()[1]) / 1024)}


def ms_per_image(model, images: np.ndarray, names: list[str], repeats: int) -> float:
    model.score(images[:2], names[:2])  # warm-up: the first pass allocates and initialises
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.score(images, names)
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)) / len(images), 1)


def measure(category: str, name: str, repeats: int, test) -> dict:
    fit = measure_fit(category, name)
    torch_model, onnx_model = FittedModel.load(category, name), OnnxModel.load(category, name)
    found = parity(torch_model, onnx_model, test.images, test.names)
    metrics = json.loads(metrics_file(category, name).read_text())
    return {
        "model": name,
        "method": torch_model.detector.method,
        "category": category,
        **fit,
        "torch_ms_per_image": ms_per_image(torch_model, test.images, test.names, repeats),
        "onnx_ms_per_image": ms_per_image(onnx_model, test.images, test.names, repeats),
        "model_mib": round(folder_mib(model_dir(category, name)), 2),
        "seeds": len(metrics["seeds"]),
        "onnx_mib": round(folder_mib(export_dir(category, name)), 2),
        "onnx_score_rel_diff": found["score_rel"],
        "onnx_map_abs_diff": found.get("map_abs"),
        "map_max": found.get("map_max"),
        "image_auroc": metrics.get("image_auroc"),
        "pixel_auroc": metrics.get("pixel_auroc"),
    }


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores), numerics {info['numerics']}, "
        f"load before {info['load_before']}, {info['images']} test images of {info['size']} px "
        f"(`python -m stages.benchmark`).",
        "",
        "| model | method | fit (s, all seeds) | fit peak RSS (MiB) | torch ms / image | onnx ms / image | "
        "model on disk (MiB) | exported (MiB) | onnx vs torch: score rel. / map abs. | image AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = f"{r['onnx_score_rel_diff']:.1e}" + (
            f" / {r['onnx_map_abs_diff']:.1e}" if r["onnx_map_abs_diff"] is not None else ""
        )
        auroc = "–" if r["image_auroc"] is None else f"{r['image_auroc']:.3f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['fit_s']} ({r['seeds']}) | {r['fit_peak_rss_mib']} | "
            f"{r['torch_ms_per_image']} | {r['onnx_ms_per_image']} | {r['model_mib']} | {r['onnx_mib']} | "
            f"{diff} | {auroc} |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    from stages.plotting.style import colour, plt, save_png

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(rows):
        if r["image_auroc"] is None:
            continue
        for runtime, marker in (("torch", "o"), ("onnx", "s")):
            ax.scatter(
                r[f"{runtime}_ms_per_image"],
                r["image_auroc"],
                color=colour(i),
                marker=marker,
                s=40,
                label=f"{r['model']} ({runtime})",
            )
    ax.set_xscale("log")
    ax.set_xlabel("ms per test image (log scale), backbone included")
    ax.set_ylabel("image AUROC (mean over seeds)")
    ax.set_title("Accuracy against latency (circles: torch, squares: onnx)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="model names of params.yaml (default: all)")
    parser.add_argument("--category", help="default: the first of data.categories")
    parser.add_argument("--repeats", type=int, default=3, help="timed scoring passes per model and runtime (median)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"writes OUT.json, OUT.md, OUT.png (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    params = load_params()
    category = args.category or param(params, "data.categories")[0]
    names = args.models or list(param(params, "models"))
    unknown = [n for n in names if n not in params["models"]]
    if unknown:
        raise PipelineError(f"--models: {', '.join(unknown)} not in params.yaml (known: {', '.join(params['models'])})")
    if not MODELS_ROOT.is_dir():
        raise PipelineError("models/: nothing fitted yet (run `dvc repro` first)")
    test = load_split(pixels_dir(category) / "test.npz")
    info = {**machine(), "images": len(test), "size": test.image_size[0], "category": category}
    rows = []
    for name in names:
        rows.append(measure(category, name, args.repeats, test))
        print(json.dumps(rows[-1]))
    write_json(args.out.with_suffix(".json"), {"machine": info, "models": rows})
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(rows, info))
    chart(rows, args.out.with_suffix(".png"))
    print(markdown(rows, info))


if __name__ == "__main__":
    run_main(main)
