"""The synthetic carpet generator: determinism, MVTec layout, masks, defects that show, bad args."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.errors import PipelineError
from stages.data.synthetic import DEFECT_TYPES, generate_category, render_image

SIZE = 64
ARGS = dict(image_size=SIZE, n_train=3, n_test_good=2, n_test_per_defect=2, seed=7)


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


def test_images_do_not_depend_on_other_split_counts(category, tmp_path):
    generate_category(tmp_path / "small", **{**ARGS, "n_train": 1, "n_test_good": 0, "defect_types": ("thread",)})
    small, full = _files(tmp_path / "small"), _files(category)
    assert set(small) == {"train/good/000.png", "test/thread/000.png", "test/thread/001.png",
                          "ground_truth/thread/000_mask.png", "ground_truth/thread/001_mask.png"}
    assert all(small[name] == full[name] for name in small)


def test_layout_and_counts(category):
    names = set(_files(category))
    expected = {f"train/good/{i:03d}.png" for i in range(3)} | {f"test/good/{i:03d}.png" for i in range(2)}
    for defect in DEFECT_TYPES:
        expected |= {f"test/{defect}/{i:03d}.png" for i in range(2)}
        expected |= {f"ground_truth/{defect}/{i:03d}_mask.png" for i in range(2)}
    assert names == expected


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
        assert (mask == 255).any(), f"empty mask for {path}"
        assert (mask == 255).mean() < 0.5, f"mask covers most of {path}"


def test_defect_changes_exactly_the_masked_pixels():
    """Against the same carpet rendered without the defect: the mask is exactly what changed, and by a lot."""
    for k, defect in enumerate(DEFECT_TYPES):
        for i in range(3):
            split = 2 + k  # the seed-sequence split index generate_category uses for this defect
            image, mask = render_image(ARGS["seed"], split, i, SIZE, defect)
            clean, none = render_image(ARGS["seed"], split, i, SIZE)
            assert none is None and mask.any()
            diff = np.abs(image.astype(int) - clean.astype(int))
            assert (diff[~mask] == 0).all(), f"{defect} {i}: pixels outside the mask changed"
            changed = diff[mask].max(axis=1) > 0
            assert changed.mean() > 0.95, f"{defect} {i}: only {changed.mean():.0%} of the mask changed"
            assert diff[mask].mean() > 15, f"{defect} {i}: defect too faint ({diff[mask].mean():.1f} levels)"


def _outlier_scores(category: Path):
    """Scores for 'these pixels stand out from good carpet', ~1 for good carpet pixels.

    Two views of a pixel set, each divided by its value on the training images:
    the mean Mahalanobis distance of the colours from the good colour distribution (stains, metal,
    threads), and the mean absolute luminance offset from the good median (holes, cuts).
    """
    good = np.concatenate([_load(p)[0].reshape(-1, 3) for p in sorted(category.glob("train/good/*.png"))]).astype(float)
    mean, inv_cov = good.mean(axis=0), np.linalg.inv(np.cov(good.T))
    luma = np.array([0.299, 0.587, 0.114])
    median_luma = np.median(good @ luma)

    def raw(pixels: np.ndarray) -> np.ndarray:
        centred = pixels - mean
        return np.array([
            np.sqrt(np.einsum("ij,jk,ik->i", centred, inv_cov, centred)).mean(),
            np.abs(pixels @ luma - median_luma).mean(),
        ])

    reference = raw(good)
    return lambda pixels: raw(pixels.astype(float)) / reference


def test_defect_pixels_stand_out_from_good_carpet(category):
    score = _outlier_scores(category)
    good_tests = [_load(p)[0] for p in sorted(category.glob("test/good/*.png"))]
    for defect in DEFECT_TYPES:
        for path in sorted((category / "test" / defect).glob("*.png")):
            image = _load(path)[0]
            mask = _load(category / "ground_truth" / defect / f"{path.stem}_mask.png")[0] == 255
            inside = score(image[mask]).max()
            assert inside > 1.8, f"{path}: defect pixels look like carpet (score {inside:.2f})"
            assert score(image[~mask]).max() < 1.5, f"{path}: carpet outside the mask looks odd"
            # The same region of held-out good images scores clearly lower (the check can tell them apart).
            for good in good_tests:
                assert inside > 1.3 * score(good[mask]).max(), f"{path}: a good image's region scores as high"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(image_size=8), "data.synthetic.image_size"),
        (dict(image_size=64.0), "data.synthetic.image_size"),
        (dict(n_train=0), "data.synthetic.n_train"),
        (dict(n_train=-1), "data.synthetic.n_train"),
        (dict(n_test_good=-1), "data.synthetic.n_test_good"),
        (dict(n_test_per_defect=-2), "data.synthetic.n_test_per_defect"),
        (dict(defect_types=("cut", "scratch")), "data.synthetic.defect_types"),
        (dict(defect_types="cut"), "data.synthetic.defect_types"),
        (dict(seed=-1), "data.synthetic.seed"),
    ],
)
def test_bad_args_raise_naming_the_parameter(tmp_path, kwargs, name):
    with pytest.raises(PipelineError) as info:
        generate_category(tmp_path / "bad", **{**ARGS, **kwargs})
    message = str(info.value)
    assert name in message and "\n" not in message
    assert not (tmp_path / "bad").exists(), "nothing is written for bad args"


def test_refuses_to_mix_into_an_existing_category(category):
    with pytest.raises(PipelineError, match="already contains"):
        generate_category(category, **ARGS)
