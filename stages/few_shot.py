"""Collect a few-shot sweep into one table: image and pixel AUROC per model vs training images.

    for n in 1 2 4 8 16 32; do dvc exp run --queue -S preprocess.max_train=$n; done
    dvc queue start --jobs 1 && dvc queue status    # wait until all are done
    python -m stages.few_shot                      # -> plots/few_shot.csv (docs/how-to/share-and-sweep.md)

Collects the first category of data.categories. Reads every experiment of the current commit (and the
workspace) through `dvc.api.exp_show`, so
the rows are exactly what DVC recorded; each model's metrics file says how many good images it was
fitted on (`n_train`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.core.cli import run_main
from stages.core.errors import PipelineError
from stages.core.outputs import write_csv
from stages.core.params import load_params, param
from stages.core.paths import PLOTS_ROOT, metrics_file

OUTPUT = PLOTS_ROOT / "few_shot.csv"
METRICS = ("image_auroc", "pixel_auroc")
COLUMNS = ("model", "n_train", *METRICS)  # the table's header: what --out may replace


def _number(value):
    """A metric as exp_show gives it, or None where it has none: DVC shows '!' for a run whose metrics file is
    missing (a commit before any `dvc repro`, a failed or queued experiment) and '-' for an absent key."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def sweep_rows(experiments: list[dict], category: str, models: list[str]) -> list[dict]:
    """exp_show rows -> one row per (model, number of training images), first seen wins; runs without
    metrics are skipped."""
    rows, seen = [], set()
    for experiment in experiments:
        for model in models:
            prefix = f"{metrics_file(category, model)}:"
            n_train = _number(experiment.get(prefix + "n_train"))
            if n_train is None or (model, int(n_train)) in seen:
                continue
            seen.add((model, int(n_train)))
            rows.append({"model": model, "n_train": int(n_train),
                         **{m: _number(experiment.get(prefix + m)) for m in METRICS}})
    return sorted(rows, key=lambda r: (models.index(r["model"]), r["n_train"]))


def existing_rows(path) -> int:
    """Data rows of the table already at `path` (0 when there is none). Anything else there is refused,
    whatever its length: --out replaces its own table only, never a user's file."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return 0
    header = ",".join(COLUMNS)
    if not path.is_file():  # a folder, FIFO or device: never opened (a FIFO would block)
        raise PipelineError(f"{path}: exists and is not a file; left as it is (choose another --out)")
    with open(path, "rb") as fh:
        first = fh.readline(len(header) + 3).decode("utf-8", "replace").rstrip("\r\n")
        rows = sum(1 for _ in fh)
    if first != header:
        raise PipelineError(f"{path}: exists and is not a few-shot table (its first line is not {header}); left as it "
                            "is (choose another --out, or move it away)")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.few_shot",
        description=__doc__.split("\n\n")[0],
        epilog="the sweep it collects:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=OUTPUT, help=f"where to write the table (default: {OUTPUT})")
    parser.add_argument(
        "--allow-fewer",
        action="store_true",
        help="write even when the experiments found give fewer rows than the table already holds "
        "(otherwise it is left as it is: a fresh clone or a `dvc queue remove` has fewer)",
    )
    args = parser.parse_args(argv)
    held = existing_rows(args.out)  # before the (slow) experiment scan: a foreign file is refused at once
    import dvc.api

    params = load_params()
    models, category = list(param(params, "models")), param(params, "data.categories")[0]
    experiments = dvc.api.exp_show()
    rows = sweep_rows(experiments, category, models)
    sizes = sorted({r["n_train"] for r in rows})
    found = (
        f"{len(experiments)} experiment(s) and the workspace give {len(rows)} row(s) for {category}: "
        f"{len(sizes)} size(s) ({', '.join(map(str, sizes)) or 'none'}) x {len({r['model'] for r in rows})} model(s)"
    )
    print(found)
    if not rows:
        raise PipelineError("no experiment has metrics yet: run the sweep first (see python -m stages.few_shot --help)")
    if len(rows) < held and not args.allow_fewer:
        raise PipelineError(
            f"{args.out}: holds {held} rows, the experiments found give {len(rows)}; left as it is "
            "(run the sweep, or pass --allow-fewer to replace it)"
        )
    write_csv(args.out, rows, list(COLUMNS))
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    run_main(main)
