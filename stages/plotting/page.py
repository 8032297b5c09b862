"""The page template of `dvc plots show`, with vega, vega-lite and vega-embed inlined (no network).

DVC's default page loads them from a CDN (dvc_render/vega.py `SCRIPTS`), so offline every chart is
blank. DVC fills a project template (`plots.html_template` in .dvc/config) by plain text
replacement of `{plot_divs}` (required), `{scripts}` and `{refresh_tag}`; each chart's div calls
`vegaEmbed(...)` as soon as it is parsed, so the libraries must be defined in <head>. Leaving
`{scripts}` out keeps DVC's CDN tags off the page. The JavaScript is taken from the installed
vl-convert-python (`vl_convert.javascript_bundle()`), never committed.
"""
from __future__ import annotations

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>Anomaly detection: DVC plots</title>
<style>
  body {{ font-family: "DejaVu Sans", Arial, sans-serif; margin: 16px; color: #222; }}
  h1 {{ font-size: 20px; }}
  p.note {{ color: #555; max-width: 70em; }}
  body > div {{ display: inline-block; vertical-align: top; margin: 6px; }}
  img {{ max-width: 96vw; height: auto; }}
  .vega-embed {{ padding: 4px; }}
</style>
<!-- vega {vega}, vega-lite {vega_lite}, vega-embed from vl-convert-python {vl_convert} -->
<script>
(function () {{
{bundle}
}})();
</script>
</head>
<body>
<h1>Anomaly detection pipeline: every plot of this workspace</h1>
<p class="note">Rendered offline: vega, vega-lite and vega-embed are inlined in this page.
Charts are interactive (hover for values; drag or scroll to zoom where enabled).
Image grids are PNG files next to this page, in static/.</p>
{{plot_divs}}
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
    versions = {
        "vega": getattr(vl_convert, "get_vega_version", lambda: "?")(),
        "vega_lite": getattr(vl_convert, "get_vegalite_versions", lambda: ["?"])()[-1],
        "vl_convert": getattr(vl_convert, "__version__", "?"),
    }
    page = PAGE.format(bundle="{BUNDLE}", refresh_tag="{refresh_tag}", **versions)
    return page.replace("{BUNDLE}", bundle)
