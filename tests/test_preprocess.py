"""The preprocess stage: resize + centre crop applied identically to images and masks, grayscale
to 3 channels, a seeded validation split, and categories without ground truth (folder source)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from stages.data.prepared import load_split
from tests.conftest import call_stage, default_params, write_params


def make_category(root: Path, grayscale: bool, with_masks: bool, size=(80, 64)) -> None:
    """A tiny MVTec-layout category; each defect image has a bright square exactly where its mask is."""
    rng = np.random.default_rng(0)
    mode = "L" if grayscale else "RGB"

    def save(array, path, image_mode=mode):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode=image_mode).save(path)

    def texture():
        shape = (size[1], size[0]) if grayscale else (size[1], size[0], 3)
        return rng.integers(40, 90, shape, dtype=np.uint8)

    for i in range(6):
        save(texture(), root / "train" / "good" / f"{i:03d}.png")
    save(texture(), root / "test" / "good" / "000.png")
    for i, (top, left) in enumerate([(20, 30), (28, 36)]):
        image, mask = texture(), np.zeros((size[1], size[0]), np.uint8)
        image[top : top + 12, left : left + 12] = 255
        mask[top : top + 12, left : left + 12] = 255
        save(image, root / "test" / "spot" / f"{i:03d}.png")
        if with_masks:
            save(mask, root / "ground_truth" / "spot" / f"{i:03d}_mask.png", image_mode="L")


def prepare(tmp_path: Path, grayscale: bool, with_masks: bool, seed: int = 0, max_train: int | None = None) -> Path:
    source = tmp_path / "my_category"
    make_category(source, grayscale, with_masks)
    params = default_params()
    params["data"].update(source="folder", categories=["my_category"], folder=str(tmp_path))
    params["preprocess"].update(resize=48, crop_size=40, val_fraction=0.34, seed=seed, max_train=max_train)
    write_params(tmp_path, params)
    call_stage("download", "my_category", cwd=tmp_path)
    call_stage("preprocess", "my_category", cwd=tmp_path)
    return tmp_path / "data" / "features" / "my_category.category" / "pixels.features"


def test_masks_follow_their_images_through_resize_and_crop(tmp_path):
    out = prepare(tmp_path, grayscale=False, with_masks=True)
    test = load_split(out / "test.npz")
    assert test.images.shape == (3, 40, 40, 3) and test.masks.shape == (3, 40, 40)
    assert test.defect_types == ["good", "spot", "spot"] and test.labels.tolist() == [0, 1, 1]
    assert not test.masks[0].any()
    for image, mask in zip(test.images[1:], test.masks[1:]):
        bright = image.mean(axis=2) > 200
        assert mask.sum() > 20
        # the defect pixels and the mask coincide after the same resize + crop (edges may blur)
        assert (bright & mask).sum() >= 0.8 * mask.sum() and (bright & ~mask).sum() <= 0.2 * mask.sum()


def test_grayscale_category_without_ground_truth(tmp_path):
    out = prepare(tmp_path, grayscale=True, with_masks=False)
    train, val, test = (load_split(out / f"{s}.npz") for s in ("train", "val", "test"))
    assert train.images.shape[1:] == (40, 40, 3)  # grayscale became 3-channel
    assert np.array_equal(train.images[..., 0], train.images[..., 2])
    assert test.masks is None  # image-level evaluation only
    assert len(train) == 4 and len(val) == 2  # round(6 * 0.34) = 2 held out
    assert not set(train.names) & set(val.names)
    assert all(name.startswith("train/good/") for name in train.names + val.names)


def test_validation_split_is_seeded(tmp_path):
    first = load_split(prepare(tmp_path / "a", grayscale=True, with_masks=False, seed=0) / "val.npz").names
    again = load_split(prepare(tmp_path / "b", grayscale=True, with_masks=False, seed=0) / "val.npz").names
    assert first == again
    others = {
        tuple(load_split(prepare(tmp_path / f"s{seed}", grayscale=True, with_masks=False, seed=seed) / "val.npz").names)
        for seed in (1, 2, 3)
    }
    assert len(others | {tuple(first)}) > 1


def test_category_without_ground_truth_is_evaluated_at_image_level(tmp_path):
    prepare(tmp_path, grayscale=True, with_masks=False)
    params = default_params()
    params["data"].update(source="folder", categories=["my_category"], folder=str(tmp_path))
    params["preprocess"].update(resize=48, crop_size=40, val_fraction=0.34)
    params["models"] = {
        "pc": {"method": "patchcore", "backbone": "efficientnet_lite0",
               "fit": {"coreset_ratio": 0.5, "pretrain_embed_dimension": 32, "target_embed_dimension": 32}},
    }
    write_params(tmp_path, params)
    for stage, arg in (("extract", "efficientnet_lite0"), ("fit", "pc"), ("evaluate", "pc")):
        call_stage(stage, "my_category", arg, cwd=tmp_path)
    metrics = json.loads((tmp_path / "metrics/models/my_category.category/pc.metrics.json").read_text())
    # the white squares on a dark texture are found: both spot images score above the good one
    assert metrics["image_auroc"] == 1.0 and metrics["per_defect_auroc"] == {"spot": 1.0}
    assert "pixel_auroc" not in metrics and "aupro" not in metrics


def test_few_shot_keeps_the_validation_split_and_a_seeded_subset(tmp_path):
    """preprocess.max_train: the validation split is taken first, so it is the same at every number of
    shots; the training subset is seeded (same params, same images) and nested in the full set."""
    full = load_split(prepare(tmp_path / "all", grayscale=False, with_masks=False) / "train.npz").names
    val = load_split(tmp_path / "all/data/features/my_category.category/pixels.features/val.npz").names
    for shots in (1, 2):
        subsets = []
        for attempt in ("a", "b"):
            folder = tmp_path / f"{shots}{attempt}"
            out = prepare(folder, grayscale=False, with_masks=False, max_train=shots)
            subsets.append(load_split(out / "train.npz").names)
            assert load_split(out / "val.npz").names == val
            assert json.loads((out / "inputs.json").read_text())["n_train"] == shots
        assert subsets[0] == subsets[1] and len(subsets[0]) == shots and set(subsets[0]) <= set(full)


def test_few_shot_table_from_experiments():
    from stages.few_shot import sweep_rows

    knn_file, pc_file = "metrics/models/c.category/knn.metrics.json", "metrics/models/c.category/pc.metrics.json"

    def experiment(n_train, knn, pc):
        return {"rev": "x", f"{knn_file}:n_train": float(n_train), f"{knn_file}:image_auroc": knn,
                f"{pc_file}:n_train": float(n_train), f"{pc_file}:image_auroc": pc, f"{pc_file}:pixel_auroc": pc / 2}

    experiments = [experiment(90, 0.9, 1.0), experiment(90, 0.0, 0.0), experiment(4, 0.5, 0.8), {"rev": "failed"}]
    assert sweep_rows(experiments, "c", ["knn", "pc"]) == [
        {"model": "knn", "n_train": 4, "image_auroc": 0.5, "pixel_auroc": None},
        {"model": "knn", "n_train": 90, "image_auroc": 0.9, "pixel_auroc": None},  # the first row of a size wins
        {"model": "pc", "n_train": 4, "image_auroc": 0.8, "pixel_auroc": 0.4},
        {"model": "pc", "n_train": 90, "image_auroc": 1.0, "pixel_auroc": 0.5},
    ]
