"""Difficulty levels from the generator to the prepared split to the metrics: levels.csv is read strictly,
per-level metrics equal the metrics of each level's subset, the resamples keep each level's count, and
the detection limit is read off the AUROC curve as documented (stages/evaluation/levels.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stages.core.errors import PipelineError
from stages.data.levels import LEVELS_FILE, LevelRow, read_levels, write_levels
from stages.data.prepared import load_split
from stages.evaluation import levels as level_metrics
from stages.evaluation.bootstrap import stratified_weights
from stages.evaluation.metrics import aupro, pixel_auroc
from stages.evaluation.statistics import PixelStats
from tests.conftest import call_stage, default_params, write_params

NAMES = ["test/good/000.png", "test/cut/000.png", "test/cut/001.png", "test/hole/000.png"]
LABELS = [0, 1, 1, 1]
HEADER = "image,level,delta_e,area,width,delta_e_measured\n"
GOOD_ROWS = "test/cut/000.png,1,16,256,2,16.01\ntest/cut/001.png,2,8,256,2,\ntest/hole/000.png,2,8,256,2,7.99\n"


def _read(tmp_path, text: str):
    (tmp_path / LEVELS_FILE).write_text(text)
    return read_levels(tmp_path, NAMES, LABELS)


def test_levels_file_round_trip(tmp_path):
    write_levels(tmp_path, [LevelRow("test/cut/000.png", 1, 16.0, 256, 2.0, 16.01),
                            LevelRow("test/cut/001.png", 2, 8.0, 256, 2.0, None),
                            LevelRow("test/hole/000.png", 2, 8.0, 256, 2.0, 7.99)])
    assert (tmp_path / LEVELS_FILE).read_text() == HEADER + GOOD_ROWS.replace(",16.01", ",16.0100").replace(
        ",7.99", ",7.9900")
    levels, ladder = read_levels(tmp_path, NAMES, LABELS)
    assert levels.tolist() == [0, 1, 2, 2]
    assert ladder.tolist() == [[16.0, 256.0, 2.0], [8.0, 256.0, 2.0]]
    assert read_levels(tmp_path / "elsewhere", NAMES, LABELS) is None  # no file: no levels


@pytest.mark.parametrize(
    "text, message",
    [
        ("image,level\n" + GOOD_ROWS, "the first line must be image,level,delta_e"),
        (HEADER + GOOD_ROWS + "test/good/000.png,1,16,256,2,\n", "is a good image"),
        (HEADER + GOOD_ROWS + "test/cut/009.png,1,16,256,2,\n", "is not a test image of this category"),
        (HEADER + GOOD_ROWS + "test/cut/000.png,1,16,256,2,\n", "listed twice"),
        (HEADER + GOOD_ROWS.replace("test/hole/000.png,2,8", "test/hole/000.png,2,9"), "level 2 defined as"),
        (HEADER + GOOD_ROWS.replace(",2,8,256", ",x,8,256", 1), "level must be an integer"),
        (HEADER + GOOD_ROWS.replace(",16,256", ",nan,256"), "delta_e must be positive"),
        (HEADER + GOOD_ROWS.replace(",256,2,7.99", ",256,2,-1"), "delta_e_measured must be positive"),
        (HEADER + GOOD_ROWS.replace("test/cut/000.png,1", "test/cut/000.png,3"), "numbered 1, 2, ... without gaps"),
        (HEADER + GOOD_ROWS.splitlines(keepends=True)[0], "no level for 2 defective test image(s)"),
        (HEADER + "test/cut/000.png,1,16\n", "expected 6 columns"),
        (HEADER + GOOD_ROWS.replace("test/cut/000.png,1", "test/cut/000.png,5000"), "at most 1000"),
        (b"\xff\xfe" + b"x" * 10, "unreadable"),
    ],
)
def test_bad_levels_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / LEVELS_FILE
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PipelineError) as info:
        read_levels(tmp_path, NAMES, LABELS)
    assert str(info.value).startswith(str(path)) and message in str(info.value) and "\n" not in str(info.value)


def test_oversized_levels_file_is_refused_before_reading(tmp_path):
    from stages.data import levels

    path = tmp_path / LEVELS_FILE
    with path.open("wb") as fh:
        fh.truncate(levels.MAX_BYTES + 1)  # sparse: no disk used
    with pytest.raises(PipelineError, match="larger than"):
        read_levels(tmp_path, NAMES, LABELS)


def test_preprocess_carries_the_levels_into_the_test_split(tmp_path):
    params = default_params()
    params["data"]["synthetic"].update(image_size=64, n_train=6, n_test_good=2, n_test_per_cell=1,
                                       defect_types=["cut", "hole"],
                                       levels=[{"delta_e": 16, "area": 768, "width": 4},  # 48 px at 64 px
                                               {"delta_e": 2, "area": 768, "width": 4}])
    params["preprocess"].update(resize=64, crop_size=56, val_fraction=0.34)
    write_params(tmp_path, params)
    call_stage("download", "carpet", cwd=tmp_path)
    call_stage("preprocess", "carpet", cwd=tmp_path)
    test = load_split(tmp_path / "data/features/carpet.category/pixels.features/test.npz")
    by_name = dict(zip(test.names, test.levels.tolist()))
    assert by_name == {"test/cut/000.png": 1, "test/cut/001.png": 2, "test/good/000.png": 0,
                       "test/good/001.png": 0, "test/hole/000.png": 1, "test/hole/001.png": 2}
    assert test.ladder.tolist() == [[16.0, 48.0, 1.0], [2.0, 48.0, 1.0]]
    # the centre crop keeps each defect whole: the prepared mask holds the level's area
    assert test.masks.sum(axis=(1, 2)).tolist() == [48 if level else 0 for level in test.levels]
    for split in ("train", "val"):
        assert load_split(tmp_path / f"data/features/carpet.category/pixels.features/{split}.npz").levels is None


# --------------------------------------------------------------------------- per-level metrics


def _scored(seed=0, good=20, per_level=10, shifts=(3.0, 1.0, 0.0)):
    """Scores and maps of a test set: defects of level k shifted by shifts[k - 1] (0: like good images)."""
    rng = np.random.default_rng(seed)
    levels = np.array([0] * good + [k for k in range(1, len(shifts) + 1) for _ in range(per_level)])
    labels = (levels > 0).astype(int)
    shift = np.array([0.0, *shifts])[levels]
    scores = rng.normal(size=len(levels)) + shift
    masks = np.zeros((len(levels), 16, 16), bool)
    masks[labels == 1, 4:8, 4:8] = True
    maps = rng.normal(size=masks.shape) + masks * shift[:, None, None]
    ladder = np.array([[16.0 / 2**k, 256.0, 2.0] for k in range(len(shifts))])
    return labels, scores, levels, ladder, masks, maps


def test_per_level_metrics_are_those_of_each_levels_subset():
    labels, scores, levels, ladder, masks, maps = _scored()
    pixels = PixelStats.from_maps(masks, maps, 4096)
    result = level_metrics.per_level(labels, scores, levels, ladder, pixels, 0.3)
    for k in range(1, 4):
        rows = (labels == 0) | (levels == k)
        assert result["image_auroc"][0, k - 1] == pytest.approx(roc_auc_score(labels[rows], scores[rows]))
        assert result["pixel_auroc"][0, k - 1] == pytest.approx(pixel_auroc(masks[rows], maps[rows], 4096), abs=1e-3)
        assert result["aupro"][0, k - 1] == pytest.approx(aupro(masks[rows], maps[rows], 0.3, 4096), abs=2e-3)
    image = result["image_auroc"][0]
    assert image[0] > 0.95 and image[0] > image[1] and image[0] > image[2]  # the easy level separates best
    without_maps = level_metrics.per_level(labels, scores, levels, ladder, None, 0.3)
    assert without_maps["pixel_auroc"] is None and without_maps["aupro"] is None
    assert all(v is None for v in level_metrics.per_level(labels[20:], scores[20:], levels[20:], ladder, None,
                                                          0.3).values())  # no good images: undefined


def test_resamples_keep_every_levels_count():
    labels, _, levels, *_ = _scored()
    weights = stratified_weights(labels, 200, 0, "carpet", strata=levels)
    for k in range(4):
        assert (weights[:, levels == k].sum(axis=1) == (levels == k).sum()).all()
    # without strata: good and defective apart, as always (the per-level counts then vary)
    plain = stratified_weights(labels, 200, 0, "carpet")
    assert np.array_equal(plain, stratified_weights(labels, 200, 0, "carpet", strata=labels))
    assert (plain[:, labels == 1].sum(axis=1) == 30).all() and plain[:, levels == 1].sum(axis=1).std() > 0


@pytest.mark.parametrize(
    "curve, threshold, position",
    [
        ([1.0, 0.95, 0.85, 0.6], 0.9, 2.5),  # between L2 (0.95) and L3 (0.85)
        ([1.0, 0.95, 0.85, 0.6], 0.75, 3.4),  # 0.85 -> 0.6: 0.1 of 0.25 past L3
        ([0.8, 0.7, 0.6, 0.5], 0.9, 0.0),  # below at the easiest level
        ([1.0, 1.0, 0.99, 0.95], 0.9, 5.0),  # never below: L + 1
        ([1.0, 0.8, 0.95, 0.5], 0.9, 1.5),  # the first crossing counts
        ([1.0, 0.9, 0.85, 0.5], 0.9, 2.0),  # exactly at the threshold is not below it: L2
    ],
)
def test_detection_limit_position(curve, threshold, position):
    assert level_metrics.limit_position(np.array(curve), threshold) == pytest.approx(position)


def test_limit_positions_map_to_the_ladders_physical_values():
    ladder = np.array([[16.0, 256.0, 2.0], [8.0, 256.0, 2.0], [4.0, 128.0, 1.0]])
    assert level_metrics.physical(ladder, 1.0) == {"delta_e": 16.0, "area": 256.0, "width": 2.0}
    assert level_metrics.physical(ladder, 1.5)["delta_e"] == pytest.approx(16 / np.sqrt(2))  # geometric
    assert level_metrics.physical(ladder, 2.5) == pytest.approx({"delta_e": 4 * np.sqrt(2), "area": 128 * np.sqrt(2),
                                                                 "width": np.sqrt(2)})
    assert level_metrics.physical(ladder, 3.0) == {"delta_e": 4.0, "area": 128.0, "width": 1.0}
    assert level_metrics.physical(ladder, 0.0) == {"delta_e": None, "area": None, "width": None}
    assert level_metrics.physical(ladder, 4.0) == {"delta_e": None, "area": None, "width": None}


def test_summary_over_seeds_with_intervals_and_limits():
    labels, scores, levels, ladder, masks, maps = _scored(shifts=(4.0, 1.5, 0.5, 0.0))
    weights = stratified_weights(labels, 500, 0, "carpet", strata=levels)
    per_seed, resampled = {}, []
    for seed in (0, 1):
        noisy = scores + np.random.default_rng(seed).normal(0, 0.05, len(scores))
        pixels = PixelStats.from_maps(masks, maps, 1024)
        per_seed[seed] = level_metrics.per_level(labels, noisy, levels, ladder, pixels, 0.3)
        resampled.append(level_metrics.per_level(labels, noisy, levels, ladder, pixels, 0.3, weights=weights))
    summary = level_metrics.summarise(per_seed, resampled, ladder, levels, 0.95)
    json.dumps(summary)  # the metrics file holds it
    assert list(summary["ladder"]) == ["L1", "L2", "L3", "L4"]
    assert summary["ladder"]["L2"] == {"delta_e": 8.0, "area": 256.0, "width": 2.0, "defects": 10}
    for k, name in enumerate(summary["ladder"]):
        mean = np.mean([per_seed[s]["image_auroc"][0, k] for s in (0, 1)])
        assert summary["image_auroc"][name] == pytest.approx(mean)
        low, high = summary["interval"]["image_auroc"][name]
        assert low <= mean <= high
        assert summary["per_seed"]["1"]["image_auroc"][name] == pytest.approx(per_seed[1]["image_auroc"][0, k])
    assert summary["image_auroc"]["L1"] > 0.98 and summary["image_auroc"]["L4"] < 0.75
    limit = summary["detection_limit"]["auroc_0.9"]
    curve = np.array(list(summary["image_auroc"].values()))
    assert limit["level"] == pytest.approx(level_metrics.limit_position(curve, 0.9))
    assert 1 <= limit["low"] <= limit["level"] <= limit["high"] <= 5
    assert limit["delta_e"] == pytest.approx(level_metrics.physical(ladder, limit["level"])["delta_e"])
    assert set(summary["detection_limit"]) == {"auroc_0.9", "auroc_0.75"}


# --------------------------------------------------------------------------- the report


def _with_levels(project, category, model, shifts):
    """Add the `levels` block evaluate writes (from these per-level score shifts) to a metrics file."""
    labels, scores, levels, ladder, masks, maps = _scored(shifts=shifts)
    weights = stratified_weights(labels, 200, 0, category, strata=levels)
    pixels = PixelStats.from_maps(masks, maps, 1024)
    block = level_metrics.summarise({0: level_metrics.per_level(labels, scores, levels, ladder, pixels, 0.3)},
                                    [level_metrics.per_level(labels, scores, levels, ladder, pixels, 0.3, weights)],
                                    ladder, levels, 0.95)
    path = project / "metrics" / "models" / f"{category}.category" / f"{model}.metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "levels": block}))
    return block


def test_report_tables_and_plot_data_per_level(tmp_path):
    import csv

    from tests.test_report import write_metrics

    params = default_params()
    params["data"]["categories"] = ["carpet", "grid"]  # the grid (a real category) has no levels
    params["models"] = {name: params["models"][name] for name in ("knn_effnet", "patchcore_effnet")}
    write_params(tmp_path, params)
    for category in ("carpet", "grid"):
        write_metrics(tmp_path, category, "knn_effnet", image_auroc=0.8)
        write_metrics(tmp_path, category, "patchcore_effnet", image_auroc=0.9, pixel_auroc=0.95, aupro=0.8)
    strong = _with_levels(tmp_path, "carpet", "patchcore_effnet", (6.0, 3.0, 1.5, 0.0))
    weak = _with_levels(tmp_path, "carpet", "knn_effnet", (2.0, 1.0, 0.5, 0.0))
    call_stage("compare", cwd=tmp_path)
    call_stage("report", cwd=tmp_path)

    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert set(summary["levels"]) == {"carpet"}
    assert summary["levels"]["carpet"]["patchcore_effnet"] == strong
    text = (tmp_path / "metrics/summary.md").read_text()
    assert "## Image AUROC per difficulty level: carpet" in text and "per difficulty level: grid" not in text
    table = text.split("## Image AUROC per difficulty level: carpet")[1]
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert header == ("| model | L1 · ΔE 16 | L2 · ΔE 8 | L3 · ΔE 4 | L4 · ΔE 2 | limit at 0.9 | limit at 0.75 |")
    row = next(line for line in table.splitlines() if line.startswith("| knn_effnet"))
    low, high = weak["interval"]["image_auroc"]["L2"]
    assert f"{weak['image_auroc']['L2']:.3f} [{low:.3f}, {high:.3f}]" in row
    limit = weak["detection_limit"]["auroc_0.9"]
    assert f"L{limit['level']:.1f}" in row and f"ΔE {limit['delta_e']:.1f}" in row

    rows = list(csv.DictReader((tmp_path / "plots/levels.csv").open()))
    assert [(r["category"], r["model"], r["level"]) for r in rows] == [
        ("carpet", model, str(k)) for model in ("knn_effnet", "patchcore_effnet") for k in range(1, 5)
    ]
    first = rows[4]
    assert first["label"] == "L1 · ΔE 16" and float(first["image_auroc"]) == strong["image_auroc"]["L1"]
    assert float(first["image_auroc_low"]) == strong["interval"]["image_auroc"]["L1"][0]
    assert float(first["aupro_high"]) == strong["interval"]["aupro"]["L1"][1]

    # without any ladder: no section, the plot's file holds its header only
    params["data"]["categories"] = ["grid"]
    write_params(tmp_path, params)
    call_stage("compare", cwd=tmp_path)
    call_stage("report", cwd=tmp_path)
    assert "per difficulty level" not in (tmp_path / "metrics/summary.md").read_text()
    assert (tmp_path / "plots/levels.csv").read_text().splitlines()[0].startswith("category,model,level,label")
    assert len((tmp_path / "plots/levels.csv").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b["image_auroc"].update(L1="0.9"), "levels: image_auroc is not a number per level"),
        (lambda b: b["interval"]["pixel_auroc"].pop("L2"), "levels: interval's pixel_auroc is not [low, high]"),
        (lambda b: b["ladder"]["L1"].pop("delta_e"), "levels: ladder is not a mapping of levels"),
        (lambda b: b["detection_limit"]["auroc_0.9"].update(level=None), "levels: detection_limit 'auroc_0.9'"),
    ],
)
def test_report_refuses_a_damaged_levels_block_naming_the_file(tmp_path, damage, message):
    from tests.test_report import write_metrics

    params = default_params()
    params["data"]["categories"] = ["carpet"]
    params["models"] = {name: params["models"][name] for name in ("knn_effnet", "patchcore_effnet")}
    write_params(tmp_path, params)
    write_metrics(tmp_path, "carpet", "knn_effnet", image_auroc=0.8)
    write_metrics(tmp_path, "carpet", "patchcore_effnet", image_auroc=0.9, pixel_auroc=0.95, aupro=0.8)
    _with_levels(tmp_path, "carpet", "knn_effnet", (2.0, 1.0, 0.5, 0.0))
    block = _with_levels(tmp_path, "carpet", "patchcore_effnet", (6.0, 3.0, 1.5, 0.0))
    call_stage("compare", cwd=tmp_path)
    damage(block)
    path = tmp_path / "metrics/models/carpet.category/patchcore_effnet.metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "levels": block}))
    with pytest.raises(PipelineError) as info:
        call_stage("report", cwd=tmp_path)
    assert str(info.value).startswith("metrics/models/carpet.category/patchcore_effnet.metrics.json: not a metrics")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "metrics/summary.md").exists()
