"""DVC stage `evaluate@<category>-<model>`: score one category's test set with every fit of a model.

For each seed the model was fitted with (params.yaml fit_seeds; one fit for a deterministic
method), the test and validation images are scored, the metrics computed (image AUROC, pixel
AUROC, AUPRO, F1-max, the threshold of the validation images (evaluate.threshold_rule) with its confusion
counts, per-defect AUROC) and the four headline metrics recomputed on `evaluate.bootstrap.resamples`
stratified resamples of the test images (stages/evaluation/bootstrap.py), the same resamples for every model
of the category. Writes
- metrics/models/<category>.category/<model>.metrics.json: the mean over seeds of every metric,
  its standard deviation over seeds, the bootstrap interval of the seed mean, and each seed's own;
  on a synthetic ladder also `levels`: the same per difficulty level, and the detection limits
  (stages/evaluation/levels.py);
- data/evaluations/<category>.category/<model>.resamples.npz: the seed mean on every resample
  (stage `compare` pairs models with it);
- models/<category>.category/<model>.scoring.json: what figures, predict and the demo apply with
  the first seed's fit (threshold, colour scale, validation scores);
- plots/<category>.category/<model>.model/{scores,roc,pr,pixel_roc,pro,confusion}.csv of the first seed.
"""
from __future__ import annotations

import numpy as np

from stages.core.cli import run_main
from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path, write_csv, write_json
from stages.core.params import param
from stages.core.paths import metrics_file, pixels_dir, resamples_file, scoring_file
from stages.data.prepared import load_split
from stages.deploy.overlay import ColourScale
from stages.deploy.record import write_scoring
from stages.evaluation import curves, levels, metrics
from stages.evaluation.bootstrap import stratified_weights
from stages.evaluation.statistics import PixelStats
from stages.evaluation.threshold import flagged, validation_threshold
from stages.methods.entries import model_from_argv


def main() -> None:
    params, config, device = model_from_argv("evaluate")
    settings, bootstrap = param(params, "evaluate"), param(params, "evaluate.bootstrap")
    curve_points = param(params, "figures.curve_points")

    prepared = {split: load_split(pixels_dir(config.category) / f"{split}.npz") for split in ("test", "val")}
    test = prepared["test"]
    inputs = {split: config.load_inputs(split) for split in prepared}
    for split, loaded in inputs.items():
        if list(loaded.names) != prepared[split].names:
            raise PipelineError(f"{config.features}: {split} features do not match the prepared images; rerun extract")
    # a synthetic ladder's levels (None elsewhere) stratify the resamples and get metrics of their own
    weights = stratified_weights(test.labels, bootstrap["resamples"], bootstrap["seed"], config.category, test.levels)
    per_level_seed, per_level_resampled = {}, []

    per_seed, on_resamples, first = {}, [], None
    for seed in config.seeds:
        detector = config.load(device, seed)
        try:
            prediction, validation = detector.predict(inputs["test"]), detector.predict(inputs["val"])
        except PipelineError as exc:
            raise PipelineError(f"models.{config.name} ({config.category}, seed {seed}): {exc}") from exc
        threshold, threshold_rule = validation_threshold(validation.image_scores, settings)  # evaluate.threshold_rule
        pixels = None
        if prediction.anomaly_maps is not None and test.masks is not None:
            # padding (preprocess.mode pad) is in no pixel metric nor curve: test.valid marks the image's pixels
            pixels = PixelStats.from_maps(test.masks, prediction.anomaly_maps, settings["bins"], test.valid)
        per_seed[seed] = metrics.evaluate(
            test.labels,
            prediction.image_scores,
            test.defect_types,
            validation.image_scores,
            pixels,
            settings["fpr_limit"],
            settings["threshold_n_std"],
            threshold,
        )
        on_resamples.append(
            metrics.resampled(test.labels, prediction.image_scores, pixels, weights, settings["fpr_limit"])
        )
        if test.levels is not None:
            level_args = (test.labels, prediction.image_scores, test.levels, test.ladder, pixels, settings["fpr_limit"])
            per_level_seed[seed] = levels.per_level(*level_args)
            per_level_resampled.append(levels.per_level(*level_args, weights=weights))
        if first is None:
            first = (seed, detector.inputs.get("n_train"), prediction, validation, pixels, threshold_rule)
        # one seed's model and maps at a time: a PaDiM state at the paper's settings is 3.5 GiB
        del detector, prediction, validation, pixels

    resampled = metrics.mean_over_seeds(on_resamples)
    summary = metrics.summarise_seeds(per_seed, resampled, bootstrap["confidence"], bootstrap["resamples"])
    seed, n_train, prediction, validation, pixels, threshold_rule = first
    result = {
        "category": config.category,
        "model": config.name,
        "method": config.method,
        "backbone": config.backbone,
        "n_train": n_train,
        **summary,
    }
    if test.levels is not None:
        result["levels"] = levels.summarise(
            per_level_seed, per_level_resampled, test.ladder, test.levels, bootstrap["confidence"]
        )

    plot_dir = config.plots
    threshold = per_seed[seed]["threshold"]
    # the threshold and its decision on every row, as predict's scores.csv has them: the score chart draws both
    decided = flagged(prediction.image_scores, threshold)
    write_csv(
        plot_dir / "scores.csv",
        [
            {
                "image": n,
                "defect_type": d,
                "label": int(label),
                "score": float(s),
                "anomalous": int(a),
                "threshold": threshold,
            }
            for n, d, label, s, a in zip(test.names, test.defect_types, test.labels, prediction.image_scores, decided)
        ],
    )
    roc = metrics.roc_points(test.labels, prediction.image_scores) or [{"fpr": 0.0, "tpr": 0.0, "threshold": 0.0}]
    write_csv(plot_dir / "roc.csv", roc)
    curves.write_curves(plot_dir, test, prediction.image_scores, pixels, threshold, curve_points)
    with atomic_path(resamples_file(config.category, config.name)) as tmp:
        with open(tmp, "wb") as fh:  # plain arrays (np.load(..., allow_pickle=False) reads them)
            np.savez(fh, **{name: values for name, values in resampled.items() if values is not None})
    write_json(metrics_file(config.category, config.name), result)
    scale = ColourScale.from_validation(validation.anomaly_maps, threshold)
    write_scoring(
        scoring_file(config.category, config.name),
        config.score.as_dict(),
        threshold,
        threshold_rule,
        scale,
        validation.image_scores,
        seed,
    )
    shown = {k: result.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}
    print(
        f"{config.stage} (seeds {config.seeds}): "
        + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    )


if __name__ == "__main__":
    run_main(main)
