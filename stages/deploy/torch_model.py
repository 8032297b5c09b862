"""A fitted model ready to score raw images with the pipeline's own code (the torch runtime).

- FittedModel: the first seed's fit (models/<category>.category/<model>.model/seed-<s>/model.pt), its
  backbone cut after the last layer it reads, and evaluate's scoring record (threshold, colour scale).
- DeployedModule: the same as one torch module, uint8 image in, score and map out: normalisation,
  backbone, the method's scorer (stages/methods/*.py); stages/deploy/onnx_model.py exports it.

A model.pt travels (a DVC remote, a colleague): `weights_only` keeps its pickle from running code, and
its plain values are checked here before anything uses them: the input recipe against the params
schema's bounds, the backbone entry's types, and its weights path, which must lie under weights/ (or
be null: the packaged weights). A path elsewhere is refused before it is touched, in the same words
whether it exists or not. A score that is not finite (a NaN state) is an error, never a verdict.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.core.errors import PipelineError
from stages.core.params import NAME, Backbone
from stages.core.paths import WEIGHTS_ROOT, model_dir, scoring_file, seed_dir
from stages.core.schema import parse, shown
from stages.data.prepared import Split
from stages.deploy.inputs import PreparesInputs
from stages.deploy.overlay import ColourScale
from stages.deploy.record import check_recipe, read_scoring
from stages.methods import load_fitted
from stages.methods.base import STATE_FILE, AnomalyDetector, Prediction


@dataclass
class FittedModel(PreparesInputs):
    """A fitted detector with what it needs to score a raw image: its input recipe and threshold."""

    category: str
    name: str
    detector: AnomalyDetector
    preprocess: dict  # resize, crop_size
    backbone: dict | None  # name, arch, layers, weights; None for pixel models
    threshold: float
    colour_scale: ColourScale
    seed: int
    source: Path | None = None  # the model.pt it was read from, named in errors
    runtime = "torch"

    @classmethod
    def load(cls, category: str, name: str, device: str = "cpu") -> "FittedModel":
        folder, scoring, stage = model_dir(category, name), scoring_file(category, name), f"{category}-{name}"
        if not folder.is_dir():
            raise PipelineError(
                f"{folder}: model '{name}' was never fitted for {category} (run `dvc repro fit@{stage}`)"
            )
        if not scoring.is_file():
            raise PipelineError(
                f"{scoring}: model '{name}' was never evaluated for {category} (run `dvc repro evaluate@{stage}`)"
            )
        record = read_scoring(scoring, stage)  # the fit of the first seed: the one evaluate's threshold is for
        state = seed_dir(category, name, record["seed"]) / STATE_FILE
        detector = load_fitted(state.parent, score=record["score"], device=device)
        if not detector.inputs:
            raise PipelineError(f"{state}: fitted before models recorded their inputs; rerun `dvc repro fit@{stage}`")
        if not isinstance(detector.inputs, dict):
            raise PipelineError(f"{state}: its inputs are not a mapping (got {shown(detector.inputs)}); "
                                f"rerun `dvc repro fit@{stage}`")
        return cls(
            category,
            name,
            detector,
            check_recipe(detector.inputs.get("preprocess"), f"{state}: inputs.preprocess"),
            check_backbone(detector.inputs.get("backbone"), detector.uses, state),
            float(record["threshold"]),
            ColourScale(**record["colour_scale"]),
            int(record["seed"]),
            state,
        )

    def __post_init__(self) -> None:
        self.extractor = None
        if self.backbone is not None:  # load the backbone once, before any image is timed
            from stages.features.backbones import FeatureExtractor, load_backbone

            arch = self.backbone["arch"]
            uses_global = self.detector.uses_global_embedding
            self.extractor = FeatureExtractor(
                arch,
                load_backbone(arch, self.backbone["weights"]),
                self.backbone["layers"],
                self.detector.device,
                with_global=uses_global,
                with_maps=not uses_global,
            )

    def score(self, images: np.ndarray, names: list[str]) -> Prediction:
        """(N, H, W, 3) uint8 prepared images -> image scores and anomaly maps; a failure is one PipelineError
        naming the images and the model file (MemoryError stays one, torch's CPU allocator's included)."""
        try:
            prediction = self._score(images, names)
        except (PipelineError, MemoryError):
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise scoring_failed(exc, names, self.source) from None
        return checked(prediction, names, self.source)

    def _score(self, images: np.ndarray, names: list[str]) -> Prediction:
        # no bars: the callers (predict, the demo, the export's parity check) score chunk after chunk
        if self.backbone is None:
            n = len(images)
            split = Split(images, names, np.zeros(n, np.int64), ["unknown"] * n, None)
            return self.detector.predict(split, progress=False)
        from stages.features.cache import FeatureSet

        extracted = self.extractor(images, batch_size=16, progress=False)
        return self.detector.predict(
            FeatureSet(extracted.global_embeddings, extracted.feature_maps, tuple(images.shape[1:3]), names),
            progress=False,
        )


BACKBONE_KEYS = {"name", "arch", "layers", "weights"}


def check_backbone(backbone, uses: str, state: Path) -> dict | None:
    """model.pt's `inputs.backbone` (name, arch, layers, weights), or None for a pixel model: checked."""
    where = f"{state}: inputs.backbone"
    if uses == "pixels":
        if backbone is not None:
            raise PipelineError(f"{where}: a model of the prepared images has no backbone, got {shown(backbone)}")
        return None
    if not isinstance(backbone, dict) or set(backbone) != BACKBONE_KEYS:
        raise PipelineError(f"{where}: not a backbone entry (name, arch, layers, weights), got {shown(backbone)}")
    name, arch = backbone["name"], backbone["arch"]
    if not (isinstance(name, str) and NAME.fullmatch(name) and isinstance(arch, str) and NAME.fullmatch(arch)):
        raise PipelineError(f"{where}: name and arch must be plain names, got {shown(name)} and {shown(arch)}")
    parse(Backbone, {"arch": arch, "layers": backbone["layers"], "weights": backbone["weights"]}, where)
    weights = backbone["weights"]
    # Decided on the text alone, before the path is touched: the answer is the same whether a file
    # is there or not, so a crafted model.pt learns nothing of the machine it is loaded on. A link
    # inside weights/ is the project's own (as extract's weights_file allows).
    if weights is not None and not Path(os.path.abspath(weights)).is_relative_to(Path.cwd() / WEIGHTS_ROOT):
        raise PipelineError(f"{where}.weights: {shown(weights)} is not under {WEIGHTS_ROOT}/, where a fitted model's "
                            "backbone checkpoint must lie (refit it with backbones.<name>.weights there)")
    return dict(backbone)


def _named(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{len(names)} images ({', '.join(names[:3])}{', ...' * (len(names) > 3)})"


def scoring_failed(exc: BaseException, names: list[str], source) -> Exception:
    """What a runtime's failure on `names` becomes: MemoryError for an allocation failure (torch's CPU
    allocator raises RuntimeError), else one PipelineError line naming the images and the model file."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "can't allocate memory" in text or "out of memory" in text.lower() or "Failed to allocate" in text:
        return MemoryError(f"{_named(names)}: out of memory while scoring ({text[:160]})")
    return PipelineError(f"{_named(names)}: {source} could not score it ({type(exc).__name__}: {text[:160]})")


def checked(prediction: Prediction, names: list[str], source) -> Prediction:
    """The prediction, if every score and map value is finite: a NaN or infinite score has no verdict."""
    bad = [i for i, value in enumerate(prediction.image_scores) if not np.isfinite(value)]
    if not bad and prediction.anomaly_maps is not None:
        bad = [i for i, m in enumerate(prediction.anomaly_maps) if not np.isfinite(m).all()]
    if bad:
        raise PipelineError(
            f"{_named([names[i] for i in bad])}: {source} gave a score or map that is not finite "
            f"({prediction.image_scores[bad[0]]}): its fitted state is corrupt (run the fit stage again)"
        )
    return prediction


class DeployedModule(nn.Module):
    """uint8 RGB images (N, H, W, 3) at the model's input size -> (scores (N,), maps (N, H, W)): the
    whole of FittedModel.score as one module (no map output for a model without maps)."""

    def __init__(self, fitted: FittedModel):
        super().__init__()
        self.extractor = fitted.extractor
        self.backbone = fitted.extractor.backbone if fitted.extractor is not None else None
        self.scorer = fitted.detector.scorer(fitted.input_size).eval()

    def forward(self, images: torch.Tensor):
        if self.backbone is None:
            inputs = [images]
        else:
            outputs = self.backbone(self.extractor.normalise(images))
            if self.extractor.with_global:
                inputs = [self.extractor.as_global(outputs[self.extractor.spec.global_module]).float()]
            else:
                inputs = [self.extractor.as_map(outputs[name]).float() for name in self.extractor.layers]
        scores, maps = self.scorer(*inputs)
        return scores if maps is None else (scores, maps)
