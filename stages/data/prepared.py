"""The compact cached form written by the preprocess stage: one .npz per split."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.common import PipelineError, atomic_path

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8, RGB
    names: list[str]  # path relative to the category root, e.g. "test/cut/003.png"
    labels: np.ndarray  # (N,) int64: 0 good, 1 defective
    defect_types: list[str]  # "good" or the defect folder name
    masks: np.ndarray | None  # (N, H, W) bool, None when the category has no ground truth

    def __len__(self) -> int:
        return len(self.names)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])


def save_split(path: str | Path, split: Split) -> None:
    path = Path(path)
    arrays = dict(
        images=split.images,
        names=np.array(split.names, dtype=str),
        labels=split.labels.astype(np.int64),
        defect_types=np.array(split.defect_types, dtype=str),
    )
    if split.masks is not None:
        arrays["masks"] = split.masks.astype(bool)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_split(path: str | Path) -> Split:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: prepared split not found (run the preprocess stage)")
    with np.load(path) as data:
        return Split(
            images=data["images"],
            names=[str(n) for n in data["names"]],
            labels=data["labels"],
            defect_types=[str(d) for d in data["defect_types"]],
            masks=data["masks"] if "masks" in data.files else None,
        )
