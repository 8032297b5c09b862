"""A fitted model ready to score raw images, on either runtime: torch (the pipeline's own code) or
ONNX (the graph the export stage writes). predict and the demo use these; both runtimes share the
input recipe (stages/data/raw.py resize and crop) and give (image scores, anomaly maps).

- FittedModel: the first seed's fit (models/<category>.category/<model>.model/seed-<s>/model.pt), its
  backbone cut after the last layer it reads, and evaluate's scoring record (threshold, colour scale).
- DeployedModule: the same as one torch module, uint8 image in, score and map out: normalisation,
  backbone, the method's scorer (stages/methods/*.py).
  torch.onnx exports it to models/<category>.category/<model>.export/model.onnx (stages/export.py).
- OnnxModel: that file alone, through onnxruntime: everything it needs is in the file's metadata.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from stages import numerics
from stages.data.prepared import Split
from stages.data.raw import read_image, resize_and_crop
from stages.errors import PipelineError
from stages.methods import load_fitted
from stages.methods.base import STATE_FILE, AnomalyDetector, Prediction
from stages.overlay import ColourScale
from stages.paths import CATEGORY_SUFFIX, MODEL_SUFFIX, MODELS_ROOT, model_dir, onnx_file, scoring_file, seed_dir
from stages.scoring import read_scoring

RUNTIMES = ("torch", "onnx")


def fitted_models() -> list[tuple[str, str]]:
    """(category, model) of every model that `dvc repro` has fitted and evaluated."""
    found = []
    for folder in sorted(MODELS_ROOT.glob(f"*{CATEGORY_SUFFIX}/*{MODEL_SUFFIX}")):
        category, name = folder.parts[-2][: -len(CATEGORY_SUFFIX)], folder.name[: -len(MODEL_SUFFIX)]
        if scoring_file(category, name).is_file() and any(folder.glob(f"seed-*/{STATE_FILE}")):
            found.append((category, name))
    return found


def prepare(path, preprocess: dict) -> np.ndarray:
    """One image file (or file object) -> (H, W, 3) uint8, resized and cropped as the training images were."""
    image = read_image(path, "RGB")
    # a writable copy: torch warns on (and must not share) the read-only buffer PIL hands out
    return np.array(resize_and_crop(image, preprocess["resize"], preprocess["crop_size"], Image.BILINEAR))


@dataclass
class FittedModel:
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
            raise PipelineError(f"{folder}: model '{name}' was never fitted for {category} (run `dvc repro fit@{stage}`)")
        if not scoring.is_file():
            raise PipelineError(f"{scoring}: model '{name}' was never evaluated for {category} "
                                f"(run `dvc repro evaluate@{stage}`)")
        record = read_scoring(scoring, stage)  # the fit of the first seed: the one evaluate's threshold is for
        state = seed_dir(category, name, record["seed"]) / STATE_FILE
        detector = load_fitted(state.parent, score=record["score"], device=device)
        if not detector.inputs:
            raise PipelineError(f"{state}: fitted before models recorded their inputs; rerun `dvc repro fit@{stage}`")
        return cls(category, name, detector, detector.inputs["preprocess"], detector.inputs["backbone"],
                   float(record["threshold"]), ColourScale(**record["colour_scale"]), int(record["seed"]))

    def __post_init__(self) -> None:
        self.extractor = None
        if self.backbone is not None:  # load the backbone once, before any image is timed
            from stages.backbones import FeatureExtractor, load_backbone

            arch = self.backbone["arch"]
            uses_global = self.detector.uses_global_embedding
            self.extractor = FeatureExtractor(arch, load_backbone(arch, self.backbone["weights"]), self.backbone["layers"],
                                              self.detector.device, with_global=uses_global, with_maps=not uses_global)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.preprocess["crop_size"], self.preprocess["crop_size"])

    def prepare(self, path) -> np.ndarray:
        return prepare(path, self.preprocess)

    def score(self, images: np.ndarray, names: list[str]) -> Prediction:
        """(N, H, W, 3) uint8 prepared images -> image scores and anomaly maps."""
        if self.backbone is None:
            n = len(images)
            return self.detector.predict(Split(images, names, np.zeros(n, np.int64), ["unknown"] * n, None))
        from stages.features import FeatureSet

        extracted = self.extractor(images, batch_size=16, desc=f"{self.backbone['name']} features")
        return self.detector.predict(FeatureSet(extracted.global_embeddings, extracted.feature_maps,
                                                tuple(images.shape[1:3]), names))


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


def metadata(fitted: FittedModel) -> dict[str, str]:
    """What the ONNX file carries besides the graph: the threshold, the colour scale, the input recipe."""
    spec = fitted.extractor.spec if fitted.extractor is not None else None
    return {
        "category": fitted.category, "model": fitted.name, "method": fitted.detector.method, "seed": str(fitted.seed),
        "threshold": repr(fitted.threshold),
        "threshold_rule": "anomalous when score >= threshold",
        "colour_scale": json.dumps({"low": fitted.colour_scale.low, "high": fitted.colour_scale.high}),
        "preprocess": json.dumps({**fitted.preprocess, "resample": "bilinear",
                                  "steps": "shorter side resized to `resize`, then the centre `crop_size` square"}),
        "normalisation": json.dumps({"mean": list(spec.mean), "std": list(spec.std), "of": "RGB / 255"}
                                    if spec is not None else {"of": "RGB / 255 (in the graph)"}),
        "backbone": json.dumps(fitted.backbone),
        "input": f"image: uint8 RGB, (1, {fitted.input_size[0]}, {fitted.input_size[1]}, 3)",
        "outputs": "score (1,)" + ("" if fitted.detector.uses_global_embedding else
                                  f", anomaly_map (1, {fitted.input_size[0]}, {fitted.input_size[1]})"),
    }


def export_onnx(fitted: FittedModel, path: Path) -> None:
    """The graph of DeployedModule, batch 1, with the metadata, at `path` (in a folder of its own: over
    ONNX's 2 GiB limit of one file, torch writes the weights to files beside it, which stay there)."""
    import onnx

    module = DeployedModule(fitted).eval()
    example = torch.zeros((1, *fitted.input_size, 3), dtype=torch.uint8)
    has_map = not fitted.detector.uses_global_embedding
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns of every shape it turns into a constant (the graph is for this input size only)
        # and the exporter of its own deprecation and constant folding: none of it changes the graph
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=18, input_names=["image"],
                          output_names=["score", "anomaly_map"] if has_map else ["score"])
    graph = onnx.load(str(path), load_external_data=False)  # the graph alone: external weights stay in their files
    for key, value in metadata(fitted).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def onnx_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if numerics.active_mode() == "strict":  # the pipeline's thread count (results still depend on the CPU's kernels)
        options.intra_op_num_threads, options.inter_op_num_threads = numerics.STRICT_THREADS, 1
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise PipelineError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:120]}; rerun the export stage)") from None


class OnnxModel:
    """An exported model file and onnxruntime: the same interface as FittedModel."""

    runtime = "onnx"

    @classmethod
    def load(cls, category: str, name: str) -> "OnnxModel":
        path = onnx_file(category, name)
        if not path.is_file():
            raise PipelineError(f"{path}: model '{name}' was never exported for {category} "
                                f"(run `dvc repro export@{category}-{name}`)")
        return cls.from_file(path, category, name)

    @classmethod
    def from_file(cls, path: Path, category: str, name: str) -> "OnnxModel":
        return cls(path, category, name)

    def __init__(self, path: Path, category: str, name: str):
        self.category, self.name, self.path = category, name, path
        self.session = onnx_session(path)
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.threshold = float(meta["threshold"])
            self.colour_scale = ColourScale(**json.loads(meta["colour_scale"]))
            recipe = json.loads(meta["preprocess"])
            self.preprocess = {"resize": int(recipe["resize"]), "crop_size": int(recipe["crop_size"])}
            self.seed = int(meta["seed"])
        except (KeyError, ValueError, TypeError) as exc:
            raise PipelineError(f"{path}: its metadata lacks the threshold or input recipe ({exc}); rerun the export stage") from None
        self.has_map = len(self.session.get_outputs()) > 1

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.preprocess["crop_size"], self.preprocess["crop_size"])

    def prepare(self, path) -> np.ndarray:
        return prepare(path, self.preprocess)

    def score(self, images: np.ndarray, names: list[str]) -> Prediction:
        scores, maps = [], []
        for image in images:  # the graph takes one image
            outputs = self.session.run(None, {"image": np.ascontiguousarray(image[None])})
            scores.append(float(outputs[0][0]))
            if self.has_map:
                maps.append(outputs[1][0].astype(np.float32))
        return Prediction(np.array(scores, dtype=np.float64), np.stack(maps) if maps else None)


def load_model(category: str, name: str, runtime: str = "torch", device: str = "cpu"):
    if runtime not in RUNTIMES:
        raise PipelineError(f"--runtime: unknown runtime {runtime!r} (torch or onnx)")
    if runtime == "onnx":
        if device != "cpu":
            raise PipelineError("--runtime onnx runs on the CPU (onnxruntime's CPU package); leave --device at cpu")
        return OnnxModel.load(category, name)
    return FittedModel.load(category, name, device=device)
