"""One look for every PNG: Agg backend, Okabe-Ito colours, reproducible files."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402

from stages.core.outputs import atomic_path  # noqa: E402

# Okabe & Ito (2008): distinguishable with every common colour-vision deficiency.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
GOOD = "#999999"  # good test images
VALIDATION = "#0072B2"  # held-out good validation images
TRUTH = "#009E73"  # ground-truth outlines (bluish green)
DPI = 100

plt.rcParams.update(
    {
        "font.family": "DejaVu Sans",
        "font.size": 9,
        "axes.titlesize": 9,
        "axes.labelsize": 9,
        "figure.titlesize": 12,
        "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO),
        "svg.hashsalt": "figures",
    }
)


def colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def save_png(fig, path: str | Path, panels: tuple[int, int] | None = None, colours: int | None = None) -> None:
    """Write `fig` atomically as a reproducible RGB PNG (no software/date metadata) and close it.

    `colours` (image grids: 256) quantises to a palette, which makes photo grids ~4x smaller in
    git at no visible cost. `panels` (rows, columns) of an image grid is stored in the PNG's
    Comment text chunk, so tests and tools can check a grid's shape without guessing it from pixels.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        image = rendered.convert("RGB")
    if colours:
        image = image.quantize(colours, method=Image.Quantize.FASTOCTREE)
    info = PngInfo()
    if panels is not None:
        info.add_text("Comment", f"panels={panels[0]}x{panels[1]}")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
