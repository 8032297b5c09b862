"""The explanation pages state measurements: each must be the one recorded in bench/results/, so a rerun
of a benchmark that changes a number fails here until the page says the new one."""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO
from tests.docs import section

EXPLANATION = REPO / "docs" / "explanation"
GUARANTEE = ("With `numerics: strict` (the default) on the CPU, the same `params.yaml` gives the same bytes — "
             "features, models, ONNX exports, metrics, tables and figures — on any x86-64 CPU with AVX2, Intel or AMD.")


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_the_reproducibility_page_states_the_guarantee_in_the_shared_words():
    assert GUARANTEE in flat((EXPLANATION / "reproducibility.md").read_text())


def test_the_cross_cpu_claim_is_the_recorded_check():
    record = json.loads((REPO / "bench/results/cross_cpu.json").read_text())
    assert set(record["differ"]) == {"native (AMD EPYC)", "qemu Haswell", "qemu EPYC-Rome"}
    assert not any(record["differ"].values()), record["differ"]
    page = flat(section("docs/explanation/reproducibility.md", "What was checked, and how"))
    assert f"all **{record['files']}** output files identical" in page


@pytest.mark.parametrize("n", [50, 100, 200, 391])
def test_the_anomalib_table_is_the_recorded_run(n):
    """Each row of performance.md's table against bench/results/compare_cut_n<N>.json."""
    rows = {r["impl"]: r for r in json.loads((REPO / f"bench/results/compare_cut_n{n}.json").read_text())}
    torch, onnx = rows["ours, 128-d"], rows["ours, 128-d, onnxruntime"]
    (anomalib,) = [r for name, r in rows.items() if name.startswith("anomalib")]
    table = section("docs/explanation/performance.md", "PatchCore against anomalib")
    (row,) = [line for line in table.splitlines() if line.startswith(f"| {n} |")]
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    assert cells[1] == f"{torch['bank'][0]} × {torch['bank'][1]} / {anomalib['bank'][0]} × {anomalib['bank'][1]}"
    assert [float(c) for c in cells[2:5]] == [torch["score_ms_per_image"], onnx["score_ms_per_image"],
                                              anomalib["score_ms_per_image"]]
    assert cells[5] == f"{torch['score_ms_per_image'] / anomalib['score_ms_per_image']:.2f}×"
    assert cells[6] == f"{onnx['score_ms_per_image'] / anomalib['score_ms_per_image']:.2f}×"
    assert [float(c) for c in cells[7:9]] == [torch["fit_s"], torch["fit_peak_rss_mib"]]
    assert cells[9] == f"{torch['pixel_auroc']:.4f}" == f"{onnx['pixel_auroc']:.4f}"


def test_the_memory_tables_are_the_recorded_runs():
    """performance.md's one-seed / three-seed rows against bench/results/fit_seeds_memory.jsonl (the 'after' runs)."""
    runs = [json.loads(line) for line in (REPO / "bench/results/fit_seeds_memory.jsonl").read_text().splitlines()
            if line.strip()]
    after = {r["method"]: r for r in runs if r["code"].startswith("after")}
    page = section("docs/explanation/performance.md", "Memory at MVTec AD's sizes")
    for method, label in (("padim", "PaDiM"), ("patchcore", "PatchCore")):
        r = after[method]
        (row,) = [line for line in page.splitlines() if line.startswith(f"| {label}, ")]
        assert [c.strip() for c in row.strip("|").split("|")[1:]] == [
            f"{r['one_seed']['state_gib']:.3f} GiB", f"{r['one_seed']['peak_rss_gib']:.3f} GiB",
            f"{r['three_seeds']['peak_rss_gib']:.3f} GiB"], row
