"""Image and mask formats: 16-bit, palette, alpha, 0/1 masks are read right or refused, never clipped.

The 16-bit and 0/1-mask datasets are twins of an 8-bit / 0-255 dataset: the prepared arrays (and
so every metric computed from them) must be identical.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.errors import PipelineError
from stages.data.prepared import load_split
from stages.data.raw import read_image, read_mask
from tests.conftest import default_params, run_stage, write_params

# one worker runs this file: its module-scoped projects are built once, not once per worker
pytestmark = pytest.mark.xdist_group("formats")

SIZE = (48, 40)  # width, height


def category_arrays() -> dict[str, np.ndarray]:
    """8-bit grayscale images and 0/1 masks of a tiny category, keyed by their MVTec-layout path."""
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(4):
        arrays[f"train/good/{i:03d}.png"] = rng.integers(0, 256, SIZE[::-1], dtype=np.uint8)
    arrays["test/good/000.png"] = rng.integers(0, 256, SIZE[::-1], dtype=np.uint8)
    for i in range(2):
        image = rng.integers(0, 200, SIZE[::-1], dtype=np.uint8)
        mask = np.zeros(SIZE[::-1], np.uint8)
        mask[10 + 4 * i : 22 + 4 * i, 12:26] = 1
        image[mask == 1] = 255
        arrays[f"test/spot/{i:03d}.png"] = image
        arrays[f"ground_truth/spot/{i:03d}_mask.png"] = mask
    return arrays


def write_category(root: Path, sixteen_bit: bool, mask_scale: int) -> None:
    for name, array in category_arrays().items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.startswith("ground_truth"):
            Image.fromarray((array * mask_scale).astype(np.uint8), mode="L").save(path)
        elif sixteen_bit:  # the same picture at 16 bit: 255 -> 65535
            Image.fromarray(array.astype(np.uint16) * 257).save(path)
            assert Image.open(path).mode == "I;16"
        else:
            Image.fromarray(array, mode="L").save(path)


def format_warnings(stderr: str) -> list[str]:
    """Warning lines about the images' formats (the 4-image category also gets the small-validation-split warning,
    and its 48 x 40 images the warning that crop drops their sides)."""
    return [line for line in stderr.splitlines()
            if line.startswith("warning: ") and "val_fraction" not in line and "are not square" not in line]


def prepared(project: Path, sixteen_bit: bool, mask_scale: int) -> tuple[dict, str]:
    write_category(project / "data" / "raw" / "carpet.dataset", sixteen_bit, mask_scale)
    params = default_params()
    params["preprocess"].update(resize=40, crop_size=32, val_fraction=0.25)
    write_params(project, params)
    result = run_stage("preprocess", "carpet", cwd=project, check=True)
    out = project / "data/features/carpet.category/pixels.features"
    return {split: np.load(out / f"{split}.npz") for split in ("train", "val", "test")}, result.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 8-bit images with 0/255 masks."""
    project = tmp_path_factory.mktemp("eight_bit")
    splits, stderr = prepared(project, sixteen_bit=False, mask_scale=255)
    assert format_warnings(stderr) == []
    test = load_split(project / "data/features/carpet.category/pixels.features/test.npz")
    assert test.masks.any(axis=(1, 2)).tolist() == [False, True, True]
    assert splits["train"]["images"].max() == 255
    return splits


def assert_same(splits: dict, reference: dict) -> None:
    for split, arrays in reference.items():
        for key in arrays.files:
            assert np.array_equal(splits[split][key], arrays[key]), f"{split}.{key} differs"


def test_16_bit_images_equal_their_8_bit_twin(tmp_path, reference):
    splits, _ = prepared(tmp_path, sixteen_bit=True, mask_scale=255)
    assert_same(splits, reference)


def test_masks_stored_as_0_1_equal_their_0_255_twin(tmp_path, reference):
    splits, stderr = prepared(tmp_path, sixteen_bit=False, mask_scale=1)
    assert format_warnings(stderr) == []
    assert_same(splits, reference)


def test_all_zero_mask_of_a_defect_image_warns(tmp_path):
    root = tmp_path / "data" / "raw" / "carpet.dataset"
    write_category(root, sixteen_bit=False, mask_scale=255)
    Image.new("L", SIZE).save(root / "ground_truth" / "spot" / "001_mask.png")
    params = default_params()
    params["preprocess"].update(resize=40, crop_size=32, val_fraction=0.25)
    write_params(tmp_path, params)
    stderr = run_stage("preprocess", "carpet", cwd=tmp_path, check=True).stderr
    warnings = format_warnings(stderr)
    assert len(warnings) == 1 and "ground_truth/spot/001_mask.png" in warnings[0] and "all zero" in warnings[0]


# ----------------------------------------------------------------------- one file, every mode


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)


def decoded(tmp_path: Path, image: Image.Image, name: str = "x.png", mode: str = "RGB") -> np.ndarray:
    path = tmp_path / name
    image.save(path)
    return np.asarray(read_image(path, mode))


def test_rgba_drops_alpha(tmp_path, rgb):
    alpha = np.full(rgb.shape[:2], 7, np.uint8)
    assert np.array_equal(decoded(tmp_path, Image.fromarray(np.dstack([rgb, alpha]), "RGBA")), rgb)


def test_la_drops_alpha(tmp_path, rgb):
    gray = rgb[..., 0]
    out = decoded(tmp_path, Image.fromarray(np.dstack([gray, np.zeros_like(gray)]), "LA"))
    assert np.array_equal(out, np.dstack([gray] * 3))


PALETTE = [(200, 10, 30), (0, 128, 255), (17, 34, 51), (255, 255, 0)]  # entries 0-3 of the test palette


def palette_image(indices: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette([value for colour in PALETTE for value in colour])
    return image


def test_palette_gives_its_colours(tmp_path):
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 3, 3]])
    out = decoded(tmp_path, palette_image(indices))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert out[0].tolist() == [[200, 10, 30], [0, 128, 255], [17, 34, 51], [255, 255, 0]]
    assert np.array_equal(out, np.array(PALETTE, np.uint8)[indices])
    # as grayscale: ITU-R 601-2 luma of each palette colour, L = (299 R + 587 G + 114 B) / 1000
    gray = decoded(tmp_path, palette_image(indices), mode="L")
    luma = [round((299 * r + 587 * g + 114 * b) / 1000) for r, g, b in PALETTE]
    assert np.abs(gray.astype(int) - np.array(luma)[indices]).max() <= 1


def test_palette_transparency_is_dropped_not_composited(tmp_path):
    """A transparent palette index (PNG tRNS) keeps its own palette RGB: the alpha is dropped, not
    composited onto black or white."""
    indices = np.array([[0, 1, 2], [2, 3, 0]])
    path = tmp_path / "transparent.png"
    palette_image(indices).save(path, transparency=2)  # index 2, (17, 34, 51), fully transparent
    with Image.open(path) as written:
        assert written.mode == "P" and written.info.get("transparency") == 2
    out = np.asarray(read_image(path, "RGB"))
    assert out[0, 2].tolist() == out[1, 0].tolist() == [17, 34, 51]
    assert np.array_equal(out, np.array(PALETTE, np.uint8)[indices])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_scaled_by_65535(tmp_path, suffix):
    values = np.array([[0, 257, 32768], [65535, 1000, 128]], dtype=np.uint16)
    out = decoded(tmp_path, Image.fromarray(values), f"x{suffix}", mode="L")
    assert out.tolist() == [[0, 1, 128], [255, 4, 0]]


def test_48_bit_rgb_png_keeps_its_values(tmp_path, rgb):
    """PIL reads 16-bit-per-channel RGB PNGs as 8-bit RGB (the high bytes): check it does."""
    wide = rgb.astype(np.uint16) * 257
    height, width, _ = wide.shape
    raw = b"".join(b"\x00" + wide[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path = tmp_path / "rgb48.png"
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    assert np.array_equal(np.asarray(read_image(path, "RGB")), rgb)


def test_float_image_is_refused_with_its_name(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    with pytest.raises(PipelineError, match=r"float\.tif: unsupported image format"):
        read_image(path, "RGB")


def test_32_bit_integer_beyond_16_bit_is_refused(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(path)
    with pytest.raises(PipelineError, match=r"wide\.tif: unsupported image format"):
        read_image(path, "RGB")


@pytest.mark.parametrize(
    "mask",
    [
        Image.fromarray(np.array([[0, 1], [0, 0]], np.uint8), "L"),
        Image.fromarray(np.array([[0, 255], [0, 0]], np.uint8), "L"),
        Image.fromarray(np.array([[0, 3], [0, 0]], np.uint16)),
        Image.fromarray(np.array([[0, 1], [0, 0]], np.uint8) * 255, "L").convert("1"),
        Image.fromarray(np.array([[[0, 0, 0], [0, 0, 9]], [[0, 0, 0], [0, 0, 0]]], np.uint8), "RGB"),
    ],
    ids=["0-1", "0-255", "16-bit", "bilevel", "rgb"],
)
def test_any_nonzero_mask_pixel_is_defect(tmp_path, mask):
    path = tmp_path / "m.png"
    mask.save(path)
    assert np.asarray(read_mask(path)).tolist() == [[0, 255], [0, 0]]
