"""DVC stage `preprocess@<category>`: one raw category, each image brought to the model's input by
`preprocess.mode` (crop, resize or pad; stages/data/raw.py), into
data/features/<category>.category/pixels.features/{train,val,test}.npz, with inputs.json, the recipe
every fit records and predict, the demo and the ONNX export apply.

A seeded fraction of train/good is held out as the validation split of good images (used for
early stopping and for the mean + 2 sigma threshold, never for fitting).
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from stages.core.cli import run_main, stage_args
from stages.core.errors import check, warn
from stages.core.outputs import atomic_path
from stages.core.params import param
from stages.core.paths import pixels_dir, raw_category_dir
from stages.data.levels import read_levels
from stages.data.prepared import Split, save_split, write_inputs
from stages.data.raw import (
    RECIPE_KEYS,
    Placement,
    RawImage,
    check_mask_size,
    crop_warning,
    list_category,
    prepare_image,
    prepare_mask,
    read_image,
    read_mask_levels,
    recipe,
    soft_mask_warning,
)

MIN_VALIDATION = 5  # fewer validation images make the threshold's std a guess


def load_images(items: list[RawImage], preprocess: dict, with_masks: bool, desc: str,
                soft_masks: list | None = None, sizes: list | None = None) -> Split:
    """The model inputs of `items` (and their masks, and where padding is, which pixels show the image).
    Non-binary masks are appended to `soft_masks`, the raw (width, height) of every image to `sizes`."""
    crop = preprocess["crop_size"]
    images, masks, valid = [], [], []
    for item in tqdm(items, desc=desc, unit="img"):
        image = read_image(item.path, "RGB")  # grayscale categories become 3-channel here
        if sizes is not None:
            sizes.append(image.size)
        images.append(prepare_image(image, preprocess))
        valid.append(Placement.of(*image.size, preprocess).valid())
        if with_masks:
            if item.mask_path is None:
                masks.append(np.zeros((crop, crop), dtype=bool))
                continue
            mask, levels = read_mask_levels(item.mask_path)  # any nonzero pixel is defect: 0/1 and 0/255 alike
            check_mask_size(item, mask, image)
            if not mask.getbbox():
                warn(f"{item.mask_path}: mask is all zero for defect image {item.path} (no defect pixels)")
            if levels > 1 and soft_masks is not None:
                soft_masks.append((item.mask_path, levels))
            masks.append(prepare_mask(mask, preprocess))
    valid = np.stack(valid)
    return Split(
        images=np.stack(images).astype(np.uint8),
        names=[item.name for item in items],
        labels=np.array([int(item.defect_type != "good") for item in items], dtype=np.int64),
        defect_types=[item.defect_type for item in items],
        masks=np.stack(masks) if with_masks else None,
        valid=None if valid.all() else valid,
    )


def main() -> None:
    params, (category,) = stage_args("preprocess", "<category>")
    # the input recipe: recorded in inputs.json (then in every fit), the one predict and the runtimes apply
    preprocess = recipe({key: param(params, f"preprocess.{key}") for key in RECIPE_KEYS})
    val_fraction = param(params, "preprocess.val_fraction")
    seed = param(params, "preprocess.seed")
    max_train = param(params, "preprocess.max_train")  # types and ranges: checked by load_params

    train_items, test_items, has_masks = list_category(raw_category_dir(category))
    n_val = max(1, round(len(train_items) * val_fraction))
    check(
        n_val < len(train_items),
        f"preprocess.val_fraction={val_fraction} leaves no training images ({len(train_items)} in train/good)",
    )
    if n_val < MIN_VALIDATION:
        warn(f"preprocess.val_fraction={val_fraction} holds out {n_val} of {len(train_items)} good training images of "
             f"{category}: the mean + n_std * std threshold rests on {n_val} validation score(s)"
             + (" (with one, the threshold is that image's score)" if n_val == 1 else "")
             + f"; at least {MIN_VALIDATION} give a usable spread (raise val_fraction)")
    order = np.random.default_rng(seed).permutation(len(train_items))
    val_items = [train_items[i] for i in sorted(order[:n_val])]
    fit_items = [train_items[i] for i in sorted(order[n_val:])]
    if max_train is not None and max_train < len(fit_items):
        # few-shot: a seeded subset of what is left once the validation split is taken, so the
        # threshold and early stopping see the same held-out images at every number of shots
        keep = np.random.default_rng([seed, max_train]).permutation(len(fit_items))[:max_train]
        fit_items = [fit_items[i] for i in sorted(keep)]

    # each defective test image's difficulty level, when the category has a levels.csv (the synthetic one)
    labels = [int(item.defect_type != "good") for item in test_items]
    levelled = read_levels(raw_category_dir(category), [item.name for item in test_items], labels)

    destination = pixels_dir(category)
    soft, sizes = [], []
    with atomic_path(destination) as out:  # a bad image or mask on the way leaves no output
        out.mkdir(parents=True)
        save_split(out / "train.npz", load_images(fit_items, preprocess, False, "train", sizes=sizes))
        save_split(out / "val.npz", load_images(val_items, preprocess, False, "val", sizes=sizes))
        test = load_images(test_items, preprocess, has_masks, "test", soft_masks=soft)
        if levelled is not None:
            test.levels, test.ladder = levelled
        save_split(out / "test.npz", test)
        write_inputs(out, preprocess, backbone=None, n_train=len(fit_items))
    for line in (soft_mask_warning(soft, sum(item.mask_path is not None for item in test_items)),
                 crop_warning(f"{category}/train/good", sizes, preprocess)):
        if line:
            warn(line)
    print(f"prepared {len(fit_items)} train, {len(val_items)} val, {len(test_items)} test images -> {destination}")


if __name__ == "__main__":
    run_main(main)
