"""The report stage: category x model tables per metric with the mean over categories."""
from __future__ import annotations

import csv
import json
import re

import pytest
import yaml

from stages.core.errors import PipelineError
from tests.conftest import call_stage, default_params, write_params


def write_metrics(project, category, model, **values):
    """A metrics file as evaluate writes it (two seeds: the values +- 0.01), with its bootstrap resamples."""
    import numpy as np

    path = project / "metrics" / "models" / f"{category}.category" / f"{model}.metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    per_seed = {
        str(seed): {k: None if v is None else v + shift for k, v in values.items()} | {"per_defect_auroc": {"cut": 0.5}}
        for seed, shift in ((0, -0.01), (1, 0.01))
    }
    rng = np.random.default_rng(abs(hash((category, model))) % 2**32)
    drawn = {k: v + rng.normal(0, 0.02, 1000) for k, v in values.items() if v is not None}
    result = {
        "category": category,
        "model": model,
        "method": "m",
        "backbone": "b",
        "seeds": [0, 1],
        "per_defect_auroc": {"cut": 0.5},
        **values,
        "seed_std": {k: None if v is None else float(np.std([v - 0.01, v + 0.01], ddof=1)) for k, v in values.items()},
        "interval": {
            "confidence": 0.95,
            "resamples": 1000,
            **{k: [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))] for k, d in drawn.items()},
        },
        "per_seed": per_seed,
    }
    path.write_text(json.dumps(result))
    samples = project / "data" / "evaluations" / f"{category}.category" / f"{model}.resamples.npz"
    samples.parent.mkdir(parents=True, exist_ok=True)
    np.savez(samples, **drawn)


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
    call_stage("compare", cwd=project)
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
        ("bottle", 0.8, 1.0),
        ("grid", 0.6, 0.9),
        ("mean", pytest.approx(0.7), pytest.approx(0.95)),
    ]
    assert [r["patchcore_effnet"] for r in rows if r["metric"] == "aupro"] == ["0.9", "", ""]

    long = list(csv.DictReader(open(project / "metrics/summary.csv")))
    assert [(r["category"], r["model"]) for r in long] == [
        ("bottle", "knn_effnet"),
        ("bottle", "patchcore_effnet"),
        ("grid", "knn_effnet"),
        ("grid", "patchcore_effnet"),
        ("mean", "knn_effnet"),
        ("mean", "patchcore_effnet"),
    ]

    markdown = (project / "metrics/summary.md").read_text()
    assert markdown.startswith("# 2 models on 2 categories\n")
    image_table = markdown.split("## Image AUROC")[1].split("##")[0]
    assert "| category | knn_effnet | patchcore_effnet |" in image_table
    grid = next(line for line in image_table.splitlines() if line.startswith("| grid |"))
    assert re.fullmatch(
        r"\| grid \| 0\.600 \[0\.5\d\d, 0\.6\d\d\] ±0\.014 \| 0\.900 \[0\.8\d\d, 0\.9\d\d\] ±0\.014 \|", grid
    ), grid
    mean = next(line for line in image_table.splitlines() if line.startswith("| **mean** |"))
    assert mean.startswith("| **mean** | 0.700 [") and "±0.014 |" in mean  # the seed std of the per-seed means
    # the mean's interval comes from the paired resampling of stage compare, narrower than a category's
    comparison = json.loads((project / "metrics/comparison.json").read_text())
    knn_mean = next(
        r
        for r in comparison["metrics"]["image_auroc"]["intervals"]
        if (r["category"], r["model"]) == ("mean", "knn_effnet")
    )
    assert summary_low(project, "knn_effnet") == pytest.approx(knn_mean["low"])
    assert knn_mean["high"] - knn_mean["low"] < 0.08  # two categories' +-0.02 noise averaged: about 0.055 wide
    better = next(
        d
        for d in comparison["metrics"]["image_auroc"]["differences"]
        if (d["category"], d["model"], d["versus"]) == ("mean", "patchcore_effnet", "knn_effnet")
    )
    assert better["value"] == pytest.approx(0.25) and better["verdict"] == "better"
    assert "**+0.250 [" in (project / "metrics/comparison.md").read_text()


def summary_low(project, model: str) -> float:
    call_stage("report", cwd=project)
    return json.loads((project / "metrics/summary.json").read_text())["mean"][model]["image_auroc_low"]


def test_a_missing_category_is_named(project):
    call_stage("compare", cwd=project)
    (project / "metrics/models/grid.category/knn_effnet.metrics.json").unlink()
    with pytest.raises(
        PipelineError,
        match=r"grid.category/knn_effnet.metrics.json: metrics missing "
        r"\(run evaluate@grid-knn_effnet\)",
    ):
        call_stage("report", cwd=project)


def test_two_benchmarks_are_grouped_each_with_its_own_mean(project):
    """MVTec AD and VisA categories in one run: each benchmark's rows and its mean (with an interval
    from compare), then the mean over all; the categories chart keeps that order."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(categories=["bottle", "candle", "grid"], source="mvtec", sources={"candle": "visa"})
    write_params(project, params)
    write_metrics(project, "candle", "knn_effnet", image_auroc=0.5)
    write_metrics(project, "candle", "patchcore_effnet", image_auroc=0.7, pixel_auroc=0.9, aupro=0.8)
    call_stage("compare", cwd=project)
    call_stage("report", cwd=project)
    summary = json.loads((project / "metrics/summary.json").read_text())
    groups = summary["groups"]
    assert {label: group["categories"] for label, group in groups.items()} == {
        "mean MVTec AD": ["bottle", "grid"],
        "mean VisA": ["candle"],
    }
    assert groups["mean MVTec AD"]["mean"]["knn_effnet"]["image_auroc"] == pytest.approx(0.7)
    assert groups["mean VisA"]["mean"]["patchcore_effnet"]["image_auroc"] == pytest.approx(0.7)
    assert summary["mean"]["knn_effnet"]["image_auroc"] == pytest.approx((0.8 + 0.6 + 0.5) / 3)
    assert (
        groups["mean MVTec AD"]["mean"]["knn_effnet"]["image_auroc_low"]
        < 0.7
        < groups["mean MVTec AD"]["mean"]["knn_effnet"]["image_auroc_high"]
    )

    rows = list(csv.DictReader(open(project / "metrics/categories.csv")))
    assert [r["category"] for r in rows if r["metric"] == "image_auroc"] == [
        "bottle",
        "grid",
        "mean MVTec AD",
        "candle",
        "mean VisA",
        "mean",
    ]
    long = list(csv.DictReader(open(project / "metrics/summary.csv")))
    order = {r["category"]: int(r["table_row"]) for r in long}
    assert sorted(order, key=order.get) == ["bottle", "grid", "mean MVTec AD", "candle", "mean VisA", "mean"]
    image_table = (project / "metrics/summary.md").read_text().split("## Image AUROC")[1].split("##")[0]
    labels = [line.split("|")[1].strip() for line in image_table.splitlines() if line.startswith("| ")][1:]
    assert labels == ["bottle", "grid", "**mean MVTec AD**", "candle", "**mean VisA**", "**mean**"]
    comparison = (project / "metrics/comparison.md").read_text()
    assert (
        "## Image AUROC, mean VisA (candle)" in comparison
        and "## Image AUROC, mean MVTec AD (bottle, grid)" in comparison
    )


def test_one_benchmark_has_one_mean_row(project):
    call_stage("compare", cwd=project)
    call_stage("report", cwd=project)
    assert "groups" not in json.loads((project / "metrics/summary.json").read_text())
    assert "MVTec AD" not in (project / "metrics/comparison.md").read_text()
