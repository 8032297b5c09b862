"""models/<category>.category/<model>.scoring.json: how evaluate scored and decided, for figures, predict and the demo.

Written by evaluate@<category>-<model> beside the fitted model, for the fit of the first seed: which
seed that is, the scoring params it used, the threshold evaluate.threshold_rule set on the validation
(good) images ('anomalous when score >= threshold', the rule in words), the colour
scale of the maps (stages/deploy/overlay.py) and the validation image scores themselves.

The same decision (threshold, colour scale) and input recipe travel in an exported model.onnx's
metadata and in model.pt; `check_decision` and `check_recipe` are the one rule for all three: finite
numbers, and a recipe within the params schema's own bounds (stages/core/params.py Preprocess), so a
file from elsewhere can neither mark every image normal (a threshold of NaN or inf) nor resize to
20000 px.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from stages.core.errors import PipelineError
from stages.core.outputs import write_json
from stages.core.params import Preprocess
from stages.core.schema import parse


def write_scoring(path: Path, score: dict, threshold: float, threshold_rule: str, scale, validation_scores,
                  seed: int) -> None:
    """`threshold_rule`: the rule in words (stages/evaluation/threshold.py validation_threshold)."""
    write_json(path, {
        "seed": int(seed),  # the fit it describes: models/<category>.category/<model>.model/seed-<seed>
        "score": score,
        "threshold": threshold,
        "threshold_rule": threshold_rule,
        "colour_scale": {"low": scale.low, "high": scale.high},
        "validation_scores": [float(v) for v in validation_scores],
    })


def read_scoring(path: Path, stage: str) -> dict:
    """evaluate's record of how to score and decide: score params, threshold, colour scale (checked)."""
    remedy = f"run `dvc repro evaluate@{stage}` again"
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PipelineError(
            f"{path}: not readable JSON ({exc.__class__.__name__}: {str(exc)[:80]}; {remedy})"
        ) from None
    scores = record.get("validation_scores") if isinstance(record, dict) else None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("seed"), int)
        and not isinstance(record.get("seed"), bool)
        and record["seed"] >= 0
        and isinstance(record.get("score"), dict)
        and check_decision(record.get("threshold"), record.get("colour_scale"))
        and isinstance(scores, list)
        and all(map(finite, scores))
    ):
        raise PipelineError(
            f"{path}: not a scoring record of this version (seed, score, threshold, colour_scale, "
            f"validation_scores; {remedy})"
        )
    return record


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_decision(threshold, colour_scale) -> bool:
    """A usable decision: a finite threshold, and a colour scale {low, high} of finite numbers."""
    return (
        finite(threshold)
        and isinstance(colour_scale, dict)
        and set(colour_scale) == {"low", "high"}
        and all(map(finite, colour_scale.values()))
    )


def check_recipe(recipe, where: str) -> dict:
    """A saved input recipe (preprocess: resize, crop_size) checked against the params schema's types and
    bounds; `where` names it in the one-line error ('<file>: inputs.preprocess')."""
    if not isinstance(recipe, dict) or not {"resize", "crop_size"} <= set(recipe):
        raise PipelineError(f"{where}: not an input recipe (a mapping with resize and crop_size)")
    parse(Preprocess, recipe, where)  # the same types and bounds as params.yaml's preprocess block
    return dict(recipe)
