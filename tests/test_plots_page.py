"""The page template of `dvc plots show` (stages/plotting/page.py) filled by dvc_render itself with one
plot of every kind the pipeline declares, laid out by headless Chromium: the questions in order, each
plot under its heading, a plot no group names under "Other plots" (shown only then), image captions.
Seconds, no pipeline: tests/test_pipeline.py::test_plots_show_offline_page checks the real page."""
from __future__ import annotations

import base64
import io

import pytest

from tests.test_pipeline import div_id, page_layout

pytest.importorskip("vl_convert")

# plot id or file -> the heading it belongs under (one of each kind; two models, two categories)
PLACED = {
    "summary": "how-good",
    "categories": "how-good",
    "plots/summary.png": "how-good",
    "intervals": "how-sure",
    "pairwise": "how-sure",
    "image_roc": "curves",
    "pro": "curves",
    "plots/carpet.category/knn_effnet.model/confusion.csv": "decisions",
    "plots/grid.category/patchcore_effnet.model/confusion.csv": "decisions",
    "plots/carpet.category/knn_effnet.model/scores.csv": "scores",
    "plots/grid.category/patchcore_effnet.model/scores.csv": "scores",
    "plots/grid.category/patchcore_effnet.model/figures/heatmaps.png": "maps",
    "plots/carpet.category/knn_effnet.model/figures/scores.png": "distributions",
    "plots/carpet.category/ae_l2.model/train/plots/custom/losses.json": "how-it-trained",
    "plots/carpet.category/overview.png": "the-data",
    "plots/carpet.category/efficientnet_lite0.tsne.csv": "the-data",
}
QUESTIONS = ["how-good", "how-sure", "where-it-fails", "how-it-trained", "the-data"]


def png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image;base64," + base64.b64encode(buffer.getvalue()).decode()


def render(plots: list[str], out) -> None:
    """The page as `dvc plots show` writes it: dvc_render's render_html with our template."""
    from dvc_render import ImageRenderer, VegaRenderer, render_html

    from stages.plotting.page import page_template

    renderers = []
    for plot in plots:
        if plot.endswith(".png"):
            renderers.append(ImageRenderer([{"rev": "workspace", "src": png()}], plot))
        else:
            points = [{"x": 0, "y": 1, "rev": "workspace"}, {"x": 1, "y": 2, "rev": "workspace"}]
            renderers.append(VegaRenderer(points, plot, x="x", y="y", title=f"chart {plot}"))
    template = out / "page_template.html"  # a path, as .dvc/config gives it (a long string is taken for one)
    template.write_text(page_template(), encoding="utf-8")
    render_html(renderers, out / "index.html", html_template=template)


@pytest.fixture(scope="module")
def page_template_text():
    from stages.plotting.page import page_template

    return page_template()


def test_template_is_what_dvc_fills(page_template_text):
    """DVC replaces `{plot_divs}` (and refuses a template without it); `{scripts}` would add its CDN tags."""
    assert page_template_text.count("{plot_divs}") == 1 and "{scripts}" not in page_template_text
    assert "window.vegaEmbed=" in page_template_text.replace(" ", "")  # the inlined bundle


def test_every_plot_lands_under_its_heading(tmp_path):
    # a plot of another stage first, as DVC may list it anywhere: it must still land under "Other plots"
    plots = ["difficulty", *PLACED]
    render(plots, tmp_path)
    layout = page_layout(tmp_path / "index.html", tmp_path / "chromium")
    assert all(p["drawn"] for p in layout["plots"]), [p["id"] for p in layout["plots"] if not p["drawn"]]
    headings = [h for h in layout["headings"] if h["shown"]]
    ids = [h["id"] for h in headings]
    assert [i for i in ids if i in QUESTIONS] == QUESTIONS and ids[-1] == "other"
    assert [h["top"] for h in headings] == sorted(h["top"] for h in headings)
    bottoms = [*(h["top"] for h in headings[1:]), float("inf")]
    below = {h["id"]: (h["top"], bottom) for h, bottom in zip(headings, bottoms)}
    at = {p["id"]: p for p in layout["plots"]}
    for plot, heading in {**PLACED, "difficulty": "other"}.items():
        top, bottom = below[heading]
        assert top < at[div_id(plot)]["top"] < bottom, f"{plot} is not under {heading}"
    captions = {plot: at[div_id(plot)]["caption"] for plot in PLACED if plot.endswith(".png")}
    assert captions["plots/grid.category/patchcore_effnet.model/figures/heatmaps.png"].startswith(
        "Anomaly maps: patchcore_effnet on grid"
    )
    assert captions["plots/carpet.category/overview.png"].startswith("Test images of carpet")


def test_other_plots_heading_only_when_a_plot_needs_it(tmp_path):
    """Headings of groups with nothing on the page are hidden (no trained model: no "How did it train?")."""
    render([p for p, heading in PLACED.items() if heading != "how-it-trained"], tmp_path)
    layout = page_layout(tmp_path / "index.html", tmp_path / "chromium")
    shown = [h["id"] for h in layout["headings"] if h["shown"]]
    assert "other" not in shown and "how-it-trained" not in shown and "how-good" in shown
