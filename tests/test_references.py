"""Published results beside ours: the committed tables (references/*.csv) and the report's columns for a
model that declares `reference: <table>`."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from stages.core.errors import PipelineError
from stages.core.params import load_params
from stages.data import mvtec
from stages.evaluation import references
from tests.conftest import REPO, call_stage, default_params, error_line, run_stage, write_params
from tests.test_report import write_metrics

PATCHCORE = "patchcore_wrn50"  # the authors' results file, IM224_WR50_L2-3_P01_D1024-1024 (our paper config)


def project_with(tmp_path, categories, source="mvtec", reference=PATCHCORE):
    params = default_params()
    params["data"].update(categories=list(categories), source=source)
    params["models"] = {name: params["models"][name] for name in ("knn_effnet", "patchcore_effnet")}
    params["models"]["patchcore_effnet"]["reference"] = reference
    shutil.copytree(REPO / "references", tmp_path / "references")
    write_params(tmp_path, params)
    return tmp_path


def report(project) -> dict:
    call_stage("compare", cwd=project)
    call_stage("report", cwd=project)
    return json.loads((project / "metrics/summary.json").read_text())


def test_published_values_beside_our_intervals(tmp_path):
    project = project_with(tmp_path, ["bottle", "grid"])
    for name in ("knn_effnet", "patchcore_effnet"):
        # intervals about +-0.04 wide: bottle's published 1.000 and 0.985 lie inside, grid's 0.979 above 0.9's
        write_metrics(project, "bottle", name, image_auroc=1.0, pixel_auroc=0.98, aupro=0.9)
        write_metrics(project, "grid", name, image_auroc=0.9, pixel_auroc=0.96, aupro=0.9)
    summary = report(project)
    assert summary["references"] == {"patchcore_effnet": {
        "table": PATCHCORE, "file": f"references/{PATCHCORE}.csv",
        "image_auroc": {"published": 2, "inside": 1},
        "pixel_auroc": {"published": 2, "inside": 2},
        "aupro": {"published": 0, "inside": 0},  # the authors' file has no PRO of our definition
    }}
    grid = summary["categories"]["grid"]["patchcore_effnet"]
    assert grid["image_auroc_published"] == pytest.approx(0.9791144527986633)
    assert grid["image_auroc_published_inside"] is False and grid["pixel_auroc_published_inside"] is True
    assert grid["aupro_published"] is None
    assert "image_auroc_published" not in summary["categories"]["grid"]["knn_effnet"]  # no reference declared
    # two of 15 categories: no published mean to compare the mean row with
    assert summary["mean"]["patchcore_effnet"]["image_auroc_published"] is None

    text = (project / "metrics/summary.md").read_text()
    image = text.split("## Image AUROC")[1].split("##")[0]
    assert "| category | knn_effnet | patchcore_effnet | patchcore_effnet published |" in image
    assert [line.split(" | ")[-1] for line in image.splitlines() if line.startswith(("| bottle", "| grid"))] == [
        "1.000 ✓ |", "0.979 ✗ |"]
    assert (f"Published values inside our 95% interval (✓ inside, ✗ outside, empty: none published), categories: "
            f"patchcore_effnet (references/{PATCHCORE}.csv) 1 of 2.") in image
    rows = list(csv.DictReader(open(project / "metrics/summary.csv")))
    assert {r["model"]: r["image_auroc_published_inside"] for r in rows if r["category"] == "grid"} == {
        "knn_effnet": "", "patchcore_effnet": "False"}


def test_only_the_same_dataset_is_compared(tmp_path):
    """A synthetic 'bottle' is not MVTec AD's bottle: no published value beside it."""
    project = project_with(tmp_path, ["bottle"], source="synthetic")
    for name in ("knn_effnet", "patchcore_effnet"):
        write_metrics(project, "bottle", name, image_auroc=1.0, pixel_auroc=0.98, aupro=0.9)
    summary = report(project)
    assert summary["references"]["patchcore_effnet"]["image_auroc"] == {"published": 0, "inside": 0}
    assert summary["categories"]["bottle"]["patchcore_effnet"]["image_auroc_published"] is None


def test_a_published_mean_is_compared_with_the_mean_over_every_category(tmp_path):
    """PaDiM's paper gives only means over MVTec AD's 15 categories: set beside our mean row, when the
    run has all 15, and never beside a category."""
    project = project_with(tmp_path, mvtec.CATEGORIES, reference="padim_wrn50")
    for i, category in enumerate(mvtec.CATEGORIES):
        for name in ("knn_effnet", "patchcore_effnet"):
            write_metrics(project, category, name, image_auroc=0.95 + (i % 3) * 0.01, pixel_auroc=0.975,
                          aupro=0.92)
    summary = report(project)
    mean = summary["mean"]["patchcore_effnet"]
    assert mean["pixel_auroc_published"] == 0.975 and mean["pixel_auroc_published_inside"] is True
    assert mean["image_auroc_published"] == 0.953 and mean["aupro_published"] == 0.921
    assert summary["references"]["patchcore_effnet"]["pixel_auroc"] == {"published": 0, "inside": 0}
    text = (project / "metrics/summary.md").read_text().split("## Pixel AUROC")[1].split("##")[0]
    assert [line.split(" | ")[-1] for line in text.splitlines() if line.startswith("| **mean**")] == ["0.975 ✓ |"]


def test_a_reference_naming_no_table_is_one_line(tmp_path):
    project = project_with(tmp_path, ["bottle"], reference="patchcore_paper_typo")
    for name in ("knn_effnet", "patchcore_effnet"):
        write_metrics(project, "bottle", name, image_auroc=1.0)
    line = error_line(run_stage("report", cwd=project))
    assert line == ("error: models.patchcore_effnet.reference: no table references/patchcore_paper_typo.csv "
                    "(known: padim_wrn50, patchcore_wrn50)")
    assert not (project / "metrics/summary.json").exists() and not (project / "metrics/summary.md").exists()
    # every stage reads params.yaml: the typo stops the run before anything is computed, not at the end
    assert error_line(run_stage("download", "bottle", cwd=project)) == line


@pytest.mark.parametrize("row, message", [
    ("mvtec,bottle,99.2,,,paper", "line 2: image_auroc: 99.2 is not a fraction in [0, 1] (write 0.992, not 99.2)"),
    ("mvtec,bottle,0.99,,,", "line 2: no source (every published value names where it comes from)"),
    ("mvtec,bottle,high,,,paper", "line 2: image_auroc: 'high' is not a number"),
])
def test_a_malformed_table_is_one_line(tmp_path, row, message):
    project = project_with(tmp_path, ["bottle"], reference="mine")
    (project / "references/mine.csv").write_text("dataset,category,image_auroc,pixel_auroc,aupro,source\n" + row + "\n")
    for name in ("knn_effnet", "patchcore_effnet"):
        write_metrics(project, "bottle", name, image_auroc=1.0)
    call_stage("compare", cwd=project)
    assert error_line(run_stage("report", cwd=project)) == f"error: references/mine.csv {message}"
    assert not (project / "metrics/summary.json").exists()


def test_dataset_categories_are_the_sources_own():
    from stages.data import visa

    assert references.DATASET_CATEGORIES == {"mvtec": mvtec.CATEGORIES, "visa": visa.CATEGORIES}


def test_reference_must_be_a_name(tmp_path):
    project = project_with(tmp_path, ["bottle"], reference="../params")
    with pytest.raises(PipelineError, match=r"models\.patchcore_effnet\.reference: expected the name of a table"):
        load_params(project / "params.yaml")


def test_committed_tables(monkeypatch):
    """Every row names its source; the PatchCore table is the authors' file: its 15 MVTec AD categories,
    and its mean row the mean of them (a mistyped value would show here)."""
    monkeypatch.chdir(REPO)
    for path in sorted((REPO / "references").glob("*.csv")):
        table = references.read_table(path.stem)  # every row checked: a source, fractions
        assert table, path
    patchcore = references.read_table(PATCHCORE)
    assert {c for d, c in patchcore if d == "mvtec"} == {*mvtec.CATEGORIES, references.MEAN}
    for metric in ("image_auroc", "pixel_auroc"):
        values = [patchcore["mvtec", c][metric] for c in mvtec.CATEGORIES]
        assert np.mean(values) == pytest.approx(patchcore["mvtec", references.MEAN][metric], abs=1e-12), metric
    assert patchcore["mvtec", "carpet"] == {"image_auroc": 0.9859550561797752, "pixel_auroc": 0.9905141888926996,
                                            "aupro": None}
    assert references.read_table("padim_wrn50") == {
        ("mvtec", "mean"): {"image_auroc": 0.953, "pixel_auroc": 0.975, "aupro": 0.921}}
