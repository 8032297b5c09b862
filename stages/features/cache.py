"""The per-backbone feature cache written by the extract stage: one .pt file per split."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path
from stages.core.torch_files import load_tensors


@dataclass
class FeatureSet:
    global_embeddings: torch.Tensor  # (N, D) float32: pooled last stage, or the ViT CLS token
    feature_maps: dict[str, torch.Tensor]  # layer name -> (N, C, h, w) float32, in backbone order
    image_size: tuple[int, int]  # (H, W) of the images the features came from
    names: list[str]  # image names, aligned with the prepared split

    def __len__(self) -> int:
        return len(self.names)

    def maps(self) -> list[torch.Tensor]:
        """The mid-level maps as float32, in the order of `backbones.<name>.layers`."""
        return [m.float() for m in self.feature_maps.values()]


def finest_grid(maps: list[torch.Tensor]) -> tuple[int, int]:
    """The (h, w) of the finest map: every layer is upsampled to it, whatever order the layers are listed in."""
    return max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])


def save_features(path: str | Path, features: FeatureSet) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "global": features.global_embeddings,
                "maps": features.feature_maps,
                "image_size": list(features.image_size),
                "names": features.names,
            },
            tmp,
        )


def load_features(path: str | Path) -> FeatureSet:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: cached features not found (run the extract stage for this backbone)")
    blob = load_tensors(path, "feature cache", "rerun the extract stage")
    try:
        return FeatureSet(
            global_embeddings=blob["global"],
            feature_maps=dict(blob["maps"]),
            image_size=tuple(blob["image_size"]),
            names=list(blob["names"]),
        )
    except (KeyError, TypeError) as exc:
        raise PipelineError(
            f"{path}: not a feature cache of this version (no {exc}; rerun the extract stage)"
        ) from None
