"""DVC stage `compare`: which models differ significantly, per category and over categories.

Reads every model's metrics (metrics/models/) and bootstrap resamples (data/evaluations/), all
scored on the same resamples of each category's test images, and writes
- metrics/comparison.json: per metric (image AUROC, pixel AUROC, AUPRO, F1-max), every model's value
  with its interval, and every pair's difference with its interval, per category and for the mean
  over categories;
- metrics/comparison.md: the pairwise tables of the mean over categories, then every significant
  difference per category;
- plots/intervals.csv (forest plot) and plots/pairwise.csv (pairwise matrix) for `dvc plots show`.
"""
from __future__ import annotations

from stages.core.cli import run_main
from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path, write_csv, write_json
from stages.core.params import category_source, load_params, param
from stages.core.paths import PLOTS_ROOT, SUMMARY_ROOT, metrics_file, resamples_file
from stages.evaluation.metrics import INTERVAL_METRICS, METRIC_TITLES
from stages.evaluation.paired import MEAN, differences, mean_groups, model_intervals, table_rows, with_means
from stages.evaluation.results import read_metrics, read_resamples


def read(category: str, model: str) -> tuple[dict, dict]:
    path, samples = metrics_file(category, model), resamples_file(category, model)
    for needed in (path, samples):
        if not needed.is_file():
            raise PipelineError(f"{needed}: missing (run evaluate@{category}-{model})")
    remedy = f"rerun evaluate@{category}-{model}"
    return read_metrics(path, remedy, INTERVAL_METRICS), read_resamples(samples, remedy)


def markdown(results: dict, models: list[str], groups: dict[str, list[str]], confidence: float, resamples: int) -> str:
    pct = f"{confidence:.0%}"
    categories = groups[MEAN]
    lines = [
        f"# Paired comparisons: {len(models)} models, {len(categories)} "
        f"categor{'y' if len(categories) == 1 else 'ies'}",
        "",
        f"Row model minus column model on the mean over categories, with its {pct} bootstrap interval "
        f"({resamples} stratified resamples of each category's test images, the same for every model). "
        "**Bold**: the interval excludes 0 (the difference is significant at that level).",
        "",
    ]
    for metric, result in results.items():
        for label in [*(g for g in groups if g != MEAN), MEAN]:  # each benchmark's mean, then the overall one
            mean = {(d["model"], d["versus"]): d for d in result["differences"] if d["category"] == label}
            if not mean:
                continue
            present = [m for m in models if (m, m) in mean]
            over = "" if label == MEAN else f", {label} ({', '.join(groups[label])})"
            lines += [
                f"## {METRIC_TITLES[metric]}{over}",
                "",
                "| model | " + " | ".join(present) + " |",
                "|---|" + "---|" * len(present),
            ]
            for a in present:
                cells = []
                for b in present:
                    d = mean[a, b]
                    text = f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                    cells.append("0" if a == b else f"**{text}**" if d["significant"] else text)
                lines.append(f"| {a} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Significant differences per category", ""]
    for metric, result in results.items():
        found = [
            d for d in result["differences"] if d["category"] in categories and d["significant"] and d["value"] > 0
        ]
        for d in found:
            lines.append(
                f"- {d['category']}, {METRIC_TITLES[metric]}: {d['model']} > {d['versus']} by {d['value']:.3f} "
                f"[{d['low']:.3f}, {d['high']:.3f}]"
            )
        if not found:
            lines.append(f"- {METRIC_TITLES[metric]}: none")
    return "\n".join(lines) + "\n"


def main() -> None:
    params = load_params()
    categories, models = list(param(params, "data.categories")), list(param(params, "models"))
    confidence = param(params, "evaluate.bootstrap.confidence")
    resamples = param(params, "evaluate.bootstrap.resamples")
    loaded = {(c, m): read(c, m) for c in categories for m in models}
    groups = mean_groups(categories, lambda category: category_source(params, category))
    rows = table_rows(groups)
    results, intervals_rows, pairwise_rows = {}, [], []
    for metric in INTERVAL_METRICS:
        points = {k: result.get(metric) for k, (result, _) in loaded.items()}
        samples = {k: drawn.get(metric) for k, (_, drawn) in loaded.items()}
        points, samples = with_means(
            {k: v for k, v in points.items() if v is not None},
            {k: v for k, v in samples.items() if v is not None},
            groups,
            models,
        )
        if not samples:
            continue
        if any(len(v) != resamples for v in samples.values()):
            raise PipelineError(
                f"{SUMMARY_ROOT}: the resamples files disagree with evaluate.bootstrap.resamples "
                f"({resamples}); rerun the evaluate stages"
            )
        intervals = model_intervals(points, samples, rows, models, confidence)
        pairs = differences(points, samples, rows, models, confidence)
        results[metric] = {"intervals": intervals, "differences": pairs}
        intervals_rows += [{"metric": metric, **r} for r in intervals]
        pairwise_rows += [
            {
                "metric": metric,
                "model": d["model"],
                "versus": d["versus"],
                "difference": d["value"],
                "low": d["low"],
                "high": d["high"],
                "verdict": d["verdict"],
            }
            for d in pairs
            if d["category"] == MEAN
        ]
    if not results:
        raise PipelineError("compare: no metric with bootstrap resamples (run the evaluate stages)")
    write_json(SUMMARY_ROOT / "comparison.json", {"confidence": confidence, "resamples": resamples, "metrics": results})
    with atomic_path(SUMMARY_ROOT / "comparison.md") as tmp:
        tmp.write_text(markdown(results, models, groups, confidence, resamples))
    write_csv(PLOTS_ROOT / "intervals.csv", intervals_rows)
    write_csv(PLOTS_ROOT / "pairwise.csv", pairwise_rows)
    significant = sum(d["significant"] and d["value"] > 0 for r in results.values() for d in r["differences"])
    print(
        f"compare: {len(models)} models x {len(categories)} categories, {significant} significant differences "
        f"-> {SUMMARY_ROOT / 'comparison.md'}"
    )


if __name__ == "__main__":
    run_main(main)
