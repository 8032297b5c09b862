"""A fitted model ready to score raw images with the pipeline's own code (the torch runtime).

- FittedModel: the first seed's fit (models/<category>.category/<model>.model/seed-<s>/model.pt), its
  backbone cut after the last layer it reads, and evaluate's scoring record (threshold, colour scale).
- DeployedModule: the same as one torch module, uint8 image in, score and map out: normalisation,
  backbone, the method's scorer (stages/methods/*.py); stages/deploy/onnx_model.py exports it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stages.core.errors import PipelineError
from stages.core.paths import model_dir, scoring_file, seed_dir
from stages.data.prepared import Split
from stages.deploy.inputs import PreparesInputs
from stages.deploy.overlay import ColourScale
from stages.deploy.record import read_scoring
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
        return cls(
            category,
            name,
            detector,
            detector.inputs["preprocess"],
            detector.inputs["backbone"],
            float(record["threshold"]),
            ColourScale(**record["colour_scale"]),
            int(record["seed"]),
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
        """(N, H, W, 3) uint8 prepared images -> image scores and anomaly maps."""
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
