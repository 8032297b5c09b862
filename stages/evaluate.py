"""DVC stage `evaluate@<category>-<model>`: score one category's test set with a fitted model.

Writes metrics/models/<category>.category/<model>.metrics.json (image AUROC, pixel AUROC, AUPRO, F1-max, the mean + 2 sigma
threshold of the held-out good validation images with its confusion counts, per-defect AUROC),
and plots/<category>.category/<model>.model/{scores,roc}.csv for `dvc plots`, plus the curves of stages/curves.py
(image PR, pixel ROC, PRO, confusion at the threshold).
"""
from __future__ import annotations

from stages import curves, metrics
from stages.cli import run_main
from stages.errors import PipelineError
from stages.outputs import write_csv, write_json
from stages.params import param
from stages.data.prepared import load_split
from stages.models import model_from_argv
from stages.overlay import ColourScale
from stages.paths import metrics_file, pixels_dir, scoring_file
from stages.scoring import write_scoring


def main() -> None:
    params, config, device = model_from_argv("evaluate")
    name = config.name
    fpr_limit = param(params, "evaluate.fpr_limit")
    n_std = param(params, "evaluate.threshold_n_std")
    curve_points = param(params, "figures.curve_points")

    detector = config.load(device)
    prepared = {split: load_split(pixels_dir(config.category) / f"{split}.npz") for split in ("test", "val")}
    test = prepared["test"]  # labels, defect types, masks
    inputs = {split: config.load_inputs(split) for split in prepared}
    for split, loaded in inputs.items():
        if list(loaded.names) != prepared[split].names:
            raise PipelineError(
                f"{config.features}: {split} features do not match the prepared images; rerun extract"
            )
    try:
        prediction = detector.predict(inputs["test"])
        validation = detector.predict(inputs["val"])
    except PipelineError as exc:
        raise PipelineError(f"models.{name} ({config.category}): {exc}") from exc

    with_maps = prediction.anomaly_maps is not None and test.masks is not None
    result = metrics.evaluate(
        test.labels,
        prediction.image_scores,
        test.defect_types,
        validation.image_scores,
        masks=test.masks if with_maps else None,
        maps=prediction.anomaly_maps if with_maps else None,
        fpr_limit=fpr_limit,
        n_std=n_std,
    )
    n_train = detector.inputs.get("n_train")  # how many good images it was fitted on (few-shot sweeps)
    result = {"category": config.category, "model": name, "method": config.method, "backbone": config.backbone, "n_train": n_train, **result}

    plot_dir = config.plots
    write_csv(
        plot_dir / "scores.csv",
        [
            {"image": n, "defect_type": d, "label": int(l), "score": float(s)}
            for n, d, l, s in zip(test.names, test.defect_types, test.labels, prediction.image_scores)
        ],
    )
    roc = metrics.roc_points(test.labels, prediction.image_scores) or [{"fpr": 0.0, "tpr": 0.0, "threshold": 0.0}]
    write_csv(plot_dir / "roc.csv", roc)
    curves.write_curves(plot_dir, test, prediction, result["threshold"], curve_points, with_maps)
    write_json(metrics_file(config.category, name), result)
    # what `python -m stages.predict` needs besides the fitted model: how to score, and the threshold
    scale = ColourScale.from_validation(validation.anomaly_maps, result["threshold"])
    write_scoring(scoring_file(config.category, name), config.score.as_dict(), result["threshold"], n_std, scale,
                  validation.image_scores)
    shown = {k: result.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}
    print(f"{config.stage}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))


if __name__ == "__main__":
    run_main(main)
