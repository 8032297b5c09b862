"""Named model entries of params.yaml: `models.<name>` = method + backbone + `fit` + `score` blocks.

`fit` holds what fitting reads (it shapes the saved model; the fit stage declares it), `score` what
scoring reads (the evaluate stage declares it, and passes it to the loaded model), each checked
against the method's own schema (`Fit` / `Score` in stages/methods/<method>.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from stages.common import PipelineError, load_params, param, resolve_device
from stages.data.prepared import load_split
from stages.features import load_features
from stages.methods import get_method
from stages.methods.base import AnomalyDetector
from stages.paths import FEATURES_ROOT, MODELS_ROOT, PIXELS
from stages.schema import Schema, parse


@dataclass
class ModelConfig:
    name: str
    method: str
    backbone: str
    fit: Schema
    score: Schema

    @property
    def directory(self) -> Path:
        return MODELS_ROOT / self.name

    def detector_class(self) -> type[AnomalyDetector]:
        return get_method(self.method)

    def build(self, device: str) -> AnomalyDetector:
        return self.detector_class()(fit=self.fit, score=self.score, device=device)

    def load(self, device: str) -> AnomalyDetector:
        """The fitted model as the fit stage saved it, scoring with today's `score` params."""
        return self.detector_class().load(self.directory, score=self.score, device=device)

    def load_inputs(self, split: str):
        """The representation this model reads: prepared pixels or a backbone's cached features."""
        path = FEATURES_ROOT / self.backbone
        if self.backbone == PIXELS:
            return load_split(path / f"{split}.npz")
        return load_features(path / f"{split}.pt")


def model_config(params: dict, name: str) -> ModelConfig:
    """`params` as stages.params.load_params returns them (entry shape, method and backbone checked)."""
    models = param(params, "models")
    if name not in models:
        known = ", ".join(models) or "none"
        raise PipelineError(f"models.{name}: no such model in params.yaml (known: {known})")
    entry = models[name]
    where = f"models.{name}"
    try:
        cls = get_method(entry["method"])
    except PipelineError as exc:
        raise PipelineError(f"{where}.method: {exc}") from exc
    if cls.uses == "pixels" and entry["backbone"] != PIXELS:
        raise PipelineError(f"{where}.backbone: method {cls.method} reads images; set backbone: {PIXELS}")
    if cls.uses == "features" and entry["backbone"] == PIXELS:
        raise PipelineError(f"{where}.backbone: method {cls.method} needs a feature backbone, not '{PIXELS}'")
    fit = parse(cls.Fit, entry["fit"], f"{where}.fit")
    score = parse(cls.Score, entry["score"], f"{where}.score")
    return ModelConfig(name, cls.method, entry["backbone"], fit, score)


def model_from_argv(stage: str) -> tuple[dict, ModelConfig, str]:
    """The shared start of fit/evaluate: `python -m stages.<stage> <model>` -> params, config, device."""
    if len(sys.argv) != 2:
        raise PipelineError(f"usage: python -m stages.{stage} <model name from params.yaml models>")
    params = load_params()
    config = model_config(params, sys.argv[1])
    return params, config, resolve_device(param(params, "device"))
