"""The small estimator-like interface every method implements.

A method declares two parameter schemas: `Fit` (what fitting reads: it shapes the saved model) and
`Score` (what scoring reads: smoothing, neighbours, how a map becomes an image score). The fit stage
reads `models.<name>.fit`, the evaluate stage `models.<name>.score`, so changing a scoring param
re-scores without refitting.

fit(train, val) on defect-free data; predict(inputs) -> Prediction(image_scores, anomaly_maps)
with the current `score_params`; save(directory) keeps the fit params and the state;
load(directory, score=...) restores them with scoring params of the caller's choosing. Feature
methods take a FeatureSet (cached by the extract stage), pixel methods a prepared Split.

Scoring is one torch module per fitted model, `scorer(image_size)`: from the method's inputs
(the prepared uint8 images, the backbone's feature maps, or its global embeddings) to
(image scores, anomaly maps at the image size or None), in that order for every method (MapHead
too). predict() runs it batch by batch; the export stage puts the same module, behind the
backbone, into an ONNX graph, so both runtimes compute one definition.

Fitted or not (scikit-learn's check_is_fitted): a method names what fit() learns in
`fitted_attributes`; `_require_fitted()` refuses, in one line, to score or save while any is None.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from stages.core.errors import PipelineError
from stages.core.progress import progress_bar
from stages.core.schema import Schema, parse
from stages.core.torch_files import load_tensors

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
    uses_global_embedding: ClassVar[bool] = False  # features: the global embedding, not the maps
    Fit: ClassVar[type[Schema]] = NoParams
    Score: ClassVar[type[Schema]] = NoParams
    # what fit() learns and load() restores (None before): scoring and saving need every one of them
    fitted_attributes: ClassVar[tuple[str, ...]] = ()

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

    def scorer(self, image_size: tuple[int, int]) -> torch.nn.Module:
        """The fitted model as a module: scorer(*scorer_inputs(...)) -> (image scores (N,), maps (N, H, W) or None).
        Starts with self._require_fitted()."""
        raise NotImplementedError

    def _require_fitted(self, *attributes: str) -> None:
        """scikit-learn's check_is_fitted: a one-line PipelineError unless fit() or load() has set
        `attributes` (default: the method's fitted_attributes). Every method's scorer, save and the
        cached scorer call it, so an unfitted model says so the same way whatever the method."""
        names = attributes or self.fitted_attributes
        if not names:
            raise TypeError(f"{type(self).__name__} declares no fitted_attributes")
        if any(getattr(self, name, None) is None for name in names):
            raise PipelineError(f"{self.method}: not fitted (call fit() or load() first)")

    def batch_size(self) -> int:
        return getattr(self.score_params, "batch_size", 8)

    def scorer_inputs(self, inputs, start: int, stop: int) -> list[torch.Tensor]:
        """Images start..stop of a prepared Split or FeatureSet, as the scorer takes them."""
        if self.uses == "pixels":
            return [torch.from_numpy(np.ascontiguousarray(inputs.images[start:stop]))]
        if self.uses_global_embedding:
            return [inputs.global_embeddings[start:stop].float()]
        if not inputs.feature_maps:
            raise PipelineError(f"{self.method}: the feature cache holds no feature maps")
        return [m[start:stop].float() for m in inputs.feature_maps.values()]  # in the order of the layers

    def cached_scorer(self, image_size: tuple[int, int]) -> torch.nn.Module:
        """scorer(image_size), built once per size (predict and the demo score image after image)."""
        self._require_fitted()
        cache = self.__dict__.setdefault("_scorers", {})  # score_params are fixed for a detector's life
        if tuple(image_size) not in cache:
            cache[tuple(image_size)] = self.scorer(tuple(image_size)).to(self.device).eval()
        return cache[tuple(image_size)]

    @torch.no_grad()
    def predict(self, inputs, progress: bool = True) -> Prediction:
        """Image scores and maps of a prepared Split or FeatureSet, batch by batch: a bar of its own unless
        `progress` is False (predict and the demo, whose own bar counts the images)."""
        scorer = self.cached_scorer(tuple(inputs.image_size))
        scores, maps = [], []
        step = self.batch_size()
        for start in progress_bar(range(0, len(inputs), step), show=progress, desc="score", unit="batch"):
            batch = [t.to(self.device) for t in self.scorer_inputs(inputs, start, start + step)]
            score, amap = scorer(*batch)
            scores.append(score.double().cpu().numpy())
            if amap is not None:
                maps.append(amap.float().cpu().numpy())
        if not scores:
            return Prediction(np.zeros(0, np.float64), None)
        return Prediction(np.concatenate(scores), np.concatenate(maps) if maps else None)

    # Subclasses return / accept a dict of tensors and plain values.
    def get_state(self) -> dict:
        raise NotImplementedError

    def set_state(self, state: dict) -> None:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        self._require_fitted()  # before the folder: an unfitted model leaves nothing behind
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        blob = {"method": self.method, "fit": self.fit_params.as_dict(), "seed": self.seed, "inputs": self.inputs,
                "state": self.get_state()}
        torch.save(blob, directory / STATE_FILE)

    @classmethod
    def load(cls, directory: str | Path, score: Schema | dict | None = None, device: str = "cpu") -> "AnomalyDetector":
        """The fitted model saved in `directory`, scoring with `score` (tensors and plain data only: see
        stages/core/torch_files.py)."""
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
