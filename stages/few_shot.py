"""Collect a few-shot sweep into one table: image and pixel AUROC per model vs training images.

    for n in 1 2 4 8 16 32; do dvc exp run --queue -S preprocess.max_train=$n; done
    dvc queue start --jobs 1 && dvc queue status    # wait until all are done
    python -m stages.few_shot                      # -> plots/few_shot.csv, drawn by `dvc plots show`

Collects the first category of data.categories. Reads every experiment of the current commit (and the workspace) through `dvc.api.exp_show`, so
the rows are exactly what DVC recorded; each model's metrics file says how many good images it was
fitted on (`n_train`).
"""
from __future__ import annotations

from stages.common import PipelineError, load_params, param, run_main, write_csv
from stages.paths import PLOTS_ROOT, metrics_file

OUTPUT = PLOTS_ROOT / "few_shot.csv"
METRICS = ("image_auroc", "pixel_auroc")


def sweep_rows(experiments: list[dict], category: str, models: list[str]) -> list[dict]:
    """exp_show rows -> one row per (model, number of training images), first seen wins."""
    rows, seen = [], set()
    for experiment in experiments:
        for model in models:
            prefix = f"{metrics_file(category, model)}:"
            n_train = experiment.get(prefix + "n_train")
            if n_train is None or (model, int(n_train)) in seen:
                continue
            seen.add((model, int(n_train)))
            rows.append({"model": model, "n_train": int(n_train), **{m: experiment.get(prefix + m) for m in METRICS}})
    return sorted(rows, key=lambda r: (models.index(r["model"]), r["n_train"]))


def main() -> None:
    import dvc.api

    params = load_params()
    models, category = list(param(params, "models")), param(params, "data.categories")[0]
    rows = sweep_rows(dvc.api.exp_show(), category, models)
    if not rows:
        raise PipelineError("no experiment has metrics yet: run the sweep first (see python -m stages.few_shot --help)")
    write_csv(OUTPUT, rows, ["model", "n_train", *METRICS])
    print(f"{len(rows)} rows ({len({r['n_train'] for r in rows})} sizes x {len(models)} models) -> {OUTPUT}")


if __name__ == "__main__":
    run_main(main)
