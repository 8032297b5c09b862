"""DVC stage `report`: every category x model -> metrics/summary.{json,md,csv} and metrics/categories.csv.

- summary.md: one table per headline metric (image AUROC, pixel AUROC, AUPRO) with a row per
  category and the mean over categories, models as columns (the layout of the PatchCore and
  anomalib papers' tables), then every metric of every category x model.
- categories.csv: the same per-metric tables as CSV (metric, category, one column per model).
- summary.csv: one row per category x model with every metric, plus one `mean` row per model;
  drawn by the top-level DVC plots `summary` (the means) and `categories` (the table as a heatmap).
- summary.json: {"mean": {model: {...}}, "categories": {category: {model: {...}}}}.

A mean is over every listed category; it is null when a category lacks the metric (no masks,
no anomaly maps), rather than a mean of fewer categories that reads like a full one.
"""
from __future__ import annotations

import json

from stages.cli import run_main
from stages.errors import PipelineError
from stages.outputs import atomic_path, write_csv, write_json
from stages.params import load_params, param
from stages.paths import SUMMARY_ROOT as OUTPUT, metrics_file

HEADLINE = {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC", "aupro": "AUPRO"}
COLUMNS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "threshold_precision",
    "threshold_recall",
    "threshold_f1",
)
MEAN = "mean"


def summary_rows(categories: list[str], names: list[str]) -> list[dict]:
    """One row per category x model, in params.yaml order."""
    rows = []
    for category in categories:
        for name in names:
            path = metrics_file(category, name)
            if not path.is_file():
                raise PipelineError(f"{path}: metrics missing (run evaluate@{category}-{name})")
            result = json.loads(path.read_text())
            row = {"category": category, "model": name, "method": result["method"], "backbone": result["backbone"]}
            row.update({column: result.get(column) for column in COLUMNS})
            row.update({f"auroc_{k}": v for k, v in sorted(result.get("per_defect_auroc", {}).items())})
            rows.append(row)
    return rows


def mean_rows(rows: list[dict], names: list[str]) -> list[dict]:
    means = []
    for name in names:
        mine = [row for row in rows if row["model"] == name]
        mean = {"category": MEAN, "model": name, "method": mine[0]["method"], "backbone": mine[0]["backbone"]}
        for column in COLUMNS:
            values = [row[column] for row in mine]
            mean[column] = None if any(v is None for v in values) else sum(values) / len(values)
        means.append(mean)
    return means


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def metric_tables(rows: list[dict], means: list[dict], categories: list[str], names: list[str]) -> list[dict]:
    """Per headline metric: a row per category (and the mean), a column per model."""
    value = {(row["category"], row["model"]): row for row in [*rows, *means]}
    return [
        {"metric": metric, "category": category, **{name: value[category, name][metric] for name in names}}
        for metric in HEADLINE
        for category in [*categories, MEAN]
    ]


def markdown(rows, tables, categories, names) -> str:
    parts = []
    for metric, title in HEADLINE.items():
        table = [{**t, "category": f"**{MEAN}**" if t["category"] == MEAN else t["category"]}
                 for t in tables if t["metric"] == metric]
        parts.append(f"## {title}\n\n" + markdown_table(table, ["category", *names]))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    parts.append("## Every metric, per category and model\n\n" + markdown_table(rows, columns))
    counted = f"{len(names)} model{'s' * (len(names) != 1)} on {len(categories)} categor{'ies' if len(categories) != 1 else 'y'}"
    return f"# {counted}\n\n" + "\n".join(parts)


def main() -> None:
    params = load_params()
    names = list(param(params, "models"))
    categories = list(param(params, "data.categories"))
    if not names:
        raise PipelineError("models: no models configured")
    rows = summary_rows(categories, names)
    means = mean_rows(rows, names)
    tables = metric_tables(rows, means, categories, names)

    write_json(OUTPUT / "summary.json", {
        MEAN: {m["model"]: {c: m[c] for c in COLUMNS} for m in means},
        "categories": {c: {r["model"]: {k: v for k, v in r.items() if k not in ("category", "model")}
                           for r in rows if r["category"] == c} for c in categories},
    })
    text = markdown(rows, tables, categories, names)
    with atomic_path(OUTPUT / "summary.md") as tmp:
        tmp.write_text(text)
    all_rows = [*rows, *means]
    write_csv(OUTPUT / "summary.csv", all_rows, list(dict.fromkeys(key for row in all_rows for key in row)))
    write_csv(OUTPUT / "categories.csv", tables, ["metric", "category", *names])
    print(text)


if __name__ == "__main__":
    run_main(main)
