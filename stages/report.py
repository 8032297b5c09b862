"""DVC stage `report`: every category x model -> metrics/summary.{json,md,csv} and metrics/categories.csv.

- summary.md: one table per headline metric (image AUROC, pixel AUROC, AUPRO) with a row per
  category and the mean over categories, models as columns (the layout of the PatchCore and
  anomalib papers' tables), then every metric of every category x model. Below its `#` title every
  heading is `###`: a page that copies its tables (the README's results block) holds them inside a
  `##` section of its own, and the copied headings nest under that section.
- categories.csv: the same per-metric tables as CSV (metric, category, one column per model).
- summary.csv: one row per category x model with every metric, plus one `mean` row per model;
  drawn by the top-level DVC plots `summary` (the means) and `categories` (the table as a heatmap).
- summary.json: {"mean": {model: {...}}, "categories": {category: {model: {...}}}} (and "levels").
- categories with a synthetic difficulty ladder: a table model x level of image AUROC with the
  detection limits in summary.md, the per-level metrics in summary.json "levels", and
  plots/levels.csv (every category x model x level), drawn by the DVC plot `detection_by_level`.

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
from stages.core.paths import PLOTS_ROOT, metrics_file, reference_file
from stages.core.paths import SUMMARY_ROOT as OUTPUT
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
        text = f"### {METRIC_TITLES[metric]}\n\n" + markdown_table(table, columns)
        if references:
            text += "\n" + _reference_line(references, metric, confidence)
        parts.append(text)
    columns = [
        key
        for key in dict.fromkeys(key for row in rows for key in row)
        if not key.endswith(("_low", "_high", "_seed_std", "_published", "_published_inside"))
    ]
    parts.append("### Every metric, per category and model (means over seeds)\n\n" + markdown_table(rows, columns))
    plural = "ies" if len(categories) != 1 else "y"
    counted = f"{len(names)} model{'s' * (len(names) != 1)} on {len(categories)} categor{plural}"
    return f"# {counted}\n\n" + "\n".join(parts)


# --------------------------------------------------------------------------- per difficulty level
# Categories with a synthetic ladder (metrics files with `levels`, stages/evaluation/levels.py) get a
# table model x level and the detection limits; plots/levels.csv feeds the `detection_by_level` chart.

LEVEL_COLUMNS = ["category", "model", "level", "label", "delta_e", "area", "width"] + [
    f"{metric}{end}" for metric in HEADLINE_METRICS for end in ("", "_low", "_high")
]


def _levels_block(path, record: dict, remedy: str) -> dict | None:
    """A metrics file's `levels` block (stages/evaluation/levels.py summarise), checked: every value the
    report formats is a number (or null where a metric is undefined); None when the file has none."""
    block = record.get("levels")
    if block is None:
        return None

    def bad(reason: str) -> PipelineError:
        return PipelineError(f"{path}: not a metrics file of the evaluate stage (levels: {reason}; {remedy})")

    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    ladder = block.get("ladder") if isinstance(block, dict) else None
    if not isinstance(ladder, dict) or not ladder or not all(
        isinstance(level, dict) and all(number(level.get(key)) for key in ("delta_e", "area", "width", "defects"))
        for level in ladder.values()
    ):
        raise bad("ladder is not a mapping of levels with delta_e, area, width and defects")
    for metric in HEADLINE_METRICS:
        values, bounds = block.get(metric), (block.get("interval") or {}).get(metric)
        if values is not None and not (isinstance(values, dict) and set(values) == set(ladder)
                                       and all(map(number, values.values()))):
            raise bad(f"{metric} is not a number per level")
        if (values is None) != (bounds is None) or bounds is not None and not (
            isinstance(bounds, dict) and set(bounds) == set(ladder)
            and all(isinstance(b, list) and len(b) == 2 and all(map(number, b)) for b in bounds.values())
        ):
            raise bad(f"interval's {metric} is not [low, high] per level")
        spread = (block.get("seed_std") or {}).get(metric)
        if spread is not None and not (isinstance(spread, dict) and all(map(number, spread.values()))):
            raise bad(f"seed_std's {metric} is not a number per level")
    for name, limit in (block.get("detection_limit") or {}).items():
        positions = isinstance(limit, dict) and all(number(limit.get(key)) for key in ("level", "low", "high"))
        if not positions or not all(
            limit.get(f"delta_e{end}") is None or number(limit[f"delta_e{end}"]) for end in ("", "_low", "_high")
        ):
            raise bad(f"detection_limit {str(name)[:40]!r} is not a position with its interval")
    return block


def level_results(categories: list[str], names: list[str]) -> dict:
    """{category: {model: the metrics file's `levels` block}} for the categories that have levels."""
    results = {}
    for category in categories:
        blocks = {}
        for name in names:
            path, remedy = metrics_file(category, name), f"rerun evaluate@{category}-{name}"
            blocks[name] = _levels_block(path, read_metrics(path, remedy), remedy)
        if any(block is not None for block in blocks.values()):
            missing = [name for name, block in blocks.items() if block is None]
            if missing:
                raise PipelineError(f"{metrics_file(category, missing[0])}: no per-level metrics while other models "
                                    f"of {category} have them (rerun evaluate@{category}-{missing[0]})")
            results[category] = blocks
    return results


def _varying(ladder: dict) -> list[str]:
    """The ladder's physical quantities that change between levels (the others are the same at every level)."""
    return [key for key in ("delta_e", "area", "width") if len({level[key] for level in ladder.values()}) > 1]


def _level_label(name: str, level: dict, keys: list[str]) -> str:
    units = {"delta_e": lambda v: f"ΔE {v:g}", "area": lambda v: f"{v:g} px", "width": lambda v: f"width {v:g}"}
    return " · ".join([name, *(units[key](level[key]) for key in keys)])


def level_rows(levelled: dict) -> list[dict]:
    rows = []
    for category, blocks in levelled.items():
        for name, block in blocks.items():
            keys = _varying(block["ladder"])
            for k, (level, definition) in enumerate(block["ladder"].items(), start=1):
                row = {"category": category, "model": name, "level": k, "label": _level_label(level, definition, keys)}
                row.update({key: definition[key] for key in ("delta_e", "area", "width")})
                for metric in HEADLINE_METRICS:
                    value = (block.get(metric) or {}).get(level)
                    bounds = (block["interval"].get(metric) or {}).get(level) or (None, None)
                    row.update({metric: value, f"{metric}_low": bounds[0], f"{metric}_high": bounds[1]})
                rows.append(row)
    return rows


def _limit_text(entry: dict, ladder: dict) -> str:
    """'L2.6 [2.1, 3.0], ΔE 9.1 [6.0, 12.3]': the limit's position on the ladder with its interval, and the
    colour difference there when it changes along the ladder; '< L1' / '> L5' beyond the ladder's ends."""
    count = len(ladder)
    delta_e = [level["delta_e"] for level in ladder.values()]

    def position(p: float) -> str:
        return "< L1" if p < 1 else f"> L{count}" if p > count else f"L{p:.1f}"

    def colour(p: float, value) -> str:
        return f"> {max(delta_e):g}" if p < 1 else f"< {min(delta_e):g}" if p > count else f"{value:.1f}"

    text = f"{position(entry['level'])} [{position(entry['low'])}, {position(entry['high'])}]"
    if "delta_e" in _varying(ladder):
        # a later position is a smaller ΔE: the interval's bounds swap
        text += (f", ΔE {colour(entry['level'], entry['delta_e'])} "
                 f"[{colour(entry['high'], entry['delta_e_high'])}, {colour(entry['low'], entry['delta_e_low'])}]")
    return text


def level_markdown(levelled: dict, confidence: float) -> str:
    parts = []
    for category, blocks in levelled.items():
        ladder = next(iter(blocks.values()))["ladder"]
        keys = _varying(ladder)
        defined = "; ".join(
            f"{name}: ΔE*ab {level['delta_e']:g}, {level['area']:g} px, width {level['width']:g} px "
            f"({level['defects']} defective images)"
            for name, level in ladder.items()
        )
        parts.append(
            f"### Image AUROC per difficulty level: {category}\n\n"
            f"Good test images against each level's defective images (every defect type), the mean over fit "
            f"seeds with its {confidence:.0%} bootstrap interval and seed spread, as above. The levels, easiest "
            f"first (docs/explanation/synthetic-benchmark.md): {defined}. Detection limit: where the image "
            "AUROC falls to 0.9 and to 0.75, interpolated between levels, with its interval over the same "
            f"resamples ('< L1': below already at L1; '> L{len(ladder)}': never).\n\n"
        )
        table = []
        for name, block in blocks.items():
            row = {"model": name}
            for level, definition in ladder.items():
                row[_level_label(level, definition, keys)] = _estimate(
                    {
                        "v": block["image_auroc"][level],
                        "v_low": block["interval"]["image_auroc"][level][0],
                        "v_high": block["interval"]["image_auroc"][level][1],
                        "v_seed_std": (block["seed_std"].get("image_auroc") or {}).get(level),
                    },
                    "v",
                ) if block["image_auroc"] is not None else "–"
            for threshold, entry in (block.get("detection_limit") or {}).items():
                row[f"limit at {threshold.removeprefix('auroc_')}"] = _limit_text(entry, ladder)
            table.append(row)
        parts[-1] += markdown_table(table, list(table[0]))
    return "\n".join(parts)


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
    levelled = level_results(categories, names)  # categories with a synthetic ladder only
    if levelled:
        summary["levels"] = levelled
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
    if levelled:
        text += "\n" + level_markdown(levelled, param(params, "evaluate.bootstrap.confidence"))
    write_csv(PLOTS_ROOT / "levels.csv", level_rows(levelled), LEVEL_COLUMNS)  # header only without levels
    with atomic_path(OUTPUT / "summary.md") as tmp:
        tmp.write_text(text)
    position = {row: i for i, row in enumerate(table_rows(groups))}  # the tables' row order, for the `categories` chart
    all_rows = [{**row, "table_row": position[row["category"]]} for row in [*rows, *means]]
    write_csv(OUTPUT / "summary.csv", all_rows, list(dict.fromkeys(key for row in all_rows for key in row)))
    write_csv(OUTPUT / "categories.csv", tables, ["metric", "category", *names])
    print(text)


if __name__ == "__main__":
    run_main(main)
