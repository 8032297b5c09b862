"""The synthetic carpet generator: determinism, MVTec layout, the difficulty ladder's physics measured on
the written images (colour difference, area, width, exact masks), the nuisance variation, bad args.

Tolerances (docs/explanation/synthetic-benchmark.md): a level's mean ΔE*ab within 1 % (the generator's
DELTA_E_TOLERANCE), its area exact, a thread's or cut's width within 15 % (measured from its skeleton).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.errors import PipelineError
from stages.core.params import validate
from stages.data.levels import read_levels
from stages.data.raw import list_category
from stages.data.synthetic import (
    DEFAULT_LEVELS,
    DEFECT_TYPES,
    Level,
    Nuisance,
    at_size,
    generate_category,
    render,
)
from tests.conftest import REPO, default_params

# one worker runs this file: its module-scoped projects are built once, not once per worker
pytestmark = pytest.mark.xdist_group("synthetic")

SIZE = 64
SMALL_LADDER = (Level(16.0, 768, 4.0), Level(2.0, 768, 4.0))  # at 64 px: 48 px, 1 px wide
ARGS = dict(image_size=SIZE, n_train=3, n_test_good=2, n_test_per_cell=2, seed=7, levels=SMALL_LADDER)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> tuple[np.ndarray, str]:
    with Image.open(path) as im:
        return np.asarray(im).copy(), im.mode


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "carpet"
    generate_category(root, **ARGS)
    return root


def test_same_args_give_identical_bytes(category, tmp_path):
    generate_category(tmp_path / "again", **ARGS)
    assert _files(category) == _files(tmp_path / "again")


def test_different_seed_gives_different_images(category, tmp_path):
    generate_category(tmp_path / "other", **{**ARGS, "seed": 8})
    first, other = _files(category), _files(tmp_path / "other")
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if name.endswith(".png") and "_mask" not in name)


def test_images_do_not_depend_on_other_counts(category, tmp_path):
    """An image depends on its split, its cell (type, level) and its number in the cell, not on how many
    images the other splits and cells hold nor on the levels after its own."""
    generate_category(tmp_path / "small", **{**ARGS, "n_train": 1, "n_test_good": 0, "n_test_per_cell": 1,
                                              "defect_types": ("thread",)})
    small, full = _files(tmp_path / "small"), _files(category)
    assert set(small) == {"train/good/000.png", "test/thread/000.png", "test/thread/001.png",
                          "ground_truth/thread/000_mask.png", "ground_truth/thread/001_mask.png", "levels.csv"}
    assert small["train/good/000.png"] == full["train/good/000.png"]
    # one image per cell: level 2's first image is number 1 here, number 2 with two per cell
    for name_small, name_full in (("000", "000"), ("001", "002")):
        assert small[f"test/thread/{name_small}.png"] == full[f"test/thread/{name_full}.png"]
        assert small[f"ground_truth/thread/{name_small}_mask.png"] == full[f"ground_truth/thread/{name_full}_mask.png"]
    generate_category(tmp_path / "first", **{**ARGS, "levels": SMALL_LADDER[:1], "defect_types": ("cut",)})
    first = _files(tmp_path / "first")
    assert first["test/cut/001.png"] == full["test/cut/001.png"]


def test_layout_counts_and_levels_file(category):
    names = set(_files(category))
    per_type = len(SMALL_LADDER) * ARGS["n_test_per_cell"]
    expected = {f"train/good/{i:03d}.png" for i in range(3)} | {f"test/good/{i:03d}.png" for i in range(2)}
    for defect in DEFECT_TYPES:
        expected |= {f"test/{defect}/{i:03d}.png" for i in range(per_type)}
        expected |= {f"ground_truth/{defect}/{i:03d}_mask.png" for i in range(per_type)}
    assert names == expected | {"levels.csv"}

    rows = list(csv.DictReader((category / "levels.csv").open()))
    assert len(rows) == per_type * len(DEFECT_TYPES)
    for row in rows:
        number = int(Path(row["image"]).stem)
        level = at_size(SMALL_LADDER[number // ARGS["n_test_per_cell"]], SIZE)  # numbered level by level
        assert int(row["level"]) == number // ARGS["n_test_per_cell"] + 1
        assert (float(row["delta_e"]), int(row["area"]), float(row["width"])) == (level.delta_e, 48, 1.0)
        assert float(row["delta_e_measured"]) == pytest.approx(level.delta_e, rel=0.01)

    # what preprocess reads: a level per defective test image, 0 for good ones, and the ladder
    _, test, _ = list_category(category)
    levels, ladder = read_levels(category, [t.name for t in test], [int(t.defect_type != "good") for t in test])
    assert [int(level) for level, t in zip(levels, test) if t.defect_type == "good"] == [0, 0]
    assert sorted(set(levels.tolist())) == [0, 1, 2]
    assert ladder.tolist() == [[16.0, 48.0, 1.0], [2.0, 48.0, 1.0]]


def test_images_and_masks_are_well_formed(category):
    for path in sorted(category.glob("t*/*/*.png")):
        image, mode = _load(path)
        assert mode == "RGB" and image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3), path
        defect = path.parent.name
        if defect == "good":
            continue
        mask, mode = _load(category / "ground_truth" / defect / f"{path.stem}_mask.png")
        assert mode == "L" and mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE), path
        assert set(np.unique(mask)) <= {0, 255}, path


# --------------------------------------------------------------------------- the ladder's physics


def _srgb_to_lab(rgb8: np.ndarray) -> np.ndarray:
    """CIELAB (D65, 2°) of 8-bit sRGB, written out from IEC 61966-2-1 and CIE 15 (not the generator's code)."""
    c = rgb8.astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


@pytest.fixture(scope="module")
def ladder_category(tmp_path_factory) -> Path:
    """The default ladder and nuisance at the default 256 px, one image per cell."""
    root = tmp_path_factory.mktemp("ladder") / "carpet"
    generate_category(root, image_size=256, n_train=1, n_test_good=0, n_test_per_cell=1, seed=3)
    return root


def test_each_level_has_its_colour_difference_and_area_and_an_exact_mask(ladder_category):
    """Measured on the written files against each image's defect-free twin (same carpet, light and noise):
    the mask is exactly the pixels that differ, it holds the level's area, and the mean CIE76 ΔE*ab over it
    is the level's within 1 %, for every type at every level."""
    assert DEFAULT_LEVELS == tuple(Level(float(d), 256, 2.0) for d in (16, 8, 4, 2))
    for t, defect in enumerate(DEFECT_TYPES):
        for k, level in enumerate(DEFAULT_LEVELS):
            image = _load(ladder_category / "test" / defect / f"{k:03d}.png")[0]
            mask = _load(ladder_category / "ground_truth" / defect / f"{k:03d}_mask.png")[0] == 255
            twin = render(3, 2 + t, 0, 256, None, level_index=k).image
            changed = (image != twin).any(axis=2)
            assert not (changed & ~mask).any(), f"{defect} L{k + 1}: pixels outside the mask changed"
            assert changed[mask].mean() > 0.95, f"{defect} L{k + 1}: {changed[mask].mean():.0%} of the mask changed"
            assert mask.sum() == level.area, f"{defect} L{k + 1}: area {mask.sum()}"
            difference = _srgb_to_lab(image[mask]) - _srgb_to_lab(twin[mask])
            delta_e = np.sqrt((difference**2).sum(axis=1)).mean()
            assert delta_e == pytest.approx(level.delta_e, rel=0.01), f"{defect} L{k + 1}: ΔE {delta_e:.3f}"


def _skeleton_width(mask: np.ndarray) -> float:
    """Mean width of a band: its area over the length of its skeleton (diagonal steps count sqrt 2)."""
    from skimage.morphology import skeletonize

    skeleton = skeletonize(mask)
    straight = (skeleton[1:] & skeleton[:-1]).sum() + (skeleton[:, 1:] & skeleton[:, :-1]).sum()
    diagonal = (skeleton[1:, 1:] & skeleton[:-1, :-1]).sum() + (skeleton[1:, :-1] & skeleton[:-1, 1:]).sum()
    return mask.sum() / (straight + np.sqrt(2) * diagonal + 1)


@pytest.mark.parametrize("level", [DEFAULT_LEVELS[0], Level(8.0, 256, 1.0), Level(8.0, 512, 4.0)])
def test_threads_and_cuts_have_the_levels_width(level):
    for defect in ("thread", "cut"):
        for i in range(4):
            mask = render(0, 2 + DEFECT_TYPES.index(defect), i, 256, defect, level).mask
            assert mask.sum() == level.area
            assert _skeleton_width(mask) == pytest.approx(level.width, rel=0.15), (defect, i)


def test_sizes_scale_with_the_image_like_the_texture():
    """A level's area and width are given at 256 px; at 128 px the same defect covers a quarter of the pixels."""
    level = Level(8.0, 512, 4.0)
    assert at_size(level, 128) == Level(8.0, 128, 2.0) and at_size(level, 256) == level
    assert at_size(Level(8.0, 256, 2.0), 64) == Level(8.0, 16, 1.0)  # never thinner than a pixel
    for defect in ("hole", "thread"):
        rendered = render(0, 2 + DEFECT_TYPES.index(defect), 0, 128, defect, level)
        assert rendered.mask.sum() == 128
    assert _skeleton_width(render(0, 2 + DEFECT_TYPES.index("thread"), 1, 128, "thread", level).mask) == \
        pytest.approx(2.0, rel=0.15)


def test_defects_stay_inside_the_default_centre_crop(ladder_category):
    """preprocess crops 224 of 256 px: a defect inside it keeps its whole area at the prepared size."""
    border = (256 - 224) // 2
    for path in ladder_category.glob("ground_truth/*/*.png"):
        mask = _load(path)[0] == 255
        inner = mask[border:-border, border:-border]
        assert inner.sum() == mask.sum(), path


# --------------------------------------------------------------------------- nuisance


def _lattice(image: np.ndarray) -> tuple[float, float]:
    """(angle in degrees, period in px) of the pile rows, from the peak of the image's spectrum."""
    lum = image.astype(np.float64) @ [0.299, 0.587, 0.114]
    size = lum.shape[0]
    window = np.outer(np.hanning(size), np.hanning(size))
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2((lum - lum.mean()) * window)))
    yy, xx = np.mgrid[-size // 2:size // 2, -size // 2:size // 2]
    radius, angle = np.hypot(xx, yy), np.degrees(np.arctan2(yy, xx))
    spectrum[(radius < 20) | (radius > 60) | (np.abs(angle - 90) > 20)] = 0  # the rows' fundamental
    y, x = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    patch = spectrum[y - 2:y + 3, x - 2:x + 3]
    dy, dx = np.mgrid[-2:3, -2:3]
    fy, fx = y - size // 2 + (patch * dy).sum() / patch.sum(), x - size // 2 + (patch * dx).sum() / patch.sum()
    return float(np.degrees(np.arctan2(fy, fx)) - 90), float(size / np.hypot(fx, fy))


def _good(nuisance: Nuisance, count: int = 12):
    return [render(0, 0, i, 256, nuisance=nuisance) for i in range(count)]


def test_rotation_and_scale_of_the_texture_measured_on_good_images():
    off = np.array([_lattice(r.image) for r in _good(Nuisance())])
    assert np.abs(off[:, 0]).max() < 0.3 and off[:, 1].std() < 0.03  # every image: rows level, one period
    rotated = np.array([_lattice(r.image) for r in _good(Nuisance(rotation=4.0))])
    assert np.abs(rotated[:, 0]).max() < 4.3 and rotated[:, 0].std() > 1.0
    assert rotated[:, 1].std() < 0.03
    scaled = np.array([_lattice(r.image) for r in _good(Nuisance(scale=0.05))])
    period = np.median(off[:, 1])
    assert np.abs(scaled[:, 1] / period - 1).max() < 0.06 and scaled[:, 1].std() > 0.08
    assert np.abs(scaled[:, 0]).max() < 0.3


def test_light_noise_and_jpeg_measured_on_good_images():
    """Against what the camera saw (the scene): nothing added when off; a linear ramp of light, noise of the
    set spread, JPEG's loss, each when on."""
    for rendered in _good(Nuisance(), 4):
        assert np.array_equal(rendered.image, np.rint(rendered.scene * 255).astype(np.uint8))
    amplitudes = []
    for rendered in _good(Nuisance(illumination=0.2)):
        ratio = rendered.image.astype(np.float64).sum(axis=2) / np.maximum(rendered.scene.sum(axis=2) * 255, 1)
        yy, xx = np.mgrid[0:256, 0:256] / 256
        design = np.stack([np.ones(xx.size), xx.ravel(), yy.ravel()], axis=1)
        bright = rendered.scene.sum(axis=2).ravel() > 0.6  # quantisation of dark pixels blurs the ratio
        coefficients, *_ = np.linalg.lstsq(design[bright], ratio.ravel()[bright], rcond=None)
        residual = ratio.ravel()[bright] - design[bright] @ coefficients
        assert np.abs(residual).mean() < 0.01  # a plane
        amplitudes.append(np.hypot(*coefficients[1:]))  # change across the image
    assert max(amplitudes) <= 0.2 + 0.01 and np.std(amplitudes) > 0.02 and max(amplitudes) > 0.1
    for rendered in _good(Nuisance(noise=4.0), 4):
        residual = rendered.image.astype(np.float64) - rendered.scene * 255
        inside = (rendered.scene > 0.05) & (rendered.scene < 0.95)  # away from clipping
        assert residual[inside].std() == pytest.approx(np.sqrt(16 + 1 / 12), rel=0.05)  # noise + rounding
        assert abs(residual[inside].mean()) < 0.1
    clean = _good(Nuisance(), 2)
    for rendered, original in zip(_good(Nuisance(jpeg_quality=50), 2), clean):
        error = rendered.image.astype(np.float64) - original.image
        assert 0 < np.sqrt((error**2).mean()) < 12


def test_nuisance_is_in_train_and_test_images_alike(tmp_path):
    """A setting changes every image of every split (and defective test images keep their level)."""
    common = dict(image_size=SIZE, n_train=2, n_test_good=2, n_test_per_cell=1, seed=1, levels=SMALL_LADDER[:1],
                  defect_types=("hole",))
    generate_category(tmp_path / "off", **common, nuisance=Nuisance())
    generate_category(tmp_path / "on", **common, nuisance=Nuisance(noise=2.0))
    off, on = _files(tmp_path / "off"), _files(tmp_path / "on")
    images = [name for name in off if name.endswith(".png") and "_mask" not in name]
    assert len(images) == 5 and all(off[name] != on[name] for name in images)
    assert off["ground_truth/hole/000_mask.png"] == on["ground_truth/hole/000_mask.png"]


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(image_size=8), "data.synthetic.image_size"),
        (dict(image_size=64.0), "data.synthetic.image_size"),
        (dict(n_train=0), "data.synthetic.n_train"),
        (dict(n_train=-1), "data.synthetic.n_train"),
        (dict(n_test_good=-1), "data.synthetic.n_test_good"),
        (dict(n_test_per_cell=-2), "data.synthetic.n_test_per_cell"),
        (dict(defect_types=("cut", "scratch")), "data.synthetic.defect_types"),
        (dict(defect_types="cut"), "data.synthetic.defect_types"),
        (dict(seed=-1), "data.synthetic.seed"),
        (dict(levels=()), "data.synthetic.levels"),
        (dict(levels=(Level(0.0, 48, 1.0),)), "data.synthetic.levels[0].delta_e"),
        (dict(levels=(Level(4.0, 48, 1.0), Level(4.0, 0, 1.0))), "data.synthetic.levels[1].area"),
        (dict(levels=(Level(4.0, 19200, 4.0),)), "data.synthetic.levels[0].area"),  # 1200 px: too much at 64 px
        (dict(levels=(Level(4.0, 3200, 4.0),)), "data.synthetic.levels[0]"),  # a 200 px long thread at 64 px
        (dict(levels=({"delta_e": 4, "area": 48},)), "data.synthetic.levels[0]"),
        (dict(nuisance=Nuisance(noise=-1.0)), "data.synthetic.nuisance.noise"),
        (dict(nuisance=Nuisance(jpeg_quality=100)), "data.synthetic.nuisance.jpeg_quality"),
        (dict(nuisance={"blur": 1}), "data.synthetic.nuisance"),
    ],
)
def test_bad_args_raise_naming_the_parameter(tmp_path, kwargs, name):
    with pytest.raises(PipelineError) as info:
        generate_category(tmp_path / "bad", **{**ARGS, **kwargs})
    message = str(info.value)
    assert name in message and "\n" not in message
    assert not (tmp_path / "bad").exists(), "nothing is written for bad args"


@pytest.mark.parametrize(
    "levels, message",
    [
        ([{"delta_e": 4, "area": 256, "width": 2}, {"delta_e": 8, "area": 256, "width": 2}],
         "data.synthetic.levels[1]: harder levels come later"),
        ([{"delta_e": 4, "area": 256, "width": 2}, {"delta_e": 4, "area": 256, "width": 2}],
         "data.synthetic.levels[1]: the same as levels[0]"),
        ([{"delta_e": 4, "area": 256}], "data.synthetic.levels[0].width: missing"),
        ([{"delta_e": 4, "area": 256, "width": 2, "colour": 1}], "data.synthetic.levels[0].colour: unknown parameter"),
        ("easy", "data.synthetic.levels: must be a non-empty list of mappings"),
    ],
)

def test_params_check_the_ladder(levels, message):
    params = default_params()
    params["data"]["synthetic"]["levels"] = levels
    with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(params, REPO / "params.yaml")


def test_refuses_to_mix_into_an_existing_category(category):
    with pytest.raises(PipelineError, match="already contains"):
        generate_category(category, **ARGS)
