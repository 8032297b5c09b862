"""The small estimator-like interface every method implements.

A method declares two parameter schemas: `Fit` (what fitting reads: it shapes the saved model) and
`Score` (what scoring reads: smoothing, neighbours, how a map becomes an image score). The fit stage
reads `models.<name>.fit`, the evaluate stage `models.<name>.score`, so changing a scoring param
re-scores without refitting.

fit(train, val) on defect-free data; predict(inputs) -> Prediction(image_scores, anomaly_maps)
with the current `score_params`; save(directory) keeps the fit params and the state;
load(directory, score=...) restores them with scoring params of the caller's choosing. Feature
methods take a FeatureSet (cached by the extract stage), pixel methods a prepared Split.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from stages.errors import PipelineError
from stages.schema import Schema, parse
from stages.torch_files import load_tensors

STATE_FILE = "model.pt"


@dataclass
class Prediction:
    image_scores: np.ndarray  # (N,) float64, higher = more anomalous
    anomaly_maps: np.ndarray | None  # (N, H, W) float32 at the prepared image size, or None

    def row(self, i: int) -> "Prediction":
        """The prediction of image i alone."""
        maps = None if self.anomaly_maps is None else self.anomaly_maps[i : i + 1]
        return Prediction(self.image_scores[i : i + 1], maps)


class TrainingDiverged(PipelineError):
    """Raised by trained methods when the loss becomes NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class NoParams(Schema):
    """A block with nothing to set."""


def as_params(schema: type[Schema], given: Schema | dict | None, where: str) -> Schema:
    """A schema instance from an instance, a params.yaml mapping or None (all defaults)."""
    if isinstance(given, schema):
        return given
    return parse(schema, given, where)


class AnomalyDetector:
    method: ClassVar[str]  # registry key, and the name of the method's file in stages/methods/
    uses: ClassVar[str]  # "features" or "pixels"
    Fit: ClassVar[type[Schema]] = NoParams
    Score: ClassVar[type[Schema]] = NoParams

    def __init__(self, fit: Schema | dict | None = None, score: Schema | dict | None = None, device: str = "cpu",
                 seed: int = 0):
        self.fit_params = as_params(self.Fit, fit, "fit")
        self.score_params = as_params(self.Score, score, "score")
        self.device = device  # where fit/predict run; not part of the saved state
        self.seed = int(seed)  # of every random draw of the fit (params.yaml fit_seeds): saved
        self.history: list[dict] = []  # per-epoch losses of trained methods, logged by the fit stage
        self.inputs: dict = {}  # how the inputs were made (preprocess, backbone): saved, for predict

    def fit(self, train, val=None) -> "AnomalyDetector":
        raise NotImplementedError

    def draws_random_numbers(self) -> bool:
        """Whether fit() depends on the seed: the fit stage fits such a model once per seed of
        `fit_seeds`, any other once."""
        return False

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
        blob = {"method": self.method, "fit": self.fit_params.as_dict(), "seed": self.seed, "inputs": self.inputs,
                "state": self.get_state()}
        torch.save(blob, directory / STATE_FILE)

    @classmethod
    def load(cls, directory: str | Path, score: Schema | dict | None = None, device: str = "cpu") -> "AnomalyDetector":
        """The fitted model saved in `directory`, scoring with `score` (tensors and plain data only: see
        stages/torch_files.py)."""
        path = Path(directory) / STATE_FILE
        blob = read_state(path)
        if blob.get("method") != cls.method:
            raise PipelineError(f"{path}: holds no '{cls.method}' model of this version (run the fit stage again)")
        detector = cls(fit=blob["fit"], score=score, device=device, seed=blob.get("seed", 0))
        detector.inputs = blob.get("inputs", {})
        detector.set_state(blob["state"])
        return detector


def read_state(path: Path) -> dict:
    """A saved model file: checked for presence and shape, never executed."""
    if not path.is_file():
        raise PipelineError(f"{path}: fitted model not found (run the fit stage)")
    blob = load_tensors(path, "fitted model", "run the fit stage again")
    if not isinstance(blob.get("method"), str) or not isinstance(blob.get("fit"), dict) or "state" not in blob:
        raise PipelineError(f"{path}: holds no fitted model of this version (run the fit stage again)")
    return blob
