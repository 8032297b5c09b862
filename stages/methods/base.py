"""The small estimator-like interface every method implements.

fit(train, val) on defect-free data; predict(inputs) -> Prediction(image_scores, anomaly_maps);
save(directory) / load(directory). Feature methods take a FeatureSet (cached by the extract stage),
pixel methods take a prepared Split.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from stages.common import PipelineError

STATE_FILE = "model.pt"


@dataclass
class Prediction:
    image_scores: np.ndarray  # (N,) float64, higher = more anomalous
    anomaly_maps: np.ndarray | None  # (N, H, W) float32 at the prepared image size, or None


class TrainingDiverged(PipelineError):
    """Raised by trained methods when the loss becomes NaN or infinite."""


class AnomalyDetector:
    method: ClassVar[str]  # registry key
    uses: ClassVar[str]  # "features" or "pixels"

    def __init__(self, device: str = "cpu", **hparams: Any):
        self.hparams = hparams  # exactly the params.yaml entry (minus method/backbone); saved with the model
        self.device = device  # where fit/predict run; not part of the saved state
        self.history: list[dict] = []  # per-epoch losses of trained methods, logged by the fit stage

    def fit(self, train, val=None) -> "AnomalyDetector":
        raise NotImplementedError

    def predict(self, inputs) -> Prediction:
        raise NotImplementedError

    # Subclasses return / accept a dict of tensors and plain values.
    def get_state(self) -> dict:
        raise NotImplementedError

    def set_state(self, state: dict) -> None:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"method": self.method, "hparams": self.hparams, "state": self.get_state()},
            directory / STATE_FILE,
        )

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "AnomalyDetector":
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise PipelineError(f"{path}: fitted model not found (run the fit stage)")
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if blob["method"] != cls.method:
            raise PipelineError(f"{path}: holds a '{blob['method']}' model, not '{cls.method}'")
        detector = cls(device=device, **blob["hparams"])
        detector.set_state(blob["state"])
        return detector
