"""DVC stage `summary_figure`: image AUROC, pixel AUROC and AUPRO of every model as one bar chart.

Writes plots/summary.png from metrics/summary.json: the mean over data.categories (with one
category, that category's numbers), the metrics named as in the report, AUPRO with its
evaluate.fpr_limit. The README shows it. `dvc plots show` also
draws the same numbers interactively from metrics/summary.csv (top-level plot `summary`).
"""
from __future__ import annotations

import json

from stages.core.cli import run_main
from stages.core.errors import PipelineError
from stages.core.params import load_params, param
from stages.core.paths import PLOTS_ROOT, SUMMARY_ROOT
from stages.evaluation.metrics import HEADLINE_METRICS, METRIC_TITLES

OUTPUT = PLOTS_ROOT / "summary.png"


def main() -> None:
    from stages.plotting.charts import summary_figure
    from stages.plotting.style import save_png

    fpr_limit = param(load_params(), "evaluate.fpr_limit")  # what evaluate integrated AUPRO up to
    titles = {metric: METRIC_TITLES[metric] for metric in HEADLINE_METRICS}
    titles["aupro"] += f" (FPR ≤ {fpr_limit:g})"
    path = SUMMARY_ROOT / "summary.json"
    if not path.is_file():
        raise PipelineError(f"{path}: summary missing (run the report stage)")
    summary = json.loads(path.read_text())
    rows, categories = summary["mean"], list(summary["categories"])
    title = categories[0] if len(categories) == 1 else f"mean over {len(categories)} categories"
    save_png(summary_figure(rows, title, titles), OUTPUT)
    print(f"summary_figure: {len(rows)} models -> {OUTPUT}")


if __name__ == "__main__":
    run_main(main)
