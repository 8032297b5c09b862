"""What a computing stage sets up before its work: seeds, the device, and the numerics of the device."""
from __future__ import annotations

import random
import re

import numpy as np

from stages.core import numerics
from stages.core.errors import PipelineError

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # params.yaml `device`, and predict's and the demo's --device


def valid_device(value: str) -> bool:
    return DEVICE.fullmatch(str(value)) is not None


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str | None, where: str = "device") -> str:
    """'auto' picks a GPU when one is present; the numerics mode is applied to torch on the way."""
    import torch

    numerics.configure_torch()
    name = "auto" if name is None else str(name)
    if not DEVICE.fullmatch(name):
        raise PipelineError(f"{where}: unknown device {name!r} (auto, cpu, cuda or cuda:N)")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PipelineError(f"{where}: '{name}' requested but no CUDA GPU is available")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise PipelineError(f"{where}: '{name}' requested but only {torch.cuda.device_count()} GPU(s) present")
    return name
