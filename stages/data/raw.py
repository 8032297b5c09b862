"""Read one category in MVTec AD layout: train/good, test/<type>, ground_truth/<type>/<name>_mask.png."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.common import PipelineError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass
class RawImage:
    path: Path
    name: str  # relative to the category root
    defect_type: str  # "good" or the test subfolder
    mask_path: Path | None  # None for good images and categories without ground truth


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def check_layout(root: Path, shown: str | None = None) -> None:
    """One MVTec AD category: train/good/*.png and test/<type>/*.png; ground_truth/ is optional.

    `shown` replaces `root` in the messages (e.g. the URL of an archive being extracted to a temp dir).
    """
    shown = shown or str(root)
    if not root.is_dir():
        raise PipelineError(f"{shown}: category folder not found")
    if not list_images(root / "train" / "good"):
        raise PipelineError(f"{shown}/train/good: no training images")
    test = root / "test"
    if not test.is_dir():
        raise PipelineError(f"{shown}/test: test folder not found")
    if not any(list_images(sub) for sub in test.iterdir() if sub.is_dir()):
        raise PipelineError(f"{shown}/test: no test images (expected test/<defect type>/*.png)")


def list_category(root: Path) -> tuple[list[RawImage], list[RawImage], bool]:
    """Training (good) images, test images, and whether pixel ground truth exists."""
    root = Path(root)
    check_layout(root)
    train = [RawImage(p, str(p.relative_to(root)), "good", None) for p in list_images(root / "train" / "good")]
    test_root = root / "test"
    has_masks = (root / "ground_truth").is_dir()
    test = []
    for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
        for path in list_images(type_dir):
            mask = None
            if has_masks and type_dir.name != "good":
                mask = root / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise PipelineError(f"{mask}: ground-truth mask missing for {path}")
            test.append(RawImage(path, str(path.relative_to(root)), type_dir.name, mask))
    return train, test, has_masks


def read_image(path: Path, mode: str) -> Image.Image:
    """Open and fully decode an image (a truncated file fails here, not later)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise PipelineError(f"{path}: unreadable or truncated image ({exc})") from exc


def resize_and_crop(image: Image.Image, resize: int, crop: int, resample) -> np.ndarray:
    """torchvision's Resize(int) + CenterCrop(int): shorter side to `resize`, then the centre square."""
    width, height = image.size
    scale = resize / min(width, height)
    new_size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    image = image.resize(new_size, resample=resample)
    left = (new_size[0] - crop) // 2
    top = (new_size[1] - crop) // 2
    return np.asarray(image.crop((left, top, left + crop, top + crop)))
