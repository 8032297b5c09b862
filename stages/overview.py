"""DVC stage `overview@<category>`: a grid of training and test images, raw and as the models see them.

Writes plots/<category>.category/overview.png: a row of `figures.overview.per_defect` seeded training
images, then per defect type (and good) as many seeded test images, each shown as the raw file and as
the prepared model input, with the ground-truth mask drawn as an outline on both. A dashed box on each
raw image marks the part the model sees by the recipe the images were prepared with (inputs.json:
preprocess.mode crop keeps a centre square, resize and pad the whole frame); under pad a dashed box on
the model input marks the image within its padding.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from stages.core.cli import run_main, stage_args
from stages.core.params import param
from stages.core.paths import category_plots_dir, pixels_dir, raw_category_dir
from stages.data.prepared import load_split, read_inputs
from stages.data.raw import Placement, list_category, read_image, read_mask, recipe

SHOWN_SIZE = 320  # raw images are shrunk to this longer side for the figure (MVTec's are 1024)
TRAIN_ROW = "train (good)"


def raw_panel(path, mask_path) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    image = read_image(path, "RGB")
    size = (image.height, image.width)
    scale = SHOWN_SIZE / max(image.size)
    shown = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if scale < 1:
        image = image.resize(shown, Image.BILINEAR)
    mask = None
    if mask_path is not None:
        mask_image = read_mask(mask_path)  # any nonzero pixel is defect, as in preprocess
        if scale < 1:
            mask_image = mask_image.resize(shown, Image.NEAREST)
        mask = np.asarray(mask_image) > 127
    return np.asarray(image), mask, size


def panel_item(split, i: int, item, preprocess: dict) -> dict:
    """One image's two panels: the raw file (or, without it, the prepared image) and the model input, with
    the view box in the raw panel's pixels and the valid box in the model input's."""
    if item is None:
        raw, raw_mask, size = split.images[i], None, split.image_size
    else:
        raw, raw_mask, size = raw_panel(item.path, item.mask_path)
    placement = Placement.of(size[1], size[0], preprocess)
    scale = raw.shape[1] / size[1]
    left, top, right, bottom = placement.view_box()
    (x, y), (w, h) = placement.offset, placement.resized
    inside = (max(0, x), max(0, y), min(placement.side, x + w), min(placement.side, y + h))
    return {
        "name": split.names[i],
        "raw": raw,
        "raw_mask": raw_mask,
        "raw_size": size,
        "view": (left * scale, top * scale, right * scale, bottom * scale),
        "prepared": split.images[i],
        "mask": split.masks[i] if split.masks is not None else None,
        "valid": None if inside == (0, 0, placement.side, placement.side) else inside,
    }


def main() -> None:
    from stages.plotting.grids import overview_figure, select
    from stages.plotting.style import save_png

    params, (category,) = stage_args("overview", "<category>")
    per_defect = param(params, "figures.overview.per_defect")
    seed = param(params, "figures.overview.seed")
    # the recipe the prepared images were made with (what every fit records), not today's params
    preprocess = recipe(read_inputs(pixels_dir(category))["preprocess"])
    train, test = (load_split(pixels_dir(category) / f"{split}.npz") for split in ("train", "test"))
    raw_train, raw_test, _ = list_category(raw_category_dir(category))
    raw_by_name = {item.name: item for item in raw_train + raw_test}

    rows: dict[str, list] = {}
    for split, chosen, label in ((train, select(train.defect_types, 0, per_defect, seed), lambda i: TRAIN_ROW),
                                 (test, select(test.defect_types, per_defect, per_defect, seed),
                                  lambda i: test.defect_types[i])):
        for i in chosen:
            rows.setdefault(label(i), []).append(panel_item(split, i, raw_by_name.get(split.names[i]), preprocess))
    ordered = [{"type": t, "items": items} for t, items in rows.items()]
    fig, panels = overview_figure(ordered, f"{category}: raw images and what the model sees "
                                           f"(preprocess.mode: {preprocess['mode']})")
    output = category_plots_dir(category) / "overview.png"
    save_png(fig, output, panels, colours=256)
    print(f"overview@{category}: {panels[0]} rows (training, then each defect type) x {panels[1]} panels -> {output}")


if __name__ == "__main__":
    run_main(main)
