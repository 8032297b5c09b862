"""Read one category in MVTec AD layout: train/good, test/<type>, ground_truth/<type>/<name>_mask.png."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.core.errors import PipelineError, warn

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


_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError)
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_FULL_16 = 65535

# Every image is bounded before it is decoded or resized. The resize scales the short side to
# `preprocess.resize`, so the long side grows with the aspect ratio: a 118-byte 1 x 20000 PNG would
# become 256 x 5,120,000 (5 GB). MAX_PIXELS bounds decoding (PIL's own bomb check starts at 89 MP),
# MAX_ASPECT_RATIO bounds the resized image at 16 x resize on its long side.
MAX_PIXELS = 64 * 2**20  # 67.1 MP, e.g. 8192 x 8192
MAX_ASPECT_RATIO = 16


class ImageTooLarge(PipelineError):
    """An image over MAX_PIXELS or MAX_ASPECT_RATIO (the demo answers 413 for it)."""


def check_image_bounds(path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{path}: {width}x{height} pixels is more than the limit of {MAX_PIXELS:,} "
                            f"({MAX_PIXELS / 2**20:.0f} MP, stages/data/raw.py MAX_PIXELS); scale it down first")
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ImageTooLarge(f"{path}: {width}x{height} pixels is longer than {MAX_ASPECT_RATIO}:1 "
                            f"(stages/data/raw.py MAX_ASPECT_RATIO); crop it to the part to inspect")


def _open(path) -> Image.Image:
    """Open, bound and fully decode an image (a truncated file fails here, not later).

    Only regular files are read (a FIFO would block forever); the size is checked from the header,
    before decoding. A multi-frame file (TIFF pages, GIF frames) gives its first frame, with a warning.
    """
    if isinstance(path, (str, Path)) and not Path(path).is_file():
        what = "not found" if not Path(path).exists() else "not a regular file (a folder, FIFO or device)"
        raise PipelineError(f"{path}: {what}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound, below
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{path}: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise PipelineError(f"{path}: unreadable or truncated image ({exc})") from exc
    with image:
        check_image_bounds(path, *image.size)
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            warn(f"{path}: holds {frames} frames (pages); only the first is used")
        try:
            image.load()
        except _DECODE_ERRORS as exc:
            raise PipelineError(f"{path}: unreadable or truncated image ({exc})") from exc
        return image


def _sixteen_bit_to_8(path: Path, image: Image.Image) -> Image.Image:
    """16-bit grayscale (or 32-bit integer holding 16-bit values) -> 8 bit, scaled by the full range.

    value_8 = round(value_16 * 255 / 65535): a fixed rule, so every image keeps its brightness
    relative to the others (a per-image stretch would erase exactly the differences a detector
    looks for), and an 8-bit image stored as 16 bit (v * 257) gives back the same 8-bit values.
    """
    array = np.asarray(image).astype(np.int64)
    if array.size and (array.min() < 0 or array.max() > _FULL_16):
        raise PipelineError(
            f"{path}: unsupported image format (mode {image.mode} with values outside 0..65535; "
            "save it as 8- or 16-bit)"
        )
    scaled = np.rint(array * (255 / _FULL_16)).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def read_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Decode an image as 8-bit `mode` ("RGB" or "L"), never clipping silently.

    - 8-bit grayscale, RGB, palette (P), bilevel (1): converted as PIL does;
    - alpha (RGBA, LA, PA, palette transparency) is dropped, never composited;
    - 16-bit grayscale (I;16*, or mode I with values in 0..65535) is scaled by 255/65535;
      PIL reads 48/64-bit RGB(A) PNGs as 8-bit RGB (their high bytes), which is the same rule;
    - anything else (32-bit float, signed 32-bit beyond 16 bit, ...) is refused with one line.
    """
    image = _open(path)
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        image = _sixteen_bit_to_8(path, image)
    elif image.mode == "F":
        raise PipelineError(f"{path}: unsupported image format (32-bit float); save it as 8- or 16-bit")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA").convert("RGB")  # palette colours; transparency dropped
    elif image.mode in ("LA", "La"):
        image = image.convert("L")  # alpha dropped
    elif image.mode in ("RGBA", "RGBa"):
        image = image.convert("RGB")  # alpha dropped
    if image.mode == mode:
        return image
    try:
        return image.convert(mode)
    except ValueError as exc:
        raise PipelineError(f"{path}: unsupported image format (mode {image.mode}: {exc})") from exc


def read_mask(path: Path) -> Image.Image:
    """A ground-truth mask as an 8-bit image of 0 (good) and 255 (defect): any nonzero pixel is defect.

    That is MVTec's own evaluation rule, so masks stored as 0/255, 0/1, 16-bit or in colour mean
    the same. A palette mask is judged by its colours, an alpha channel is ignored.
    """
    image = _open(path)
    if image.mode == "P":
        image = image.convert("RGBA")
    array = np.asarray(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        array = array[..., :-1]
    if array.ndim == 3:
        array = array.any(axis=2)
    return Image.fromarray(np.where(array != 0, 255, 0).astype(np.uint8), mode="L")


def resize_and_crop(image: Image.Image, resize: int, crop: int, resample) -> np.ndarray:
    """torchvision's Resize(int) + CenterCrop(int): shorter side to `resize`, then the centre square."""
    width, height = image.size
    scale = resize / min(width, height)
    new_size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    image = image.resize(new_size, resample=resample)
    left = (new_size[0] - crop) // 2
    top = (new_size[1] - crop) // 2
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


def verify_category(root: Path) -> None:
    """Decode every image and mask of a category (the folder source checks the user's own folder)."""
    train, test, _ = list_category(root)
    for item in train + test:
        image = read_image(item.path)
        if item.mask_path is not None:
            mask = read_mask(item.mask_path)
            check_mask_size(item, mask, image)


def check_mask_size(item: RawImage, mask: Image.Image, image: Image.Image) -> None:
    if mask.size != image.size:
        raise PipelineError(
            f"{item.mask_path}: mask size {mask.size[0]}x{mask.size[1]} differs from its image "
            f"{item.path} ({image.size[0]}x{image.size[1]})"
        )
