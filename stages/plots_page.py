"""DVC stage `plots_page`: the offline page template of `dvc plots show` -> plots/page_template.html.

.dvc/config points `plots.html_template` at it (`../plots/page_template.html`, relative to .dvc/).
It is a cached output, not committed: it holds third-party JavaScript (vega, vega-lite,
vega-embed) taken from the installed vl-convert-python; see stages/plotting/page.py.
"""
from __future__ import annotations

from stages.core.cli import run_main
from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path
from stages.core.paths import PLOTS_ROOT

OUTPUT = PLOTS_ROOT / "page_template.html"


def main() -> None:
    from stages.plotting.page import page_template

    try:
        page = page_template()
    except ImportError as exc:
        raise PipelineError(f"vl-convert-python is not installed ({exc}); pip install -r requirements.txt") from exc
    with atomic_path(OUTPUT) as tmp:
        tmp.write_text(page, encoding="utf-8")
    print(f"plots_page: {OUTPUT.stat().st_size / 1e6:.1f} MB -> {OUTPUT}")


if __name__ == "__main__":
    run_main(main)
