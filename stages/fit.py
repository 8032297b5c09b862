"""DVC stage `fit@<model>`: fit one named model on defect-free training data; state -> models/<model>/."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from stages.common import PipelineError, atomic_path, load_params, param, resolve_device, run_main, seed_everything
from stages.models import model_config

PLOTS_ROOT = Path("plots")
CURVES = Path("plots/metrics")  # where dvclive writes one .tsv per logged metric


def log_history(history: list[dict], directory: Path) -> None:
    """Per-epoch losses as DVC plots (dvclive), so `dvc plots show` draws the learning curves.

    Methods that do not train (kNN, PatchCore) leave an empty curve folder: DVC needs the output.
    """
    from dvclive import Live

    (directory / CURVES).mkdir(parents=True, exist_ok=True)
    if not history:
        return
    with Live(str(directory), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        for row in history:
            for key in ("train_loss", "val_loss"):
                if row.get(key) is not None:
                    live.log_metric(key, row[key])
            live.next_step()


def main() -> None:
    if len(sys.argv) != 2:
        raise PipelineError("usage: python -m stages.fit <model name from params.yaml models>")
    name = sys.argv[1]
    params = load_params()
    config = model_config(params, name)
    device = resolve_device(param(params, "device", "auto"))
    seed_everything(config.hparams.get("seed", 0))

    detector = config.build(device)
    train = config.load_inputs("train")
    val = config.load_inputs("val")
    start = time.perf_counter()
    try:
        detector.fit(train, val)
    except PipelineError as exc:
        raise PipelineError(f"models.{name}: {exc}") from exc
    seconds = time.perf_counter() - start

    with atomic_path(config.directory) as out:
        detector.save(out)
    train_dir = PLOTS_ROOT / name / "train"
    with atomic_path(train_dir) as tmp:
        log_history(detector.history, tmp)
    print(f"fitted {name} ({config.method} on {config.backbone}) in {seconds:.1f}s -> {config.directory}")


if __name__ == "__main__":
    run_main(main)
