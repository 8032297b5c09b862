"""Figure helpers: seeded image selection, curve thinning, colour scale, PNG determinism.

The offline page itself is checked end to end in test_pipeline.py::test_plots_show_offline_page.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from stages.core.errors import PipelineError
from stages.deploy.overlay import ColourScale
from stages.evaluation.curves import pixel_roc_rows, pr_rows, pro_rows, thin_curve
from stages.evaluation.statistics import PixelStats
from stages.plotting.grids import select


def test_select_is_seeded_and_covers_every_defect_type():
    types = ["good"] * 5 + ["cut"] * 4 + ["hole"] * 1 + ["color"] * 3
    chosen = select(types, per_defect=2, good=3, seed=0)
    picked = [types[i] for i in chosen]
    assert picked == ["color", "color", "cut", "cut", "hole", "good", "good", "good"]
    assert chosen == select(types, per_defect=2, good=3, seed=0)
    assert chosen != select(types, per_defect=2, good=3, seed=1)
    # the good images do not change which defect images are drawn
    assert select(types, 2, 1, 0)[:5] == chosen[:5]
    with pytest.raises(PipelineError, match="per_defect"):
        select(types, per_defect=-1, good=1, seed=0)


def test_thin_curve_keeps_ends_and_bounds_the_points():
    x = np.sort(np.random.default_rng(0).random(100_000))
    y = np.sqrt(x)
    keep = thin_curve(x, y, 500)
    assert keep[0] == 0 and keep[-1] == len(x) - 1
    assert len(keep) <= 502 and np.all(np.diff(keep) > 0)
    assert np.max(np.diff(x[keep])) < 0.01  # no big gaps along x
    assert list(thin_curve(x[:10], y[:10], 500)) == list(range(10))


def test_pixel_curves_are_thinned_and_monotone():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 64, 64), bool)
    masks[:2, 10:30, 10:30] = True
    maps = rng.random((4, 64, 64)).astype(np.float32) + masks * 0.5
    pixels = PixelStats.from_maps(masks, maps, bins=8192)
    roc = pixel_roc_rows(pixels, 200)
    pro = pro_rows(pixels, 200)
    for rows, y in ((roc, "tpr"), (pro, "pro")):
        assert 50 < len(rows) <= 202
        fpr = [r["fpr"] for r in rows]
        assert fpr[0] == 0.0 and fpr[-1] == pytest.approx(1.0) and fpr == sorted(fpr)
        assert rows[-1][y] == pytest.approx(1.0)


def test_pr_rows_of_a_hand_made_case():
    """Two good (0.1, 0.4) and two anomalous (0.35, 0.8) images: flagging score >= t gives, from the
    highest threshold down, recall 0 (nothing flagged, threshold above the top score), then
    t=0.8: 1 of 1 right, t=0.4: 1 of 2, t=0.35: 2 of 3, t=0.1: 2 of 4."""
    rows = pr_rows([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert [(r["recall"], r["precision"]) for r in rows] == [
        (0.0, 1.0),
        (0.5, 1.0),
        (0.5, 0.5),
        (1.0, pytest.approx(2 / 3)),
        (1.0, 0.5),
    ]
    assert [r["threshold"] for r in rows] == [pytest.approx(1.8), 0.8, 0.4, 0.35, 0.1]
    assert rows[0]["threshold"] > 0.8  # the recall-0 point: above the top score
    assert [r["recall"] for r in rows] == sorted(r["recall"] for r in rows)
    assert all(type(v) is float for r in rows for v in r.values())  # plain floats for the CSV


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_pr_rows_of_one_class_is_a_placeholder_point(labels):
    assert pr_rows(labels, [0.5] * len(labels)) == [{"recall": 0.0, "precision": 0.0, "threshold": 0.0}]


def test_colour_scale_runs_from_validation_median_to_threshold():
    val = np.array([[0.0, 1.0], [2.0, 9.0]])  # skewed: the median (1.5) is not the mean (3.0)
    scale = ColourScale.from_validation(val, threshold=5.0)
    assert (scale.low, scale.high) == (1.5, 5.0)
    assert list(scale.normalise(np.array([0.0, 1.5, 3.25, 9.0]))) == [0.0, 0.0, 0.5, 1.0]
    assert ColourScale.from_validation(val, threshold=1.0).high == 9.0  # threshold below the median: the largest pixel


def test_pngs_are_reproducible(tmp_path):
    from stages.plotting.charts import summary_figure
    from stages.plotting.style import save_png

    rows = {
        "a": {"image_auroc": 0.9, "pixel_auroc": None, "aupro": None},
        "b": {"image_auroc": 0.5, "pixel_auroc": 0.7, "aupro": 0.6},
    }
    digests = []
    for i in range(2):
        titles = {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC", "aupro": "AUPRO"}
        save_png(summary_figure(rows, "carpet", titles), tmp_path / f"{i}.png", panels=(1, 3))
        digests.append(hashlib.md5((tmp_path / f"{i}.png").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    from PIL import Image

    assert Image.open(tmp_path / "0.png").text == {"Comment": "panels=1x3"}


@pytest.mark.parametrize("fpr_limit, label", [(0.3, "AUPRO (FPR ≤ 0.3)"), (0.05, "AUPRO (FPR ≤ 0.05)")])
def test_the_summary_chart_names_the_metrics_as_the_report_and_aupro_by_its_fpr_limit(
    project, monkeypatch, fpr_limit, label
):
    """The summary_figure stage: the report's metric titles on the axis, AUPRO's with evaluate.fpr_limit."""
    import json

    from stages.plotting import style
    from tests.conftest import call_stage, default_params, write_params

    params = default_params()
    params["evaluate"]["fpr_limit"] = fpr_limit
    write_params(project, params)
    summary = {"mean": {"a": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7}}, "categories": ["carpet"]}
    (project / "metrics").mkdir()
    (project / "metrics" / "summary.json").write_text(json.dumps(summary))
    drawn = []
    monkeypatch.setattr(style, "save_png", lambda fig, path, **kwargs: drawn.append(fig))
    call_stage("summary_figure", cwd=project)
    assert [t.get_text() for t in drawn[0].axes[0].get_xticklabels()] == ["Image AUROC", "Pixel AUROC", label]
