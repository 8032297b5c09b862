"""deployments/<category>.category/<model>.deployment.json: the threshold a site calibrated on its own
good images (`python -m stages.calibrate`, or the demo's calibrate button), which predict, `--watch`
and the demo use instead of evaluate's when it is there.

Why there, and not beside the model: everything under models/, data/, metrics/ and plots/ is a DVC
output that `dvc repro` and `dvc checkout` delete and rewrite (and git ignores), while this file is
the site's decision about its camera, made after the pipeline ran: it must survive a rerun and may
be committed to git and pulled onto the line's machine. Written atomically, and never over a file
that is not one of these (a stale one is replaced; the replaced record is kept in `previous`).

A deployment file belongs to one fit: it records the SHA-256 of the files that compute the scores
(model.pt with evaluate's score params for the torch runtime, model.onnx for the onnx runtime). After
a refit, a new score param or a new export, the threshold no longer matches the scores: predict
refuses it with one line (recalibrate, or `--threshold-from evaluate`), the demo says so and falls
back to evaluate's threshold. The two runtimes' scores agree within the export's parity tolerance
(1e-4 relative), so one calibration serves both while both files are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from stages.core.errors import PipelineError
from stages.core.outputs import write_json
from stages.core.paths import CATEGORY_SUFFIX, onnx_file, scoring_file, seed_dir
from stages.deploy.overlay import ColourScale
from stages.deploy.record import read_scoring
from stages.evaluation.threshold import flagged, order_statistic_threshold, percent
from stages.methods.base import STATE_FILE

DEPLOYMENTS_ROOT = Path("deployments")
KIND = "anomaly threshold calibrated on good images (python -m stages.calibrate)"
VERSION = 1
MAX_BYTES = 1 << 20  # a deployment file is a few kB; a larger one is not one of ours
THRESHOLD_FROM = ("auto", "deployment", "evaluate")
QUANTILES = {"min": 0.0, "p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def deployment_file(category: str, name: str) -> Path:
    return DEPLOYMENTS_ROOT / f"{category}{CATEGORY_SUFFIX}" / f"{name}.deployment.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def runtime_identity(category: str, name: str, runtime: str) -> dict | None:
    """What decides `runtime`'s scores of this model, as it is now (None when that file is missing)."""
    if runtime == "torch":
        scoring = scoring_file(category, name)
        if not scoring.is_file():
            return None
        record = read_scoring(scoring, f"{category}-{name}")
        state = seed_dir(category, name, record["seed"]) / STATE_FILE
        if not state.is_file():
            return None
        return {"file": str(state), "sha256": sha256(state), "score": record["score"]}
    path = onnx_file(category, name)
    return {"file": str(path), "sha256": sha256(path)} if path.is_file() else None


def build(model, scores, false_alarms: float, confidence: float, images: str, evaluate_threshold: float) -> dict:
    """The deployment record of `scores` (good images scored by `model`): the order-statistic threshold
    (stages/evaluation/threshold.py), its rule and target, the scores' quantiles and the model's identity."""
    scores = np.asarray(scores, dtype=np.float64)
    chosen = order_statistic_threshold(scores, false_alarms, confidence, "good images")
    return {
        "kind": KIND,
        "version": VERSION,
        "category": model.category,
        "model": model.name,
        "threshold": chosen.threshold,
        "rule": f"anomalous when score >= threshold = {chosen.describe()}",
        "rank": chosen.rank,
        "order_statistic": chosen.score,  # the rank-th highest score; the threshold is the next float above it
        "false_alarms": chosen.false_alarms,
        "confidence": chosen.confidence,
        "n_images": chosen.n,
        "images": images,
        "runtime": model.runtime,
        "score_quantiles": {key: float(np.quantile(scores, q)) for key, q in QUANTILES.items()},
        "evaluate_threshold": float(evaluate_threshold),
        "evaluate_flags": int(flagged(scores, evaluate_threshold).sum()),  # of these good images
        "identity": {runtime: runtime_identity(model.category, model.name, runtime) for runtime in ("torch", "onnx")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def summary(record: dict) -> str:
    return (f"threshold {record['threshold']:.6g} = {record['rule'].split(' = ', 1)[1]} (evaluate's threshold "
            f"{record['evaluate_threshold']:.6g} flags {record['evaluate_flags']} of these {record['n_images']})")


def write(record: dict) -> Path:
    """The record at its deployment_file, atomically; an earlier deployment file there is replaced (and
    kept in `previous`), anything else there is left alone with a one-line error."""
    path = deployment_file(record["category"], record["model"])
    try:
        previous = read(path, record["category"], record["model"])
    except PipelineError as exc:
        raise PipelineError(f"{exc}; not replaced: move it away to calibrate again") from None
    if previous is not None:
        record = {**record, "previous": {k: v for k, v in previous.items() if k != "previous"}}
    write_json(path, record)
    return path


def read(path: Path, category: str, name: str) -> dict | None:
    """The deployment record at `path`, checked; None when there is none."""
    if not path.exists() and not path.is_symlink():
        return None
    mine = "a deployment file written by python -m stages.calibrate"
    if path.is_symlink() or not path.is_file():
        raise PipelineError(f"{path}: not a regular file (a link, folder or device), so not {mine}")
    if path.stat().st_size > MAX_BYTES:
        raise PipelineError(f"{path}: {path.stat().st_size:,} bytes, too large to be {mine}")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PipelineError(f"{path}: not readable JSON ({type(exc).__name__}), so not {mine}") from None
    if not (isinstance(record, dict) and record.get("kind") == KIND):
        raise PipelineError(f"{path}: not {mine}")
    problem = _problem(record, category, name)
    if problem:
        raise PipelineError(f"{path}: a deployment file, but {problem}")
    return record


def _problem(record: dict, category: str, name: str) -> str | None:
    if record.get("version") != VERSION:
        return f"of version {record.get('version')!r}, not {VERSION}"
    if (record.get("category"), record.get("model")) != (category, name):
        return f"for {record.get('category')!r}/{record.get('model')!r}, not {category}/{name}"
    n, rank = record.get("n_images"), record.get("rank")
    if not (_finite(record.get("threshold")) and isinstance(record.get("rule"), str)
            and all(_finite(record.get(k)) and 0 < record[k] < 1 for k in ("false_alarms", "confidence"))
            and _int(n) and n >= 1 and _int(rank) and 1 <= rank <= n):
        return "its threshold, rule, target, confidence, n_images or rank is missing or out of range"
    identity = record.get("identity")
    if not (isinstance(identity, dict) and set(identity) == {"torch", "onnx"}
            and all(v is None or _identity_ok(v) for v in identity.values())):
        return "its model identity (the SHA-256 of the model files) is missing or malformed"
    return None


def _identity_ok(value) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("file"), str)
            and isinstance(value.get("sha256"), str) and _SHA256.fullmatch(value["sha256"]) is not None)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def stale(record: dict, runtime: str) -> str | None:
    """Why the record's threshold does not fit `runtime`'s scores of the model as it is now (None: it fits)."""
    recorded = record["identity"].get(runtime)
    if recorded is None:
        return f"it was calibrated before there was a {runtime} model file"
    current = runtime_identity(record["category"], record["model"], runtime)
    if current is None:
        return f"{recorded['file']} is gone"
    if current["file"] != recorded["file"]:
        return f"it was calibrated on {recorded['file']}, the model is now {current['file']}"
    if current["sha256"] != recorded["sha256"]:
        return f"{current['file']} has changed since (refitted or re-exported)"
    if current.get("score") != recorded.get("score"):
        return "evaluate's score params have changed since"
    return None


@dataclass
class ThresholdChoice:
    threshold: float
    line: str  # the one line predict, --watch and the demo show: the value and where it comes from
    deployment: dict | None  # the record in use, if any


def evaluate_source(model) -> str:
    """Where the model's own (evaluate's) threshold comes from, and its rule."""
    if model.runtime == "torch":
        scoring = scoring_file(model.category, model.name)
        rule = read_scoring(scoring, f"{model.category}-{model.name}")["threshold_rule"]
        return f"{scoring} (evaluate's: {rule})"
    return f"{model.path} (evaluate's threshold, in the export's metadata)"


def choose(model, evaluate_threshold: float, threshold_from: str = "auto", on_stale: str = "error") -> ThresholdChoice:
    """The threshold `model` applies: its deployment file's when there is one that fits it, else evaluate's.

    threshold_from: auto (the deployment file when present), deployment (it must be present) or
    evaluate (ignore it). A deployment file for another fit is never used silently: with on_stale
    "error" it is a one-line error, with "evaluate" evaluate's threshold is used and the line says why.
    """
    if threshold_from not in THRESHOLD_FROM:
        raise PipelineError(f"--threshold-from: {threshold_from!r} is not one of {', '.join(THRESHOLD_FROM)}")
    path = deployment_file(model.category, model.name)
    own = f"threshold {evaluate_threshold:.6g} from {evaluate_source(model)}"
    if threshold_from == "evaluate":
        return ThresholdChoice(evaluate_threshold, own + " (--threshold-from evaluate)", None)
    record = read(path, model.category, model.name)
    if record is None:
        if threshold_from == "deployment":
            raise PipelineError(f"{path}: no deployment file (python -m stages.calibrate {model.name} <good images> "
                                "writes one)")
        return ThresholdChoice(evaluate_threshold, f"{own}; no {path} (python -m stages.calibrate sets one from "
                                                   "your own good images)", None)
    reason = stale(record, model.runtime)
    if reason is not None:
        if on_stale == "error" or threshold_from == "deployment":
            raise PipelineError(f"{path}: calibrated for another fit of {model.category}/{model.name} ({reason}); "
                                "calibrate again (python -m stages.calibrate), or use evaluate's threshold with "
                                "--threshold-from evaluate")
        return ThresholdChoice(evaluate_threshold, f"{own}; {path} is NOT used: {reason} (calibrate again)", None)
    line = (f"threshold {record['threshold']:.6g} from {path}: calibrated on {record['n_images']} good images "
            f"({record['images']}, {record['runtime']} runtime, {record['created']}), at most "
            f"{percent(record['false_alarms'])} false alarms with {percent(record['confidence'])} confidence")
    return ThresholdChoice(float(record["threshold"]), line, record)


def apply(model, choice: ThresholdChoice, evaluate_scale: ColourScale) -> None:
    """Set the model's threshold, and the top of its colour scale with it (full colour = the threshold)."""
    model.threshold = choice.threshold
    calibrated = choice.deployment is not None and choice.threshold > evaluate_scale.low
    model.colour_scale = ColourScale(evaluate_scale.low, choice.threshold) if calibrated else evaluate_scale
