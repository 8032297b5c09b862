"""The compact cached form written by the preprocess stage: one .npz per split."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path

SPLITS = ("train", "val", "test")
INPUTS_FILE = "inputs.json"  # beside the splits: how they were made (preprocess, backbone), for predict


def write_inputs(folder: Path, preprocess: dict, backbone: dict | None, n_train: int) -> None:
    """Record how a prepared / feature folder was made, so a fitted model can redo it on new images
    (and say how many good images it was fitted on)."""
    record = {"preprocess": preprocess, "backbone": backbone, "n_train": n_train}
    (Path(folder) / INPUTS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_inputs(folder: str | Path) -> dict:
    path = Path(folder) / INPUTS_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: missing (rerun the stage that writes {Path(folder)})")
    return json.loads(path.read_text())


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8, RGB
    names: list[str]  # path relative to the category root, e.g. "test/cut/003.png"
    labels: np.ndarray  # (N,) int64: 0 good, 1 defective
    defect_types: list[str]  # "good" or the defect folder name
    masks: np.ndarray | None  # (N, H, W) bool, None when the category has no ground truth
    # (N, H, W) bool: the pixels that show the image, False on preprocess.mode pad's padding, which no pixel
    # metric counts; None when every pixel does (modes crop and resize, and pad of square images)
    valid: np.ndarray | None = None
    # difficulty levels (stages/data/levels.py), test split of a category with a levels file only:
    levels: np.ndarray | None = None  # (N,) int64: 1..L per defective image, 0 for good ones
    ladder: np.ndarray | None = None  # (L, 3) float64: each level's delta_e, area, width

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
    if split.valid is not None:
        arrays["valid"] = split.valid.astype(bool)
    if split.levels is not None:
        arrays.update(levels=split.levels.astype(np.int64), ladder=split.ladder.astype(np.float64))
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
            valid=data["valid"] if "valid" in data.files else None,
            levels=data["levels"] if "levels" in data.files else None,
            ladder=data["ladder"] if "ladder" in data.files else None,
        )
