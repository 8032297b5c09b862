"""Which fitted models can be deployed, and either runtime's model of one: torch or onnx."""
from __future__ import annotations

from stages.core.errors import PipelineError
from stages.core.paths import CATEGORY_SUFFIX, MODEL_SUFFIX, MODELS_ROOT, scoring_file
from stages.deploy.onnx_model import OnnxModel
from stages.deploy.torch_model import FittedModel
from stages.methods.base import STATE_FILE

RUNTIMES = ("torch", "onnx")


def fitted_models() -> list[tuple[str, str]]:
    """(category, model) of every model that `dvc repro` has fitted and evaluated."""
    found = []
    for folder in sorted(MODELS_ROOT.glob(f"*{CATEGORY_SUFFIX}/*{MODEL_SUFFIX}")):
        category, name = folder.parts[-2][: -len(CATEGORY_SUFFIX)], folder.name[: -len(MODEL_SUFFIX)]
        if scoring_file(category, name).is_file() and any(folder.glob(f"seed-*/{STATE_FILE}")):
            found.append((category, name))
    return found


def check_runtime(runtime: str, device: str) -> None:
    """--runtime and a resolved --device that can run it (the demo checks them at start, before any image)."""
    if runtime not in RUNTIMES:
        raise PipelineError(f"--runtime: unknown runtime {runtime!r} (torch or onnx)")
    if runtime == "onnx" and device != "cpu":
        raise PipelineError("--runtime onnx runs on the CPU (onnxruntime's CPU package); leave --device at cpu")


def load_model(category: str, name: str, runtime: str = "torch", device: str = "cpu"):
    check_runtime(runtime, device)
    if runtime == "onnx":
        return OnnxModel.load(category, name)
    return FittedModel.load(category, name, device=device)
