"""Named model entries of params.yaml (`models.<name>`: method + backbone + hyper-parameters)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from stages.common import PipelineError, check, load_params, param, resolve_device
from stages.data.prepared import load_split
from stages.features import load_features
from stages.methods import get_method
from stages.methods.base import AnomalyDetector
from stages.paths import FEATURES_ROOT, MODELS_ROOT, PIXELS


@dataclass
class ModelConfig:
    name: str
    method: str
    backbone: str
    hparams: dict

    @property
    def directory(self) -> Path:
        return MODELS_ROOT / self.name

    def detector_class(self) -> type[AnomalyDetector]:
        try:
            return get_method(self.method)
        except PipelineError as exc:
            raise PipelineError(f"models.{self.name}.method: {exc}") from exc

    def build(self, device: str) -> AnomalyDetector:
        cls = self.detector_class()
        try:
            return cls(device=device, **self.hparams)
        except TypeError as exc:  # an unknown or mistyped hyper-parameter name
            raise PipelineError(f"models.{self.name}: unknown hyper-parameter ({exc})") from exc
        except PipelineError as exc:
            raise PipelineError(f"models.{self.name}: {exc}") from exc

    def load_inputs(self, split: str):
        """The representation this model reads: prepared pixels or a backbone's cached features."""
        path = FEATURES_ROOT / self.backbone
        if self.backbone == PIXELS:
            return load_split(path / f"{split}.npz")
        return load_features(path / f"{split}.pt")


def model_config(params: dict, name: str) -> ModelConfig:
    entry = param(params, f"models.{name}")
    check(isinstance(entry, dict), f"models.{name}: expected a mapping with method and backbone")
    hparams = dict(entry)
    method = hparams.pop("method", None)
    backbone = hparams.pop("backbone", None)
    check(isinstance(method, str), f"models.{name}.method: missing")
    check(isinstance(backbone, str), f"models.{name}.backbone: missing (a name from `backbones:`, or '{PIXELS}')")
    config = ModelConfig(name, method, backbone, hparams)
    cls = config.detector_class()
    if cls.uses == "pixels" and backbone != PIXELS:
        raise PipelineError(f"models.{name}.backbone: method {method} reads images; set backbone: {PIXELS}")
    if cls.uses == "features":
        check(backbone != PIXELS, f"models.{name}.backbone: method {method} needs a feature backbone, not '{PIXELS}'")
        check(
            backbone in (params.get("backbones") or {}),
            f"models.{name}.backbone: '{backbone}' is not configured under `backbones:` in params.yaml",
        )
    return config


def model_from_argv(stage: str) -> tuple[dict, ModelConfig, str]:
    """The shared start of fit/evaluate: `python -m stages.<stage> <model>` -> params, config, device."""
    if len(sys.argv) != 2:
        raise PipelineError(f"usage: python -m stages.{stage} <model name from params.yaml models>")
    params = load_params()
    config = model_config(params, sys.argv[1])
    return params, config, resolve_device(param(params, "device", "auto"))
