"""DVC stage `report`: every category x model -> metrics/summary.{json,md,csv} and metrics/categories.csv.

- summary.md: one table per headline metric (image AUROC, pixel AUROC, AUPRO) with a row per
  category and the mean over categories, models as columns (the layout of the PatchCore and
  anomalib papers' tables), then every metric of every category x model.
- categories.csv: the same per-metric tables as CSV (metric, category, one column per model).
- summary.csv: one row per category x model with every metric, plus one `mean` row per model;
  drawn by the top-level DVC plots `summary` (the means) and `categories` (the table as a heatmap).
- summary.json: {"mean": {model: {...}}, "categories": {category: {model: {...}}}}.

A model that declares `reference: <table>` (models.<name>.reference) gets the published value of each
headline metric beside its interval (references/<table>.csv, same dataset and category), marked
inside (✓) or outside (✗) our interval, and the count of categories where it lies inside.

A mean is over every listed category; it is null when a category lacks the metric (no masks,
no anomaly maps), rather than a mean of fewer categories that reads like a full one. When the
categories come from more than one benchmark (data sources: MVTec AD, VisA, ...), each benchmark's
categories are grouped with their own mean row ("mean MVTec AD", "mean VisA"; summary.json "groups")
before the mean over all of them.
"""
from __future__ import annotations

import json

import numpy as np

from stages.core.cli import run_main
from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path, write_csv, write_json
from stages.core.params import category_source, load_params, param
from stages.core.paths import SUMMARY_ROOT as OUTPUT
from stages.core.paths import metrics_file, reference_file
from stages.evaluation import references as published
from stages.evaluation.metrics import HEADLINE_METRICS, INTERVAL_METRICS, METRIC_TITLES
from stages.evaluation.paired import MEAN, mean_groups, table_rows
from stages.evaluation.results import read_comparison, read_metrics

COLUMNS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "threshold_precision",
    "threshold_recall",
    "threshold_f1",
)


def _interval_columns(result: dict) -> dict:
    """value's interval bounds and seed spread as flat columns: <metric>_low, _high, _seed_std."""
    row = {}
    for metric in INTERVAL_METRICS:
        bounds = result.get("interval", {}).get(metric)
        row[f"{metric}_low"], row[f"{metric}_high"] = bounds if bounds else (None, None)
        row[f"{metric}_seed_std"] = result.get("seed_std", {}).get(metric)
    return row


def summary_rows(categories: list[str], names: list[str]) -> tuple[list[dict], dict]:
    """One row per category x model, in params.yaml order; and each row's per-seed values of the
    headline metrics, keyed (category, model)."""
    rows, per_seed = [], {}
    for category in categories:
        for name in names:
            path = metrics_file(category, name)
            if not path.is_file():
                raise PipelineError(f"{path}: metrics missing (run evaluate@{category}-{name})")
            result = read_metrics(path, f"rerun evaluate@{category}-{name}", (*COLUMNS, *INTERVAL_METRICS))
            row = {"category": category, "model": name, "method": result["method"], "backbone": result["backbone"],
                   "seeds": len(result["seeds"])}
            row.update({column: result.get(column) for column in COLUMNS})
            row.update(_interval_columns(result))
            row.update({f"auroc_{k}": v for k, v in sorted(result.get("per_defect_auroc", {}).items())})
            rows.append(row)
            per_seed[category, name] = [seed_result for seed_result in result["per_seed"].values()]
    return rows, per_seed


def mean_rows(rows: list[dict], names: list[str], per_seed: dict, comparison: dict,
              groups: dict[str, list[str]]) -> list[dict]:
    """Each mean row of `groups` (comparison.mean_groups) for each model: the mean over its categories,
    its interval from the paired bootstrap of stage compare (resampling within each category), its
    seed spread from the per-seed means."""
    intervals = {
        (metric, r["category"], r["model"]): (r["low"], r["high"])
        for metric, result in comparison["metrics"].items()
        for r in result["intervals"]
        if r["category"] in groups
    }
    means = []
    for label, members in groups.items():
        for name in names:
            mine = [row for row in rows if row["model"] == name and row["category"] in members]
            mean = {
                "category": label,
                "model": name,
                "method": mine[0]["method"],
                "backbone": mine[0]["backbone"],
                "seeds": mine[0]["seeds"],
            }
            for column in COLUMNS:
                values = [row[column] for row in mine]
                mean[column] = None if any(v is None for v in values) else sum(values) / len(values)
            for metric in INTERVAL_METRICS:
                mean[f"{metric}_low"], mean[f"{metric}_high"] = intervals.get((metric, label, name), (None, None))
                seeds = [[r.get(metric) for r in per_seed[row["category"], name]] for row in mine]  # categories x seeds
                defined = all(v is not None for values in seeds for v in values) and len(seeds[0]) > 1
                mean[f"{metric}_seed_std"] = float(np.std(np.mean(seeds, axis=0), ddof=1)) if defined else None
            means.append(mean)
    return means


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _estimate(row: dict, metric: str) -> str:
    """'0.979 [0.950, 0.995] ±0.003': the value, its bootstrap interval, its std over seeds."""
    value = row.get(metric)
    if value is None:
        return "–"
    text = f"{value:.3f}"
    if row.get(f"{metric}_low") is not None:
        text += f" [{row[f'{metric}_low']:.3f}, {row[f'{metric}_high']:.3f}]"
    if row.get(f"{metric}_seed_std") is not None:
        text += f" ±{row[f'{metric}_seed_std']:.3f}"
    return text


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def metric_tables(rows: list[dict], means: list[dict], order: list[str], names: list[str]) -> list[dict]:
    """Per headline metric: a row per category and mean row (in `order`), a column per model."""
    value = {(row["category"], row["model"]): row for row in [*rows, *means]}
    return [
        {"metric": metric, "category": category, **{name: value[category, name][metric] for name in names}}
        for metric in HEADLINE_METRICS
        for category in order
    ]


# ------------------------------------------------------------------ published values beside ours

def _dataset_of(label: str, groups: dict[str, list[str]], source_of) -> str | None:
    """The dataset whose published value a row compares with: a category's data source; for a mean row,
    the source of its categories when they are every category of that dataset (else None)."""
    if label not in groups:
        return source_of(label)
    sources = {source_of(c) for c in groups[label]}
    if len(sources) == 1:
        source = sources.pop()
        if set(groups[label]) == set(published.DATASET_CATEGORIES.get(source, ())):
            return source
    return None


def compare_references(rows: list[dict], means: list[dict], groups: dict[str, list[str]], tables: dict[str, str],
                       source_of) -> dict:
    """Set <metric>_published and <metric>_published_inside on the rows of models with a reference table
    (`tables`: model -> table name); return, per model, its table and per metric how many categories
    have a published value and in how many it lies inside our interval."""
    loaded = {table: published.read_table(table) for table in set(tables.values())}
    counts = {}
    for name, table in tables.items():
        counts[name] = {"table": table, "file": str(reference_file(table))}
        for metric in published.METRICS:
            counts[name][metric] = {"published": 0, "inside": 0}
    for row in [*rows, *means]:
        table = tables.get(row["model"])
        if table is None:
            continue
        dataset = _dataset_of(row["category"], groups, source_of)
        category = published.MEAN if row["category"] in groups else row["category"]
        values = loaded[table].get((dataset, category), {})
        for metric in published.METRICS:
            value = values.get(metric)
            mark = published.inside(value, row.get(f"{metric}_low"), row.get(f"{metric}_high"))
            row[f"{metric}_published"], row[f"{metric}_published_inside"] = value, mark
            if row["category"] not in groups and mark is not None:
                counts[row["model"]][metric]["published"] += 1
                counts[row["model"]][metric]["inside"] += int(mark)
    return counts


def _published_cell(row: dict, metric: str) -> str:
    """'0.992 ✓' (inside our interval), '0.981 ✗' (outside), '0.953' (no interval here), '' (not published)."""
    value = row.get(f"{metric}_published")
    if value is None:
        return ""
    mark = row.get(f"{metric}_published_inside")
    return f"{value:.3f}" + ("" if mark is None else " ✓" if mark else " ✗")


def _reference_line(counts: dict, metric: str, confidence: float) -> str:
    parts = [f"{name} ({entry['file']}) {entry[metric]['inside']} of {entry[metric]['published']}"
             for name, entry in counts.items()]
    return (f"Published values inside our {confidence:.0%} interval (✓ inside, ✗ outside, empty: none "
            f"published), categories: {'; '.join(parts)}.\n")


def markdown(rows, means, groups, names, confidence: float, resamples: int, references: dict | None = None) -> str:
    references = references or {}
    by_key = {(row["category"], row["model"]): row for row in [*rows, *means]}
    categories = groups[MEAN]
    seeds = max(row["seeds"] for row in rows)
    parts = [
        f"Each cell: the mean over fit seeds, its {confidence:.0%} bootstrap interval over the test images "
        f"([low, high]; {resamples} stratified resamples, metrics/comparison.md pairs the models on them) and its "
        f"standard deviation over the {seeds} fit seeds (±; none for deterministic fits). A mean row: the mean "
        "over the categories above it, resampled within each category.\n"
    ]
    for metric in HEADLINE_METRICS:
        table = [
            {
                "category": f"**{category}**" if category in groups else category,
                **{name: _estimate(by_key[category, name], metric) for name in names},
                **{f"{name} published": _published_cell(by_key[category, name], metric) for name in references},
            }
            for category in table_rows(groups)
        ]
        columns = ["category", *[c for n in names for c in ([n, f"{n} published"] if n in references else [n])]]
        text = f"## {METRIC_TITLES[metric]}\n\n" + markdown_table(table, columns)
        if references:
            text += "\n" + _reference_line(references, metric, confidence)
        parts.append(text)
    columns = [
        key
        for key in dict.fromkeys(key for row in rows for key in row)
        if not key.endswith(("_low", "_high", "_seed_std", "_published", "_published_inside"))
    ]
    parts.append("## Every metric, per category and model (means over seeds)\n\n" + markdown_table(rows, columns))
    plural = "ies" if len(categories) != 1 else "y"
    counted = f"{len(names)} model{'s' * (len(names) != 1)} on {len(categories)} categor{plural}"
    return f"# {counted}\n\n" + "\n".join(parts)


def main() -> None:
    params = load_params()
    names = list(param(params, "models"))
    categories = list(param(params, "data.categories"))
    if not names:
        raise PipelineError("models: no models configured")
    rows, per_seed = summary_rows(categories, names)
    comparison_file = OUTPUT / "comparison.json"
    if not comparison_file.is_file():
        raise PipelineError(f"{comparison_file}: missing (run the compare stage)")
    groups = mean_groups(categories, lambda category: category_source(params, category))
    means = mean_rows(rows, names, per_seed, read_comparison(comparison_file, "rerun the compare stage"), groups)
    tables = metric_tables(rows, means, table_rows(groups), names)
    models = param(params, "models")
    referenced = {name: models[name]["reference"] for name in names if models[name].get("reference")}
    compared = compare_references(rows, means, groups, referenced, lambda c: category_source(params, c))
    interval_keys = [key for key in means[0] if key.endswith(("_low", "_high", "_seed_std"))]

    def mean_of(label: str) -> dict:
        return {
            m["model"]: {c: m[c] for c in [*COLUMNS, *interval_keys]}
            | {k: v for k, v in m.items() if k.endswith(("_published", "_published_inside"))}
            for m in means
            if m["category"] == label
        }

    summary = {
        MEAN: mean_of(MEAN),
        "categories": {
            c: {
                r["model"]: {k: v for k, v in r.items() if k not in ("category", "model")}
                for r in rows
                if r["category"] == c
            }
            for c in categories
        },
    }
    if compared:  # published values: the count of categories inside our interval (the rows hold each value)
        summary["references"] = compared
    if len(groups) > 1:  # each benchmark's categories and mean
        summary["groups"] = {
            label: {"categories": members, MEAN: mean_of(label)} for label, members in groups.items() if label != MEAN
        }
    try:  # the inputs are finite (stages/evaluation/results.py); strict JSON refuses NaN if a mean were not
        json.dumps(summary, allow_nan=False)
    except ValueError as exc:
        raise PipelineError(f"{OUTPUT / 'summary.json'}: a value is not finite ({exc}); not written") from None
    write_json(OUTPUT / "summary.json", summary)
    text = markdown(
        rows,
        means,
        groups,
        names,
        param(params, "evaluate.bootstrap.confidence"),
        param(params, "evaluate.bootstrap.resamples"),
        compared,
    )
    with atomic_path(OUTPUT / "summary.md") as tmp:
        tmp.write_text(text)
    position = {row: i for i, row in enumerate(table_rows(groups))}  # the tables' row order, for the `categories` chart
    all_rows = [{**row, "table_row": position[row["category"]]} for row in [*rows, *means]]
    write_csv(OUTPUT / "summary.csv", all_rows, list(dict.fromkeys(key for row in all_rows for key in row)))
    write_csv(OUTPUT / "categories.csv", tables, ["metric", "category", *names])
    print(text)


if __name__ == "__main__":
    run_main(main)
