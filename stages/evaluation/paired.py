"""Paired comparisons of models on the same bootstrap resamples (read from evaluate's resamples files).

Every model of a category was scored on the same resamples of its test images (stages/evaluation/bootstrap.py),
so the difference of two models on resample r is a draw of their difference on a new test set of
the same make-up; its percentile interval says whether the difference could be 0. The mean over
categories is resampled the same way: resample r's mean over categories of each category's own
resample r (categories are resampled independently).
"""
from __future__ import annotations

from itertools import product

import numpy as np

from stages.evaluation.bootstrap import summarise

MEAN = "mean"  # the row of means over every category, as in the report
# a category's benchmark, from its data source: each gets its own mean row when the categories come
# from more than one (MVTec AD and VisA are reported apart, as in the papers); synthetic and folder
# categories are "other"
BENCHMARKS = {"mvtec": "MVTec AD", "visa": "VisA"}
OTHER = "other"


def mean_groups(categories: list[str], source_of) -> dict[str, list[str]]:
    """The mean rows and the categories each averages: MEAN over all of them and, when they come from
    more than one benchmark (`source_of(category)` is its data source), "mean <benchmark>" for each."""
    benchmarks: dict[str, list[str]] = {}
    for category in categories:
        source = source_of(category)
        benchmarks.setdefault(BENCHMARKS.get(source, OTHER), []).append(category)
    groups = {MEAN: list(categories)}
    if len(benchmarks) > 1:
        groups.update({f"{MEAN} {label}": members for label, members in benchmarks.items()})
    return groups


def table_rows(groups: dict[str, list[str]]) -> list[str]:
    """The rows of a table, in order: each benchmark's categories followed by its mean; MEAN last."""
    benchmarks = {label: members for label, members in groups.items() if label != MEAN} or {None: groups[MEAN]}
    rows = []
    for label, members in benchmarks.items():
        rows += [*members, *([label] if label else [])]
    return [*rows, MEAN]


def with_means(points: dict, resamples: dict, groups: dict[str, list[str]], models: list[str]):
    """(points, resamples) per (category, model), plus each mean row of `groups` (mean_groups) where
    every category it averages has the metric; a mean's resample r is the mean of its categories' r."""
    for label, members in groups.items():
        for model in models:
            keys = [(c, model) for c in members]
            if all(points.get(k) is not None and resamples.get(k) is not None for k in keys):
                points[label, model] = float(np.mean([points[k] for k in keys]))
                resamples[label, model] = np.mean([resamples[k] for k in keys], axis=0)
    return points, resamples


def model_intervals(points, resamples, rows: list[str], models: list[str], confidence: float) -> list[dict]:
    """Each (category or mean, model): the metric with its interval (the forest plot)."""
    return [{"category": row, "model": model, **summarise(points[row, model], resamples[row, model], confidence)}
            for row, model in product(rows, models) if (row, model) in resamples]


def differences(points, resamples, rows: list[str], models: list[str], confidence: float) -> list[dict]:
    """Each (category or mean, model, other model): the difference model - other with its interval;
    `significant` when the interval excludes 0 (a model against itself: exactly 0, interval [0, 0])."""
    out = []
    for row, a, b in product(rows, models, models):
        if (row, a) not in resamples or (row, b) not in resamples:
            continue
        diff = summarise(points[row, a] - points[row, b], resamples[row, a] - resamples[row, b], confidence)
        significant = diff["low"] > 0 or diff["high"] < 0
        verdict = "better" if significant and diff["low"] > 0 else "worse" if significant else "no difference"
        out.append({"category": row, "model": a, "versus": b, **diff, "significant": significant, "verdict": verdict})
    return out
