"""Named model entries of params.yaml: `models.<name>` = method + backbone + `fit` + `score` blocks, and
an optional `reference`: the name of a table of published results (references/<name>.csv) that the
report shows beside this model's intervals.

`fit` holds what fitting reads (it shapes the saved model; the fit stage declares it), `score` what
scoring reads (the evaluate stage declares it, and passes it to the loaded model), each checked
against the method's own schema (`Fit` / `Score` in stages/methods/<method>.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.core.cli import stage_args
from stages.core.device import resolve_device
from stages.core.errors import PipelineError
from stages.core.params import param
from stages.core.paths import PIXELS, features_dir, model_dir, plots_dir, seed_dir
from stages.core.schema import Schema, parse
from stages.data.prepared import load_split
from stages.features.cache import load_features
from stages.methods import get_method
from stages.methods.base import AnomalyDetector


@dataclass
class ModelConfig:
    category: str
    name: str
    method: str
    backbone: str
    fit: Schema
    score: Schema
    fit_seeds: list[int]  # params.yaml fit_seeds
    reference: str | None = None  # a table of published results to show beside this model's (references/<name>.csv)

    @property
    def directory(self) -> Path:
        return model_dir(self.category, self.name)

    @property
    def features(self) -> Path:
        return features_dir(self.category, self.backbone)

    @property
    def plots(self) -> Path:
        return plots_dir(self.category, self.name)

    @property
    def stage(self) -> str:
        return f"{self.category}-{self.name}"  # the @-suffix of this model's stages in dvc.yaml

    def detector_class(self) -> type[AnomalyDetector]:
        return get_method(self.method)

    def build(self, device: str, seed: int) -> AnomalyDetector:
        return self.detector_class()(fit=self.fit, score=self.score, device=device, seed=seed)

    @property
    def seeds(self) -> list[int]:
        """The seeds this model is fitted with: every seed of fit_seeds if its fit draws random
        numbers, else the first alone (a second fit would be the same)."""
        if self.build("cpu", self.fit_seeds[0]).draws_random_numbers():
            return list(self.fit_seeds)
        return self.fit_seeds[:1]

    def seed_directory(self, seed: int) -> Path:
        return seed_dir(self.category, self.name, seed)

    def load(self, device: str, seed: int) -> AnomalyDetector:
        """The fit of `seed` as the fit stage saved it, scoring with today's `score` params."""
        return self.detector_class().load(self.seed_directory(seed), score=self.score, device=device)

    def load_inputs(self, split: str):
        """The representation this model reads: prepared pixels or a backbone's cached features."""
        if self.backbone == PIXELS:
            return load_split(self.features / f"{split}.npz")
        return load_features(self.features / f"{split}.pt")


def model_config(params: dict, category: str, name: str) -> ModelConfig:
    """`params` as stages.core.params.load_params returns them (entry shape, method and backbone checked)."""
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
    return ModelConfig(category, name, cls.method, entry["backbone"], fit, score, list(params["fit_seeds"]),
                       entry.get("reference"))


def model_from_argv(stage: str, device: str | None = None) -> tuple[dict, ModelConfig, str]:
    """The shared start of fit/evaluate/figures/export: `python -m stages.<stage> <category> <model>` ->
    params, config, device: params.yaml `device`, or `device` when the stage runs on one whatever params
    say (export: never resolves `device: cuda`, so a CPU-only machine exports). The numerics mode is
    applied to torch either way."""
    params, (category, name) = stage_args(stage, "<category> <model>")
    config = model_config(params, category, name)
    return params, config, resolve_device(param(params, "device") if device is None else device)
