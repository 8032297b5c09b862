"""The report stage: category x model tables per metric with the mean over categories."""
from __future__ import annotations

import csv
import json

import pytest

from stages.errors import PipelineError
from tests.conftest import call_stage, default_params, write_params


def write_metrics(project, category, model, **values):
    path = project / "metrics" / "models" / f"{category}.category" / f"{model}.metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"category": category, "model": model, "method": "m", "backbone": "b", "per_defect_auroc": {"cut": 0.5}}
    path.write_text(json.dumps({**result, **values}))


@pytest.fixture
def project(tmp_path):
    params = default_params()
    params["data"]["categories"] = ["bottle", "grid"]
    params["models"] = {name: params["models"][name] for name in ("knn_effnet", "patchcore_effnet")}
    write_params(tmp_path, params)
    write_metrics(tmp_path, "bottle", "knn_effnet", image_auroc=0.8)
    write_metrics(tmp_path, "grid", "knn_effnet", image_auroc=0.6)
    write_metrics(tmp_path, "bottle", "patchcore_effnet", image_auroc=1.0, pixel_auroc=0.98, aupro=0.9)
    write_metrics(tmp_path, "grid", "patchcore_effnet", image_auroc=0.9, pixel_auroc=0.96, aupro=None)
    return tmp_path


def test_tables_per_metric_with_the_mean_over_categories(project):
    call_stage("report", cwd=project)
    summary = json.loads((project / "metrics/summary.json").read_text())
    assert summary["mean"]["knn_effnet"]["image_auroc"] == pytest.approx(0.7)
    assert summary["mean"]["patchcore_effnet"]["pixel_auroc"] == pytest.approx(0.97)
    # a category without the metric makes the mean null, not a mean of fewer categories
    assert summary["mean"]["patchcore_effnet"]["aupro"] is None
    assert summary["mean"]["knn_effnet"]["pixel_auroc"] is None
    assert summary["categories"]["grid"]["patchcore_effnet"]["image_auroc"] == 0.9

    rows = list(csv.DictReader(open(project / "metrics/categories.csv")))
    image = [r for r in rows if r["metric"] == "image_auroc"]
    assert [(r["category"], float(r["knn_effnet"]), float(r["patchcore_effnet"])) for r in image] == [
        ("bottle", 0.8, 1.0), ("grid", 0.6, 0.9), ("mean", pytest.approx(0.7), pytest.approx(0.95))]
    assert [r["patchcore_effnet"] for r in rows if r["metric"] == "aupro"] == ["0.9", "", ""]

    long = list(csv.DictReader(open(project / "metrics/summary.csv")))
    assert [(r["category"], r["model"]) for r in long] == [
        ("bottle", "knn_effnet"), ("bottle", "patchcore_effnet"), ("grid", "knn_effnet"), ("grid", "patchcore_effnet"),
        ("mean", "knn_effnet"), ("mean", "patchcore_effnet")]

    markdown = (project / "metrics/summary.md").read_text()
    assert markdown.startswith("# 2 models on 2 categories\n")
    image_table = markdown.split("## Image AUROC")[1].split("##")[0]
    assert "| category | knn_effnet | patchcore_effnet |" in image_table
    assert "| grid | 0.600 | 0.900 |" in image_table and "| **mean** | 0.700 | 0.950 |" in image_table


def test_a_missing_category_is_named(project):
    (project / "metrics/models/grid.category/knn_effnet.metrics.json").unlink()
    with pytest.raises(PipelineError, match=r"grid.category/knn_effnet.metrics.json: metrics missing "
                                            r"\(run evaluate@grid-knn_effnet\)"):
        call_stage("report", cwd=project)
