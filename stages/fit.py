"""DVC stage `fit@<category>-<model>`: fit one named model on one category's defect-free training data.

Writes the fitted state of each seed to models/<category>.category/<model>.model/seed-<s>/ and the
per-epoch losses of trained methods (dvclive) to plots/<category>.category/<model>.model/train/,
both only once every seed's fit has succeeded. Seeds are fitted one at a time, each saved and
released before the next, so a three-seed fit peaks at one fit's memory (bench/fit_seeds_memory.py).
"""
from __future__ import annotations

import ctypes
import gc
import time
from pathlib import Path

from stages.core.cli import run_main
from stages.core.device import seed_everything
from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path
from stages.data.prepared import read_inputs
from stages.methods.entries import model_from_argv

CURVES = Path("plots/custom")  # where dvclive writes losses.json, under its folder
SPLITS = {"train_loss": "train", "val_loss": "validation"}


def release_memory(device: str) -> None:
    """Give a released detector's memory back before the next seed: Python's cycle collector for any
    reference cycle holding tensors; glibc's malloc_trim, since glibc keeps freed blocks below its
    (self-raising) mmap threshold in its heaps, where the next seed's differently placed blocks do not
    always fit, so the peak would creep up seed by seed; and PyTorch's CUDA cache."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def log_history(history: list[dict], directory: Path) -> None:
    """Per-epoch losses as one DVC plot, so `dvc plots show` draws each model's learning curve.

    One long-form file (epoch, split, loss) puts the training and validation loss on one chart (its
    template is .dvc/plots/learning_curve.json). dvclive also writes metrics.json (the last epoch's
    losses; `{}` for methods that do not train). The curve folder always exists, empty for kNN and
    PatchCore: DVC needs the declared output.
    """
    from dvclive import Live

    with Live(str(directory), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        for row in history:
            for key in SPLITS:
                if row.get(key) is not None:
                    live.log_metric(key, row[key], plot=False)
            live.next_step()
        losses = [
            {"epoch": row["epoch"], "split": split, "loss": row[key]}
            for row in history
            for key, split in SPLITS.items()
            if row.get(key) is not None
        ]
        if losses:
            live.log_plot("losses", losses, x="epoch", y="loss")
    (directory / CURVES).mkdir(parents=True, exist_ok=True)


def main() -> None:
    _, config, device = model_from_argv("fit")
    inputs = read_inputs(config.features)
    train, val = config.load_inputs("train"), config.load_inputs("val")
    seconds, history = [], None
    # One seed at a time: each fit is saved as soon as it is done and released before the next, so the
    # stage's peak memory is one fit's, whatever the number of seeds (a PaDiM state is GBs). The seeds are
    # written into one temporary folder that becomes models/.../<model>.model only when every seed has
    # succeeded: DVC never sees (or caches) a folder with some seeds missing.
    with atomic_path(config.directory) as model_dir:
        for seed in config.seeds:  # every seed of fit_seeds if the fit draws random numbers, else one
            seed_everything(seed)
            detector = config.build(device, seed)
            detector.inputs = inputs
            start = time.perf_counter()
            try:
                detector.fit(train, val)
            except PipelineError as exc:
                raise PipelineError(f"models.{config.name} ({config.category}, seed {seed}): {exc}") from exc
            seconds.append(time.perf_counter() - start)
            detector.save(model_dir / config.seed_directory(seed).name)
            if history is None:
                history = detector.history  # the learning curves of the first seed
            del detector
            release_memory(device)
        with atomic_path(config.plots / "train") as curves:
            log_history(history, curves)
    times = ", ".join(f"{s:.1f}s" for s in seconds)
    print(
        f"fitted {config.stage} ({config.method} on {config.backbone}), seed(s) {config.seeds} in {times} "
        f"-> {config.directory}"
    )


if __name__ == "__main__":
    run_main(main)
