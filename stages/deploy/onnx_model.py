"""The export to ONNX and the exported file alone, through onnxruntime (the onnx runtime).

export_onnx writes DeployedModule's graph (stages/deploy/torch_model.py) with everything predict
needs in its metadata (threshold, colour scale, input recipe); OnnxModel reads nothing else.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from stages.core import numerics
from stages.core.errors import PipelineError
from stages.core.paths import onnx_file
from stages.deploy.inputs import PreparesInputs, exported_recipe, input_recipe
from stages.deploy.onnx_graph import read_checked
from stages.deploy.overlay import ColourScale
from stages.deploy.torch_model import DeployedModule, FittedModel, checked, scoring_failed
from stages.methods.base import Prediction


def metadata(fitted: FittedModel) -> dict[str, str]:
    """What the ONNX file carries besides the graph: the threshold, the colour scale, the input recipe."""
    spec = fitted.extractor.spec if fitted.extractor is not None else None
    return {
        "category": fitted.category, "model": fitted.name, "method": fitted.detector.method, "seed": str(fitted.seed),
        "threshold": repr(fitted.threshold),
        "threshold_rule": "anomalous when score >= threshold",
        "colour_scale": json.dumps({"low": fitted.colour_scale.low, "high": fitted.colour_scale.high}),
        "preprocess": json.dumps(exported_recipe(fitted.preprocess)),
        "normalisation": json.dumps({"mean": list(spec.mean), "std": list(spec.std), "of": "RGB / 255"}
                                    if spec is not None else {"of": "RGB / 255 (in the graph)"}),
        "backbone": json.dumps(fitted.backbone),
        "input": f"image: uint8 RGB, (1, {fitted.input_size[0]}, {fitted.input_size[1]}, 3)",
        "outputs": "score (1,)" + ("" if fitted.detector.uses_global_embedding else
                                  f", anomaly_map (1, {fitted.input_size[0]}, {fitted.input_size[1]})"),
    }


def export_onnx(fitted: FittedModel, path: Path) -> None:
    """The graph of DeployedModule, batch 1, with the metadata, at `path` (in a folder of its own: over
    ONNX's 2 GiB limit of one file, torch writes the weights to files beside it, which stay there).

    The exporter computes nothing, so the file is the same bytes on every CPU: every initializer is a
    tensor of the module, bit for bit. torch's constant folding would merge each BatchNorm into the
    convolution before it with torch's float32 sqrt, which is MKL's vector sqrt (not correctly rounded;
    its kernel depends on the CPU), and EfficientNet-Lite0's exports had other bytes on an Intel CPU.
    The BatchNorms stay in the graph and onnxruntime folds them when it loads the file (its basic
    optimisations, on by default): it runs the same graph at the same speed, from a file 2-4% larger
    that takes a few ms longer to load (bench/export_folding.py; bench/cross_cpu_check.py checks the
    bytes under emulated Intel and AMD CPUs, tests/test_predict.py the initializers on any CPU).
    """
    import onnx

    module = DeployedModule(fitted).eval()
    example = torch.zeros((1, *fitted.input_size, 3), dtype=torch.uint8)
    has_map = not fitted.detector.uses_global_embedding
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns of every shape it turns into a constant (the graph is for this input size only)
        # and the exporter of its own deprecation: none of it changes the graph
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=18, input_names=["image"],
                          output_names=["score", "anomaly_map"] if has_map else ["score"],
                          do_constant_folding=False)
    graph = onnx.load(str(path), load_external_data=False)  # the graph alone: external weights stay in their files
    for key, value in metadata(fitted).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


# the largest checked peak that runs with onnxruntime's memory arena: PatchCore on WideResNet-50 at 320 px with
# a 10 % coreset of MVTec AD's largest category peaks at 389 MiB (docs/explanation/security.md)
ARENA_MAX_PEAK_BYTES = 512 * 2**20


def onnx_session(path: Path):
    """An onnxruntime session of `path`, after its graph and metadata passed stages/deploy/onnx_graph.py:
    (session, CheckedGraph). Nothing else opens an export."""
    import onnxruntime

    onnxruntime.disable_telemetry_events()  # onnxruntime would queue usage events under ~/.cache otherwise
    graph = read_checked(path)  # before onnxruntime sees the file: a graph that could hang or allocate is refused
    options = onnxruntime.SessionOptions()
    # onnxruntime's memory arena keeps what the largest image needed for the life of the process, and without
    # it every image allocates again: PatchCore at 391 training images took 109.9 ms an image instead of 48.5
    # (bench/results/compare_export_n391_arena_off.txt, then compare_export_n391.txt). On for a graph whose
    # checked peak is small, as every export's is; off near the 2 GiB bound the graph check allows, where an
    # arena kept the demo at 3.9 GB.
    options.enable_cpu_mem_arena = graph.peak_bytes <= ARENA_MAX_PEAK_BYTES
    if numerics.active_mode() == "strict":  # the pipeline's thread count (results still depend on the CPU's kernels)
        options.intra_op_num_threads, options.inter_op_num_threads = numerics.STRICT_THREADS, 1
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise PipelineError(
            f"{path}: not a readable ONNX model ({' '.join(str(exc).split())[:200]}; rerun the export stage)"
        ) from None
    return session, graph


class OnnxModel(PreparesInputs):
    """An exported model file and onnxruntime: the same interface as FittedModel."""

    runtime = "onnx"

    @classmethod
    def load(cls, category: str, name: str) -> "OnnxModel":
        path = onnx_file(category, name)
        if not path.is_file():
            raise PipelineError(
                f"{path}: model '{name}' was never exported for {category} (run `dvc repro export@{category}-{name}`)"
            )
        return cls(path, category, name)

    def __init__(self, path: Path, category: str, name: str):
        self.category, self.name, self.path = category, name, path
        self.session, graph = onnx_session(path)
        self.threshold = graph.threshold
        self.colour_scale = ColourScale(**graph.colour_scale)
        self.preprocess = input_recipe(graph.preprocess)  # without a mode (an older export): crop
        self.seed = graph.seed
        self.has_map = "anomaly_map" in graph.outputs

    def score(self, images: np.ndarray, names: list[str]) -> Prediction:
        """Like FittedModel.score; a failure is one PipelineError naming the image and the file."""
        scores, maps = [], []
        side = self.preprocess["crop_size"]
        for image, name in zip(images, names):  # the graph takes one image
            try:
                outputs = self.session.run(None, {"image": np.ascontiguousarray(image[None])})
            except Exception as exc:  # onnxruntime's Fail, InvalidArgument, RuntimeException, ...
                raise scoring_failed(exc, [name], self.path) from None
            if outputs[0].shape != (1,) or (self.has_map and outputs[1].shape != (1, side, side)):
                raise PipelineError(f"{name}: {self.path} gave outputs of shapes {[o.shape for o in outputs]}, "
                                    f"not (1,) and (1, {side}, {side}) (rerun the export stage)")
            scores.append(float(outputs[0][0]))
            if self.has_map:
                maps.append(outputs[1][0].astype(np.float32))
        prediction = Prediction(np.array(scores, dtype=np.float64), np.stack(maps) if maps else None)
        return checked(prediction, names, self.path)
