"""Read one category in MVTec AD layout: train/good, test/<type>, ground_truth/<type>/<name>_mask.png."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.core.errors import PipelineError, warn
from stages.core.params import DEFAULT_MODE, DEFAULT_PAD_FILL, PREPROCESS_MODES

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
    return read_mask_levels(path)[0]


def read_mask_levels(path: Path) -> tuple[Image.Image, int]:
    """read_mask, and how many distinct nonzero values the file holds: 1 for a binary mask (0 and one value,
    in any channel), more for a soft or lossy one (anti-aliased edges, JPEG noise), 0 for an empty one."""
    image = _open(path)
    if image.mode == "P":
        image = image.convert("RGBA")
    array = np.asarray(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        array = array[..., :-1]
    levels = len(np.unique(array[array != 0]))
    if array.ndim == 3:
        array = array.any(axis=2)
    return Image.fromarray(np.where(array != 0, 255, 0).astype(np.uint8), mode="L"), levels


def soft_mask_warning(soft: list[tuple[Path, int]], total: int) -> str | None:
    """One line for the masks that are not binary (read_mask_levels > 1), or None.

    A warning, not an error: the rule 'any nonzero pixel is defect' is MVTec's and gives such a mask a
    defined meaning, and refusing would reject anti-aliased masks from ordinary drawing tools, where the rule
    only widens a region's edge by a pixel. But a mask saved as JPEG turns its compression noise into defect
    pixels all over the image, so the user is told which files to look at."""
    if not soft:
        return None
    path, levels = soft[0]
    return (f"{len(soft)} of {total} ground-truth masks are not binary (e.g. {path}: {levels} distinct nonzero "
            "values); every nonzero pixel counts as defect, so re-save soft or JPEG masks as 0/255 PNGs")


# What the model sees of a frame: preprocess.mode (stages/core/params.py), one rule for the preprocess
# stage and both runtimes (stages/deploy/inputs.py), recorded in every fit's recipe. The arithmetic is
# torchvision's (transforms.v2.functional on a PIL image; tests/test_modes.py holds it to it):
# - crop:   Resize(resize) + CenterCrop(crop_size): shorter side to `resize`, the longer one truncated
#           (int(resize * long / short)), the square at round((side - crop_size) / 2), Python's round;
# - resize: Resize((crop_size, crop_size)): the whole frame, aspect not kept;
# - pad:    Resize(size=None, max_size=crop_size) + CenterCrop(crop_size) padding with `pad_fill`: the longer
#           side to crop_size (the shorter one truncated), centred on a square of the fill (the extra pixel of
#           an odd margin on the right / bottom). Resizing before padding keeps the fill out of the image's
#           own pixels (a bilinear resize of a padded square would blend the two at the seam) and gives the
#           padded band whole-pixel edges, so the valid-pixel mask is exact.


RECIPE_KEYS = ("resize", "crop_size", "mode", "pad_fill")  # of params.yaml's preprocess: the input recipe


def recipe(preprocess: dict) -> dict:
    """A saved `preprocess` record -> the full input recipe, checked (ValueError, TypeError or KeyError names
    what is wrong). A record without `mode` was written before modes existed: those models were cropped."""
    mode = preprocess.get("mode", DEFAULT_MODE)
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r} (known: {', '.join(PREPROCESS_MODES)})")
    resize, crop = int(preprocess["resize"]), int(preprocess["crop_size"])
    fill = [int(v) for v in preprocess.get("pad_fill", DEFAULT_PAD_FILL)]
    if crop < 1 or resize < crop or len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
        raise ValueError(f"resize {resize}, crop_size {crop} and pad_fill {fill} are not a valid recipe")
    return {"resize": resize, "crop_size": crop, "mode": mode, "pad_fill": fill}


@dataclass(frozen=True)
class Placement:
    """Where a width x height frame lands in the crop_size x crop_size model input: the frame is resized to
    `resized` (width, height) and its top-left corner put at `offset` (x, y) of the input; a negative offset
    crops, a positive one pads."""

    frame: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    side: int  # crop_size

    @classmethod
    def of(cls, width: int, height: int, preprocess: dict) -> "Placement":
        r = recipe(preprocess)
        side, mode = r["crop_size"], r["mode"]
        short, long = min(width, height), max(width, height)
        if mode == "crop":
            new_short, new_long = r["resize"], int(r["resize"] * long / short)
        elif mode == "pad":
            new_short, new_long = int(side * short / long), side
        else:
            new_short = new_long = side
        resized = (new_short, new_long) if width <= height else (new_long, new_short)
        if mode == "crop":
            offset = tuple(-int(round((n - side) / 2.0)) for n in resized)
        else:  # pad (and resize, where the margins are 0)
            offset = tuple((side - n) // 2 for n in resized)
        return cls((width, height), resized, offset, side)

    def apply(self, image: Image.Image, resample, fill) -> np.ndarray:
        """The model input of `image` (this placement's frame) as an array."""
        if image.size != self.frame:
            raise ValueError(f"placement of a {self.frame} frame applied to a {image.size} image")
        resized = image.resize(self.resized, resample=resample)
        (x, y), side = self.offset, self.side
        if x <= 0 and y <= 0:  # crop (resize: nothing to cut)
            return np.asarray(resized.crop((-x, -y, side - x, side - y)))
        canvas = Image.new(image.mode, (side, side), fill)
        canvas.paste(resized, (x, y))
        return np.asarray(canvas)

    def valid(self) -> np.ndarray:
        """(side, side) bool: the input pixels that show the frame (False on padding)."""
        (x, y), (w, h) = self.offset, self.resized
        inside = np.zeros((self.side, self.side), dtype=bool)
        inside[max(0, y) : max(0, y + h), max(0, x) : max(0, x + w)] = True
        return inside

    def view_box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the frame the model sees, in frame pixels (the whole frame but under crop)."""
        (x, y), (w, h), (width, height) = self.offset, self.resized, self.frame
        sx, sy = width / w, height / h
        right, bottom = min(width, (self.side - x) * sx), min(height, (self.side - y) * sy)
        return (max(0.0, -x * sx), max(0.0, -y * sy), right, bottom)

    def seen(self) -> float:
        """The share of the frame's area the model sees."""
        left, top, right, bottom = self.view_box()
        return (right - left) * (bottom - top) / (self.frame[0] * self.frame[1])

    def view_mask(self) -> np.ndarray:
        """(height, width) bool: the frame's pixels (their centres) inside the view box."""
        left, top, right, bottom = self.view_box()
        xs, ys = np.arange(self.frame[0]) + 0.5, np.arange(self.frame[1]) + 0.5
        return ((ys >= top) & (ys < bottom))[:, None] & ((xs >= left) & (xs < right))[None, :]


def prepare_image(image: Image.Image, preprocess: dict) -> np.ndarray:
    """An RGB frame -> the (crop_size, crop_size, 3) uint8 model input, by the recipe's mode (bilinear, as
    torchvision's PIL resize; padding with `pad_fill`)."""
    r = recipe(preprocess)
    return Placement.of(*image.size, r).apply(image, Image.BILINEAR, tuple(r["pad_fill"]))


def prepare_mask(mask: Image.Image, preprocess: dict) -> np.ndarray:
    """A 0/255 mask -> (crop_size, crop_size) bool in the model input's pixels (nearest; padding is not defect)."""
    return Placement.of(*mask.size, preprocess).apply(mask, Image.NEAREST, 0) > 127


def verify_category(root: Path) -> None:
    """Decode every image and mask of a category (the folder source checks the user's own folder)."""
    train, test, _ = list_category(root)
    soft, masks = [], 0
    for item in train + test:
        image = read_image(item.path)
        if item.mask_path is not None:
            mask, levels = read_mask_levels(item.mask_path)
            check_mask_size(item, mask, image)
            masks += 1
            if levels > 1:
                soft.append((item.mask_path, levels))
    if soft:
        warn(soft_mask_warning(soft, masks))


MAX_HEADERS = 500  # images whose size `python -m stages.check` reads: evenly spaced over the sorted list


def header_sizes(paths: list[Path], limit: int = MAX_HEADERS) -> list[tuple[int, int]]:
    """(width, height) of up to `limit` images, evenly spaced, from their headers alone (nothing is decoded;
    an unreadable file is left to the stage that decodes it, which names it)."""
    if len(paths) > limit:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    sizes = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    sizes.append(image.size)
        except (Image.DecompressionBombError, *_DECODE_ERRORS):
            continue
    return sizes


def crop_warning(where: str, sizes: list[tuple[int, int]], preprocess: dict) -> str | None:
    """One line when the mode is crop and some images are not square: the share of each image the crop drops
    (a range over the images), or None."""
    if recipe(preprocess)["mode"] != "crop":
        return None
    oblong = sorted({(w, h) for w, h in sizes if w != h}, key=lambda s: max(s) / min(s))
    if not oblong:
        return None
    dropped = [1 - Placement.of(w, h, preprocess).seen() for w, h in oblong]
    share = f"{min(dropped):.0%}" if f"{min(dropped):.0%}" == f"{max(dropped):.0%}" else \
        f"{min(dropped):.0%} to {max(dropped):.0%}"
    shapes = f"{oblong[0][0]}x{oblong[0][1]}" + (f" to {oblong[-1][0]}x{oblong[-1][1]}" if len(oblong) > 1 else "")
    return (f"{where}: {sum(w != h for w, h in sizes)} of {len(sizes)} training images are not square ({shapes}) "
            f"and preprocess.mode is crop: the model never sees {share} of each of them; "
            "preprocess.mode: pad or resize shows it the whole image")


def check_mask_size(item: RawImage, mask: Image.Image, image: Image.Image) -> None:
    if mask.size != image.size:
        raise PipelineError(
            f"{item.mask_path}: mask size {mask.size[0]}x{mask.size[1]} differs from its image "
            f"{item.path} ({image.size[0]}x{image.size[1]})"
        )
