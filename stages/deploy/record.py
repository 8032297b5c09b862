"""models/<category>.category/<model>.scoring.json: how evaluate scored and decided, for figures, predict and the demo.

Written by evaluate@<category>-<model> beside the fitted model, for the fit of the first seed: which
seed that is, the scoring params it used, the threshold evaluate.threshold_rule set on the validation
(good) images ('anomalous when score >= threshold', the rule in words), the colour
scale of the maps (stages/deploy/overlay.py) and the validation image scores themselves.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from stages.core.errors import PipelineError
from stages.core.outputs import write_json


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(
            f"{path}: not readable JSON ({exc.__class__.__name__}: {str(exc)[:80]}; {remedy})"
        ) from None
    scale = record.get("colour_scale") if isinstance(record, dict) else None
    scores = record.get("validation_scores") if isinstance(record, dict) else None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("seed"), int)
        and isinstance(record.get("score"), dict)
        and _finite(record.get("threshold"))
        and isinstance(scale, dict)
        and set(scale) == {"low", "high"}
        and all(map(_finite, scale.values()))
        and isinstance(scores, list)
        and all(map(_finite, scores))
    ):
        raise PipelineError(
            f"{path}: not a scoring record of this version (seed, score, threshold, colour_scale, "
            f"validation_scores; {remedy})"
        )
    return record


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
