"""DVC stage `overview@<category>`: a grid of test images per defect type, raw and as the models see them.

Writes plots/<category>.category/overview.png: per defect type (and good), `figures.overview.per_defect`
seeded test images, each shown as the raw file and as the prepared model input (resize + centre
crop), with the ground-truth mask drawn as an outline on both.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from stages.core.cli import run_main, stage_args
from stages.core.params import param
from stages.core.paths import category_plots_dir, pixels_dir, raw_category_dir
from stages.data.prepared import load_split
from stages.data.raw import list_category, read_image, read_mask

SHOWN_SIZE = 320  # raw images are shrunk to this longer side for the figure (MVTec's are 1024)


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


def main() -> None:
    from stages.plotting.grids import overview_figure, select
    from stages.plotting.style import save_png

    params, (category,) = stage_args("overview", "<category>")
    per_defect = param(params, "figures.overview.per_defect")
    seed = param(params, "figures.overview.seed")
    test = load_split(pixels_dir(category) / "test.npz")
    _, raw_test, _ = list_category(raw_category_dir(category))
    raw_by_name = {item.name: item for item in raw_test}

    chosen = select(test.defect_types, per_defect, per_defect, seed)
    rows: dict[str, list] = {}
    for i in chosen:
        item = raw_by_name.get(test.names[i])
        raw, raw_mask, size = raw_panel(item.path, item.mask_path) if item else (test.images[i], None, test.image_size)
        rows.setdefault(test.defect_types[i], []).append(
            {
                "name": test.names[i],
                "raw": raw,
                "raw_mask": raw_mask,
                "raw_size": size,
                "prepared": test.images[i],
                "mask": test.masks[i] if test.masks is not None else None,
            }
        )
    ordered = [{"type": t, "items": items} for t, items in rows.items()]
    fig, panels = overview_figure(ordered, f"{category}: test images per defect type")
    output = category_plots_dir(category) / "overview.png"
    save_png(fig, output, panels, colours=256)
    print(f"overview@{category}: {panels[0]} defect types x {panels[1]} panels -> {output}")


if __name__ == "__main__":
    run_main(main)
