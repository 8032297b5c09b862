"""Score distributions per model and the summary bar chart (matplotlib, PNG)."""
from __future__ import annotations

import math

import numpy as np
from matplotlib.patches import Patch

from stages.plotting.style import GOOD, VALIDATION, colour, plt


def distribution_figure(
    model: str,
    test_scores: np.ndarray,
    defect_types: list[str],
    val_scores: np.ndarray,
    threshold: float,
    bins: int,
):
    """One panel per defect type: its image scores against the good test images and the held-out
    good validation images, on shared bins, with the threshold as a dashed line."""
    test_scores = np.asarray(test_scores, np.float64)
    val_scores = np.asarray(val_scores, np.float64)
    types = np.asarray(defect_types, dtype=object)
    kinds = sorted({str(t) for t in types} - {"good"}) or ["good"]
    everything = np.concatenate([test_scores, val_scores, [threshold]])
    lo, hi = float(everything.min()), float(everything.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    good = test_scores[types == "good"]

    n_cols = min(3, len(kinds))
    n_rows = math.ceil(len(kinds) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.0 * n_cols, 2.8 * n_rows + 0.9), squeeze=False, sharex=True)
    for i, ax in enumerate(axes.ravel()):
        if i >= len(kinds):
            ax.set_visible(False)
            continue
        kind = kinds[i]
        ax.hist(good, bins=edges, color=GOOD, alpha=0.6, label=f"good test ({len(good)})")
        ax.hist(val_scores, bins=edges, histtype="step", color=VALIDATION, linewidth=1.8,
                label=f"good validation ({len(val_scores)})")
        if kind != "good":
            scores = test_scores[types == kind]
            ax.hist(scores, bins=edges, color=colour(1 + i), alpha=0.75, label=f"{kind} ({len(scores)})")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.3, label="threshold")
        ax.set_title(f"{kind} vs good")
        ax.set_xlabel("image anomaly score")
        ax.set_ylabel("images")
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"{model}: image score distributions (threshold = validation mean + n·σ, dashed)")
    fig.tight_layout()
    return fig


def summary_figure(rows: dict[str, dict], subtitle: str, titles: dict[str, str]):
    """rows: model -> {metric: value or None}; titles: metric -> its axis label, in the order drawn. One
    bar group per metric, one bar per model."""
    models = list(rows)
    metrics = list(titles)
    # colours by sorted name, as Vega-Lite assigns them in the interactive charts
    palette = {model: colour(i) for i, model in enumerate(sorted(models))}
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(models) * len(metrics) * 0.55 + 2.5), 4.2))
    for m, model in enumerate(models):
        offsets = np.arange(len(metrics)) - 0.4 + width * (m + 0.5)
        for x, metric in zip(offsets, metrics):
            value = rows[model].get(metric)
            if value is None:
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=7, color="#555555")
                continue
            ax.bar(x, value, width=width * 0.95, color=palette[model])
            ax.text(x, value + 0.01, f"{value:.3f}", ha="center", va="bottom", rotation=90, fontsize=7)
    ax.set_xticks(np.arange(len(metrics)), [titles[k] for k in metrics])
    ax.set_ylim(0, 1.18)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score (higher is better)")
    ax.set_title(f"Detection quality per model ({subtitle})")
    handles = [Patch(color=palette[model], label=model) for model in models]
    ax.legend(handles=handles, title="model", fontsize=8, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
