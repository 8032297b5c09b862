"""Named model entries of params.yaml (`models.<name>`: method + backbone + hyper-parameters)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.common import PipelineError, check, param
from stages.data.prepared import load_split
from stages.features import load_features
from stages.methods import get_method
from stages.methods.base import AnomalyDetector

PIXELS = "pixels"  # the `backbone` of models that read the prepared images themselves
FEATURES_ROOT = Path("data/features")
MODELS_ROOT = Path("models")


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
        except TypeError as exc:  # an unknown or missing hyper-parameter
            raise PipelineError(f"models.{self.name}: {exc}") from exc
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
