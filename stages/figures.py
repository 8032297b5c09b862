"""DVC stage `figures@<category>-<model>`: the heatmap grid and the score distributions of one model.

Writes plots/<category>.category/<model>.model/figures/scores.png (test scores per defect type vs good, validation good
scores, threshold) and, for models with anomaly maps, heatmaps.png (image | ground truth |
[reconstruction] | map | overlay | map >= threshold for a seeded selection of test images).

Why a separate stage that re-scores a few images, rather than drawing in evaluate: the figures'
params (`figures.*`) and code then never rerun the scoring of the whole test set, and re-scoring
the ~12 selected test images costs a fraction of evaluate. Everything else comes from evaluate's
outputs for the fit of the first seed (scores.csv beside the figures; the threshold, the colour
scale and the validation scores in models/<category>.category/<model>.scoring.json), so the
figures show exactly the numbers the metrics were computed from.
"""
from __future__ import annotations

import csv

import numpy as np

from stages.core.cli import run_main
from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path
from stages.core.params import param
from stages.core.paths import pixels_dir, scoring_file
from stages.data.prepared import load_split
from stages.deploy.overlay import ColourScale
from stages.deploy.record import read_scoring
from stages.methods.entries import model_from_argv

FIGURES = "figures"  # plots/<category>.category/<model>.model/figures/


def read_scores(path) -> dict[str, float]:
    if not path.is_file():
        raise PipelineError(f"{path}: test scores missing (run evaluate)")
    with open(path, newline="") as fh:
        return {row["image"]: float(row["score"]) for row in csv.DictReader(fh)}


def main() -> None:
    from stages.plotting.charts import distribution_figure
    from stages.plotting.grids import heatmap_figure, select, subset
    from stages.plotting.style import save_png

    params, config, device = model_from_argv("figures")
    name = config.name
    per_defect = param(params, "figures.heatmaps.per_defect")
    n_good = param(params, "figures.heatmaps.good")
    selection_seed = param(params, "figures.heatmaps.seed")
    bins = param(params, "figures.distribution.bins")

    record = read_scoring(scoring_file(config.category, name), config.stage)  # evaluate's threshold and scale
    threshold, scale = float(record["threshold"]), ColourScale(**record["colour_scale"])
    val_scores = np.array(record["validation_scores"], dtype=np.float64)
    scores_path = config.plots / "scores.csv"
    scores_by_name = read_scores(scores_path)
    test = load_split(pixels_dir(config.category) / "test.npz")
    missing = [n for n in test.names if n not in scores_by_name]
    if missing:
        raise PipelineError(f"{scores_path}: no score for {missing[0]}; rerun evaluate@{config.stage}")
    test_scores = np.array([scores_by_name[n] for n in test.names])

    detector = config.load(device, record["seed"])  # the fit evaluate's scores.csv and threshold are of

    with atomic_path(config.plots / FIGURES) as out:
        out.mkdir(parents=True)
        fig = distribution_figure(
            f"{name} ({config.category})", test_scores, test.defect_types, val_scores, threshold, bins
        )
        save_png(fig, out / "scores.png")
        shown = "scores.png"
        chosen = select(test.defect_types, per_defect, n_good, selection_seed)
        inputs = subset(config.load_inputs("test"), chosen)
        prediction = detector.predict(inputs)
        if prediction.anomaly_maps is not None:
            recon = detector.reconstruct(inputs) if hasattr(detector, "reconstruct") else None
            fig, panels = heatmap_figure(
                f"{name} ({config.category})",
                test.images[chosen],
                [test.names[i] for i in chosen],
                [test.defect_types[i] for i in chosen],
                test.masks[chosen] if test.masks is not None else None,
                prediction.anomaly_maps,
                test_scores[chosen],
                threshold,
                scale,
                recon,
            )
            save_png(fig, out / "heatmaps.png", panels, colours=256)
            shown += f", heatmaps.png ({panels[0]} images x {panels[1]} columns)"
    print(f"figures@{config.stage}: {shown} -> {config.plots / FIGURES}")


if __name__ == "__main__":
    run_main(main)
