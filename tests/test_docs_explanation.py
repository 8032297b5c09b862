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
    """Each row of performance.md's table against bench/results/compare_export_n<N>.json: ours in torch and in
    onnxruntime, anomalib eager and through its own exports in onnxruntime and OpenVINO."""
    rows = {r["impl"]: r for r in json.loads((REPO / f"bench/results/compare_export_n{n}.json").read_text())}
    torch, onnx = rows["ours, 128-d"], rows["ours, 128-d, onnxruntime"]
    theirs = [r for name, r in rows.items() if name.startswith("anomalib")]
    (eager,) = [r for r in theirs if "export" not in r["impl"]]
    (their_onnx,) = [r for r in theirs if "its onnxruntime export" in r["impl"]]
    (their_openvino,) = [r for r in theirs if "its OpenVINO export" in r["impl"]]
    table = section("docs/explanation/performance.md", "PatchCore against anomalib")
    (row,) = [line for line in table.splitlines() if line.startswith(f"| {n} |")]
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    assert cells[1] == f"{torch['bank'][0]} × {torch['bank'][1]} / {eager['bank'][0]} × {eager['bank'][1]}"
    ms = [r["score_ms_per_image"] for r in (torch, eager, onnx, their_onnx, their_openvino)]
    assert [float(cells[i]) for i in (2, 3, 5, 6, 8)] == ms
    assert cells[4] == f"{ms[0] / ms[1]:.2f}×" and cells[7] == f"{ms[2] / ms[3]:.2f}×"
    assert [float(c) for c in cells[9:11]] == [torch["fit_s"], torch["fit_peak_rss_mib"]]
    assert cells[11] == f"{torch['pixel_auroc']:.4f}" == f"{onnx['pixel_auroc']:.4f}"


def test_anomalibs_exports_score_as_its_eager_model():
    """performance.md's claim, against bench/results/compare_export_n50_greedy.json: with anomalib's own coreset,
    its onnxruntime and OpenVINO exports give its eager model's metrics to the fourth digit."""
    rows = [r for r in json.loads((REPO / "bench/results/compare_export_n50_greedy.json").read_text())
            if r["impl"].startswith("anomalib")]
    assert len(rows) == 3 and all(r["anomalib_bank"] == "greedy" for r in rows)
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert len({f"{r[metric]:.4f}" for r in rows}) == 1, metric
    page = flat(section("docs/explanation/performance.md", "PatchCore against anomalib"))
    eager = next(r for r in rows if "export" not in r["impl"])
    assert f"pixel AUROC {eager['pixel_auroc']:.4f}" in page


def test_the_memory_tables_are_the_recorded_runs():
    """performance.md's one-seed / three-seed rows against bench/results/fit_seeds_memory.jsonl (the 'after' runs)."""
    runs = [json.loads(line) for line in (REPO / "bench/results/fit_seeds_memory.jsonl").read_text().splitlines()
            if line.strip()]
    after = [r for r in runs if r["code"].startswith("after")]
    page = section("docs/explanation/performance.md", "Memory at MVTec AD's sizes")
    table = [line for line in page.splitlines() if line.startswith(("| PaDiM, ", "| PatchCore, "))]
    assert len(table) == len(after) >= 4  # the small runs and the sizes (200 images at 224 px)
    for r in after:
        label = {"padim": f"PaDiM, d = {r['dimensions']}", "patchcore": "PatchCore, 1024-d"}[r["method"]]
        sizes = f"{r['images']} images at {r['image_size']} px"
        (row,) = [line for line in table if line.startswith(f"| {label}, {sizes} ")]
        assert [c.strip() for c in row.strip("|").split("|")[1:]] == [
            f"{r['one_seed']['state_gib']:.3f} GiB", f"{r['one_seed']['peak_rss_gib']:.3f} GiB",
            f"{r['three_seeds']['peak_rss_gib']:.3f} GiB"], row


def test_the_nearest_neighbour_table_is_the_recorded_run():
    """performance.md's before/now table of the strict search, row by row, against bench/results/nn_product.json."""
    rows = json.loads((REPO / "bench/results/nn_product.json").read_text())
    page = (EXPLANATION / "performance.md").read_text()
    table = page[page.index("<!-- nn_product:start -->"):page.index("<!-- nn_product:end -->")]
    expected = [f"| {r['shape']} | {r['queries']} × {r['bank']} × {r['dim']} | {r['mkl_compatible_ms']} | "
                f"{r['openblas_haswell_ms']} | {r['speed_up']}× |" for r in rows]
    assert [line for line in table.splitlines() if line.startswith("| ") and "×" in line][1:] == expected
    assert all(r["speed_up"] > 1 for r in rows)
    speed_ups = sorted(r["speed_up"] for r in rows)
    assert f"{speed_ups[0]:.1f} to {speed_ups[-1]:.1f} times faster" in flat(
        (EXPLANATION / "reproducibility.md").read_text())


def test_the_eager_before_and_after_table_is_the_recorded_runs():
    """performance.md's eager path at 391 images, before and after the OpenBLAS product, against the two runs."""
    page = (EXPLANATION / "performance.md").read_text()
    table = page[page.index("<!-- eager_391:start -->"):page.index("<!-- eager_391:end -->")]
    rows = [line for line in table.splitlines() if line.startswith(("| before", "| now"))]
    for line, run in zip(rows, ("before", "after"), strict=True):
        (record,) = json.loads((REPO / f"bench/results/compare_ours_n391_{run}.json").read_text())
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert cells == [str(record["score_ms_per_image"]), str(record["score_patchcore_only_ms_per_image"]),
                         f"{record['image_auroc']:.4f}", f"{record['pixel_auroc']:.4f}"], line
