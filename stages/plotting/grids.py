"""Image grids: the dataset overview and the per-model heatmap grid (matplotlib, PNG)."""
from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
from matplotlib.patches import Rectangle

from stages.core.errors import PipelineError
from stages.deploy.overlay import HEATMAP_CMAP, ColourScale, overlay
from stages.evaluation.threshold import flagged
from stages.plotting.style import OKABE_ITO, TRUTH, blank, plt

VIEW = OKABE_ITO[1]  # orange: the region the model sees (the ground truth is bluish green)


def select(defect_types: list[str], per_defect: int, good: int, seed: int) -> list[int]:
    """Seeded indices: `per_defect` images of every defect type (sorted), then `good` good ones.

    Same arguments -> same images; each type is drawn from its own stream, so adding a defect type
    or changing `good` does not change which images of the other types are shown.
    """
    for name, value in (("per_defect", per_defect), ("good", good)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PipelineError(f"figures: {name} must be an integer >= 0, got {value!r}")
    types = np.asarray(defect_types, dtype=object)
    chosen: list[int] = []
    kinds = sorted({str(t) for t in types} - {"good"}) + (["good"] if "good" in set(types) else [])
    for k, kind in enumerate(kinds):
        idx = np.flatnonzero(types == kind)
        count = min(good if kind == "good" else per_defect, len(idx))
        rng = np.random.default_rng([int(seed), k if kind != "good" else 10_000])
        chosen += sorted(rng.choice(idx, size=count, replace=False).tolist())
    return chosen


def subset(inputs, indices: list[int]):
    """Rows `indices` of a prepared Split or a FeatureSet (any dataclass of per-image arrays / lists)."""
    changes = {}
    for f in fields(inputs):
        value = getattr(inputs, f.name)
        if isinstance(value, dict):
            changes[f.name] = {k: v[indices] for k, v in value.items()}
        elif isinstance(value, list):
            changes[f.name] = [value[i] for i in indices]
        elif hasattr(value, "shape") and getattr(value, "ndim", 0) >= 1 and value.shape[0] == len(inputs):
            changes[f.name] = value[indices]
    return replace(inputs, **changes)


def outline(ax, mask: np.ndarray | None, color: str = TRUTH, width: float = 1.2) -> None:
    """Ground truth as a contour line on top of the image (masks are never colour-mapped)."""
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=width)


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def box(ax, corners: tuple[float, float, float, float] | None, color: str = VIEW) -> None:
    """A dashed rectangle (left, top, right, bottom) in the panel's pixel coordinates (pixel edges)."""
    if corners is not None:
        left, top, right, bottom = corners
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor=color,
                               linestyle="--", linewidth=1.4))


def overview_figure(rows: list[dict], title: str):
    """rows: one per image group (training, then each defect type), {"type": str, "items": [{"raw", "raw_mask",
    "raw_size", "view", "prepared", "mask", "valid", "name"}]}.

    Each image gives two panels: the raw image with its mask outline and a dashed box around the part the
    model sees (`view`), and the model input with its mask outline and, under padding, a dashed box around
    the image (`valid`, None when it fills the input). Returns (figure, (rows, columns)).
    """
    n_rows = len(rows)
    n_cols = 2 * max(len(r["items"]) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols, 1.9 * n_rows + 0.8), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            blank(ax)
            k, which = divmod(c, 2)
            if k >= len(row["items"]):
                ax.set_visible(False)
                continue
            item = row["items"][k]
            image, mask = (item["raw"], item["raw_mask"]) if which == 0 else (item["prepared"], item["mask"])
            ax.imshow(image, interpolation="antialiased")
            outline(ax, mask)
            box(ax, item["view"] if which == 0 else item["valid"])
            size = item["raw_size"] if which == 0 else image.shape[:2]
            ax.set_title(
                f"{'raw' if which == 0 else 'model input'} {size[1]}×{size[0]}\n{_short(item['name'])}", fontsize=8
            )
        axes[r, 0].set_ylabel(row["type"], fontsize=10, fontweight="bold")
    fig.suptitle(title)
    height = fig.get_figheight()
    fig.text(0.5, 0.05 / height, "green outline: ground-truth defect region", ha="center", va="bottom", fontsize=8,
             color=TRUTH)
    fig.text(0.5, 0.2 / height, "dashed box: the part of the raw image the model sees; on a model input, the image "
             "within its padding", ha="center", va="bottom", fontsize=8, color=VIEW)
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1))
    return fig, (n_rows, n_cols)


def heatmap_figure(
    model: str,
    images: np.ndarray,
    names: list[str],
    defect_types: list[str],
    masks: np.ndarray | None,
    maps: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    scale: ColourScale,
    reconstructions: np.ndarray | None = None,
):
    """Rows: selected test images. Columns: image | ground truth | [reconstruction] | anomaly map |
    overlay | map >= threshold. Returns (figure, (rows, columns))."""
    columns = ["image", "ground truth"]
    if reconstructions is not None:
        columns.append("reconstruction")
    columns += ["anomaly map", "overlay", "map ≥ threshold"]
    n_rows, n_cols = len(names), len(columns)
    if n_rows == 0:
        raise PipelineError(f"figures@{model}: no test images selected for the heatmap grid")
    cmap = plt.get_cmap(HEATMAP_CMAP)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.75 * n_cols + 0.6, 1.75 * n_rows + 1.6), squeeze=False)
    for r in range(n_rows):
        image, amap = images[r], maps[r]
        mask = masks[r] if masks is not None else None
        for c, column in enumerate(columns):
            ax = axes[r, c]
            blank(ax)
            if column == "image":
                ax.imshow(image)
            elif column == "ground truth":
                ax.imshow(image)
                outline(ax, mask)
            elif column == "reconstruction":
                ax.imshow(np.clip(reconstructions[r], 0.0, 1.0))
            elif column == "anomaly map":
                im = ax.imshow(amap, cmap=cmap, vmin=scale.low, vmax=scale.high)
            elif column == "overlay":  # the overlay predict and the demo show
                ax.imshow(overlay(image, amap, scale))
            else:
                ax.imshow(flagged(amap, threshold), cmap="gray", vmin=0, vmax=1)
                outline(ax, mask)
            if r == 0:
                ax.set_title(column, fontsize=10, fontweight="bold")
        verdict = "flagged" if flagged(scores[r], threshold) else "not flagged"
        axes[r, 0].set_ylabel(f"{defect_types[r]}\n{_short(names[r])}\nscore {scores[r]:.4g}\n{verdict}", fontsize=8)
    height = fig.get_figheight()
    fig.suptitle(f"{model}: anomaly maps of selected test images (threshold {threshold:.4g})", y=1 - 0.15 / height)
    fig.tight_layout(rect=(0, 1.35 / height, 1, 1 - 0.42 / height))
    cax = fig.add_axes((0.3, 0.95 / height, 0.4, 0.12 / height))
    bar = fig.colorbar(im, cax=cax, orientation="horizontal")
    bar.set_label(
        "anomaly map: median of validation maps (palest) … image threshold (darkest); green outline: ground truth\n"
        "an image score taken before the map is smoothed (PatchCore) can exceed the map's maximum",
        fontsize=8,
    )
    bar.ax.tick_params(labelsize=7)
    return fig, (n_rows, n_cols)
