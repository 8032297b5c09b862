"""The page template of `dvc plots show`: the plots grouped by the question they answer, with
vega, vega-lite and vega-embed inlined (no network).

DVC's default page loads the libraries from a CDN (dvc_render/vega.py `SCRIPTS`), so offline every
chart is blank. DVC fills a project template (`plots.html_template` in .dvc/config) by plain text
replacement of `{plot_divs}` (required), `{scripts}` and `{refresh_tag}`; each chart's div calls
`vegaEmbed(...)` as soon as it is parsed, so the libraries must be defined in <head>. Leaving
`{scripts}` out keeps DVC's CDN tags off the page. The JavaScript is taken from the installed
vl-convert-python (`vl_convert.javascript_bundle()`), never committed.

Order and groups: DVC gives a template no say over the order of `{plot_divs}` (dvc_render's
`render_html` puts every Vega chart first, in the order DVC collects the plot definitions, then
every image sorted by path) and no hook between them. So the divs stay as DVC writes them, direct
children of one flex container, and CSS `order` places each (matched by the div id DVC derives
from the plot id or file path) after its group's heading: nothing of DVC's rendering is touched.
GROUPS below is that placement. Headings of groups with no plot on the page are hidden
(CSS `:has`), and a plot no group names lands under "Other plots" at the end. DVC captions an
image with its file path; a small script after the plots replaces it with what the image shows.
"""
from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    """One plot on the page: a top-level plot id of dvc.yaml, or a file path pattern whose {fields}
    stand for one path component each (a category, a model, a backbone)."""

    plot: str
    caption: str = ""  # images only: replaces DVC's file-path caption; {fields} filled from the path


@dataclass(frozen=True)
class Section:
    anchor: str
    heading: str
    intro: str
    places: tuple[Place, ...]
    level: int = 2  # 2: a question; 3: a part of the question above


GROUPS: tuple[Section, ...] = (
    Section(
        "how-good",
        "How good is each model?",
        "How well each model tells defective from good test images (image AUROC) and finds the defect "
        "pixels (pixel AUROC, and AUPRO, where every defect region counts the same): the mean over the "
        "categories, then every category. 1 is perfect, 0.5 is chance.",
        (
            Place("summary"),
            Place("categories"),
            Place("detection_by_level"),  # synthetic ladders only (docs/explanation/synthetic-benchmark.md)
            Place("few_shot_image_auroc"),
            Place("few_shot_pixel_auroc"),
            Place("plots/summary.png", "The summary as a static figure (plots/summary.png, the README's chart)"),
        ),
    ),
    Section(
        "how-sure",
        "How sure are these numbers?",
        "How far each number could move on another draw of test images (bootstrap intervals), and which "
        "differences between two models are more than that chance (paired bootstrap on the same resamples).",
        (Place("intervals"), Place("pairwise")),
    ),
    Section(
        "where-it-fails",
        "Where does it fail?",
        "Which images and pixels each model gets wrong: the trade-off curves of all models, then per model "
        "its decisions at the threshold (the mean + n·σ of its good validation images' scores, n = "
        "evaluate.threshold_n_std), every test image's score by its label, the anomaly maps and the score "
        "distributions.",
        (),
    ),
    Section(
        "curves",
        "Curves: all models on one chart",
        "Image-level ROC and precision-recall, pixel-level ROC and PRO (first category of data.categories).",
        (Place("image_roc"), Place("image_pr"), Place("pixel_roc"), Place("pro")),
        level=3,
    ),
    Section(
        "decisions",
        "Decisions at the threshold",
        "Test images by their true label and the model's decision: the off-diagonal cells are the errors.",
        (Place("plots/{category}.category/{model}.model/confusion.csv"),),
        level=3,
    ),
    Section(
        "scores",
        "Every test image's score, by label",
        "One dot per test image, one row per label (good, then each defect type), the threshold dashed: a "
        "defect type whose dots sit left of the line is one the model misses. Hover for the image.",
        (Place("plots/{category}.category/{model}.model/scores.csv"),),
        level=3,
    ),
    Section(
        "maps",
        "Anomaly maps",
        "Selected test images of each defect type and good ones, with the model's map on one colour scale "
        "per model (palest: the median validation map; darkest: the threshold).",
        (
            Place(
                "plots/{category}.category/{model}.model/figures/heatmaps.png",
                "Anomaly maps: {model} on {category}, selected test images (columns named in the figure)",
            ),
        ),
        level=3,
    ),
    Section(
        "distributions",
        "Score distributions against the validation images",
        "Per defect type, the histogram of its test scores against the good test images and the good "
        "validation images the threshold is set from.",
        (
            Place(
                "plots/{category}.category/{model}.model/figures/scores.png",
                "Score histograms: {model} on {category}, each defect type against the good test and "
                "validation images (dashed: threshold)",
            ),
        ),
        level=3,
    ),
    Section(
        "how-it-trained",
        "How did it train?",
        "Loss per epoch of the trained models (first seed), on the training and the validation images; the "
        "ring marks the epoch whose weights were kept. Models that do not train have no curve.",
        (Place("plots/{category}.category/{model}.model/train/plots/custom/losses.json"),),
    ),
    Section(
        "the-data",
        "What do the data look like?",
        "The test images of each defect type, raw and as the models see them, and how each backbone's "
        "features spread the images (t-SNE).",
        (
            Place(
                "plots/{category}.category/overview.png",
                "Test images of {category}: each defect type and good, raw and as the models see them "
                "(ground truth outlined)",
            ),
            Place("plots/{category}.category/{backbone}.tsne.csv"),
        ),
    ),
)

OTHER = Section("other", "Other plots", "Plots that no group of stages/plotting/page.py names.", ())

FIELD = re.compile(r"\{(\w+)\}")


def div_id(name: str) -> str:
    """The id DVC gives a plot's div: its plot id or file path, special characters as '_'."""
    from dvc_render.base import Renderer

    return Renderer.remove_special_chars(name)


def selector(place: Place) -> str:
    """A CSS selector of the div(s) of one place: the exact id, or its fixed start and end around the
    {fields} (each field is one path component, so no other plot's id has both)."""
    parts = FIELD.split(place.plot)  # literal, field, literal, field, ..., literal
    if len(parts) == 1:
        return f'div[id="{div_id(place.plot)}"]'
    head, tail = parts[0], parts[-1]
    return f'div[id^="{div_id(head)}"][id$="{div_id(tail)}"]'


def caption_rule(place: Place) -> dict:
    """For the script: a regular expression of the image's path and the caption to put in its place."""
    pieces = FIELD.split(place.plot)
    pattern = "".join(re.escape(p) if i % 2 == 0 else "([^/]+)" for i, p in enumerate(pieces))
    return {"pattern": f"^{pattern}$", "fields": pieces[1::2], "caption": place.caption}


def sections_with_orders() -> list[tuple[Section, int, list[tuple[Place, int]]]]:
    """Every section with the CSS order of its heading and of each of its places (gaps of 10 left free)."""
    laid_out = []
    for i, section in enumerate((*GROUPS, OTHER)):
        base = 100 * (i + 1)
        laid_out.append((section, base, [(place, base + 10 * (j + 1)) for j, place in enumerate(section.places)]))
    return laid_out


def layout_css() -> str:
    laid_out = sections_with_orders()
    placed = [selector(place) for _, _, places in laid_out for place, _ in places]
    other_order = laid_out[-1][1] + 10
    # :where() weighs nothing, so every placement below overrides this default
    lines = [f":where(main.report > div) {{ order: {other_order}; }}"]
    for section, order, places in laid_out:
        lines.append(f"#{section.anchor} {{ order: {order}; }}")
        for place, place_order in places:
            lines.append(f"{selector(place)} {{ order: {place_order}; }}")
    # A heading shows only while a plot it heads is on the page (a question: any of its parts'). Written
    # so that a browser without :has() drops the rule and shows every heading but "Other plots".
    for k, (section, _, places) in enumerate(laid_out):
        if section is OTHER:
            unplaced = "div" + "".join(f":not({s})" for s in placed)
            lines.append(f"#{section.anchor} {{ display: none; }}")
            lines.append(f"main.report:has(> {unplaced}) > #{section.anchor} {{ display: block; }}")
            continue
        present = [selector(p) for p, _ in places]
        if section.level == 2:
            for part, _, part_places in laid_out[k + 1:]:
                if part.level == 2:
                    break
                present += [selector(p) for p, _ in part_places]
        lines.append(f"main.report:not(:has(> :is({', '.join(present)}))) > #{section.anchor} {{ display: none; }}")
    return "\n".join(lines)


def headings_html() -> str:
    blocks = []
    for section, _, _ in sections_with_orders():
        tag = f"h{section.level}"
        blocks.append(
            f'<header class="section level{section.level}" id="{section.anchor}">'
            f"<{tag}>{html.escape(section.heading)}</{tag}>"
            f'<p class="intro">{html.escape(section.intro)}</p></header>'
        )
    return "\n".join(blocks)


def contents_html() -> str:
    links = [
        f'<a href="#{s.anchor}">{html.escape(s.heading)}</a>' for s in GROUPS if s.level == 2
    ]
    return '<nav class="contents">' + " · ".join(links) + "</nav>"


CAPTIONS_SCRIPT = """<script>
// DVC captions an image with its file path (dvc_render ImageRenderer): say what it shows instead.
(function () {
  var rules = %s;
  document.querySelectorAll("main.report > div[id]").forEach(function (div) {
    var label = div.querySelector(":scope > p");
    if (!label || !div.querySelector("img")) return;
    var path = label.textContent.trim();
    rules.some(function (rule) {
      var match = new RegExp(rule.pattern).exec(path);
      if (!match) return false;
      var text = rule.caption;
      rule.fields.forEach(function (field, i) { text = text.split("{" + field + "}").join(match[i + 1]); });
      label.textContent = text;
      label.className = "caption";
      label.title = path;
      return true;
    });
  });
})();
</script>"""

STYLE = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; }
p.note { color: #555; max-width: 70em; margin-top: 4px; }
nav.contents { margin: 10px 0 4px; font-size: 15px; }
nav.contents a { color: #0b5cad; text-decoration: none; }
main.report { display: flex; flex-wrap: wrap; align-items: flex-start; }
main.report > header { flex: 0 0 100%; box-sizing: border-box; }
main.report > header.level2 { border-top: 2px solid #333; margin-top: 26px; padding-top: 2px; }
main.report > header.level3 { margin-top: 12px; }
main.report > header h2 { font-size: 20px; margin: 8px 0 2px; }
main.report > header h3 { font-size: 16px; margin: 6px 0 2px; color: #333; }
main.report > header p.intro { color: #444; max-width: 75em; margin: 2px 0 6px; }
main.report > div { margin: 6px 10px 10px 0; }
main.report > div[style] { border: 1px solid #ccc !important; padding: 4px; }
main.report > div > p { margin: 4px; color: #777; font-size: 12px; }
main.report > div > p.caption { color: #222; font-size: 13px; font-weight: bold; white-space: normal; }
main.report img { max-width: 94vw; height: auto; }
main.report > div[id="plots_summary_png"] img { max-width: min(94vw, 640px); }
.vega-embed { padding: 4px; }
"""

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>Anomaly detection: results of this workspace</title>
<style>
@STYLE@
@LAYOUT@
</style>
<!-- vega @VEGA@, vega-lite @VEGA_LITE@, vega-embed from vl-convert-python @VL_CONVERT@ -->
<script>
(function () {
@BUNDLE@
})();
</script>
</head>
<body>
<h1>Anomaly detection: results of this workspace</h1>
@CONTENTS@
<p class="note">Every plot of <code>dvc plots show</code>, grouped by the question it answers. Charts are
interactive (hover for values; drag or scroll to zoom where enabled). Rendered offline: vega, vega-lite and
vega-embed are inlined in this page; image grids are PNG files next to it, in static/.</p>
<main class="report">
@HEADINGS@
{plot_divs}
</main>
@CAPTIONS@
</body>
</html>
"""


def page_template() -> str:
    import vl_convert

    bundle = vl_convert.javascript_bundle()
    # An inline script ends at the first "</script" whatever the JavaScript around it means.
    bundle = bundle.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    # Inside a function, the bundle's top-level names cannot clash with DVC's `var spec` per chart;
    # it publishes vegaEmbed, vega and vegaLite on window itself.
    rules = [caption_rule(p) for s in GROUPS for p in s.places if p.caption]
    parts = {
        "@STYLE@": STYLE.strip(),
        "@LAYOUT@": layout_css(),
        "@VEGA@": getattr(vl_convert, "get_vega_version", lambda: "?")(),
        "@VEGA_LITE@": getattr(vl_convert, "get_vegalite_versions", lambda: ["?"])()[-1],
        "@VL_CONVERT@": getattr(vl_convert, "__version__", "?"),
        "@CONTENTS@": contents_html(),
        "@HEADINGS@": headings_html(),
        "@CAPTIONS@": CAPTIONS_SCRIPT % json.dumps(rules).replace("</", "<\\/"),
    }
    page = PAGE
    for token, text in parts.items():  # the bundle last, so no token is looked for inside it
        page = page.replace(token, text)
    return page.replace("@BUNDLE@", bundle)
