import json
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_curve

from stages.core.errors import PipelineError
from stages.evaluation import metrics

# The classic sklearn example: AUROC 0.75.
LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def _reference_aupro(masks, maps, fpr_limit):
    """Slow, independent AUPRO: one threshold per distinct score, regions looped one by one."""
    masks = np.asarray(masks, dtype=bool)
    regions = []
    for mask, amap in zip(masks, maps):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(amap, labeled == k) for k in range(1, n + 1)]
    good_scores = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = np.mean(good_scores >= t)
        pro = np.mean([np.mean(amap[region] >= t) for amap, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (fpr_limit - x0)
            break
    return area / fpr_limit


def _random_case(seed, n=3, size=16, decimals=None):
    rng = np.random.default_rng(seed)
    # Smoothed noise thresholded high gives a few blob-shaped regions of varied sizes.
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 1.5, 1.5))
    masks = noise > np.quantile(noise, 0.85)
    masks[0] = False  # one good image, whose pixels still count towards the FPR
    maps = noise + rng.normal(scale=0.5, size=noise.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)  # many tied scores
    return masks, maps


def test_image_auroc_known_value_and_single_class():
    assert metrics.image_auroc(LABELS, SCORES) == pytest.approx(0.75)
    assert metrics.image_auroc([0, 0], [0.1, 0.2]) is None
    assert metrics.image_auroc([1, 1], [0.1, 0.2]) is None


def test_bad_inputs_raise_pipeline_error():
    with pytest.raises(PipelineError):
        metrics.image_auroc([0, 1], [0.1])
    with pytest.raises(PipelineError):
        metrics.image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(PipelineError):
        metrics.image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(PipelineError):
        metrics.aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))
    with pytest.raises(PipelineError):
        metrics.aupro(np.ones((1, 2, 2)), np.zeros((1, 2, 2)), fpr_limit=0)


def test_roc_points_finite_threshold():
    points = metrics.roc_points(LABELS, SCORES)
    fpr, tpr, thr = roc_curve(LABELS, SCORES, drop_intermediate=True)
    assert [p["fpr"] for p in points] == pytest.approx(fpr)
    assert [p["tpr"] for p in points] == pytest.approx(tpr)
    assert points[0]["threshold"] == pytest.approx(0.8 + 1.0)
    assert [p["threshold"] for p in points[1:]] == pytest.approx(thr[1:])
    assert all(isinstance(v, float) for p in points for v in p.values())
    json.dumps(points, allow_nan=False)
    assert metrics.roc_points([0, 0], [0.1, 0.2]) == []


def test_f1_max_simple():
    # Thresholds (score >= t): 0.8 -> P=1 R=.5 F1=.667; 0.4 -> .5/.5/.5;
    # 0.35 -> P=2/3 R=1 F1=0.8 (best); 0.1 -> P=.5 R=1 F1=.667.
    best = metrics.f1_max(LABELS, SCORES)
    assert best["f1"] == pytest.approx(0.8)
    assert best["threshold"] == pytest.approx(0.35)
    assert best["precision"] == pytest.approx(2 / 3)
    assert best["recall"] == pytest.approx(1.0)
    assert metrics.f1_max([0, 0], [0.1, 0.2])["f1"] is None


def test_mean_std_threshold():
    assert metrics.mean_std_threshold([1, 2, 3]) == pytest.approx(4.0)
    assert metrics.mean_std_threshold([1, 2, 3], n_std=3) == pytest.approx(5.0)
    assert metrics.mean_std_threshold([5.0]) == 5.0
    with pytest.raises(PipelineError):
        metrics.mean_std_threshold([])


def test_threshold_report_counts():
    # score >= 0.35 is anomalous: 0.35 and 0.8 (tp), 0.4 (fp); 0.1 (tn).
    report = metrics.threshold_report(LABELS, SCORES, 0.35)
    assert (report["tp"], report["fp"], report["tn"], report["fn"]) == (2, 1, 1, 0)
    assert report["precision"] == pytest.approx(2 / 3)
    assert report["recall"] == pytest.approx(1.0)
    assert report["f1"] == pytest.approx(0.8)
    assert report["threshold"] == 0.35


def test_threshold_report_uses_the_f1_max_rule():
    """At F1-max's own threshold the report gives F1-max's precision, recall and F1 (score >= t)."""
    best = metrics.f1_max(LABELS, SCORES)
    report = metrics.threshold_report(LABELS, SCORES, best["threshold"])
    assert (report["precision"], report["recall"], report["f1"]) == pytest.approx(
        (best["precision"], best["recall"], best["f1"])
    )


def test_threshold_report_undefined_values_are_none():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = metrics.threshold_report(LABELS, SCORES, 0.9)  # nothing flagged
    assert (report["tp"], report["fp"], report["tn"], report["fn"]) == (0, 0, 2, 2)
    assert report["precision"] is None
    assert report["recall"] == 0.0 and report["f1"] == 0.0
    good_only = metrics.threshold_report([0, 0, 0], [0.1, 0.2, 0.9], 0.5)
    assert good_only["fp"] == 1 and good_only["precision"] == 0.0
    assert good_only["recall"] is None and good_only["f1"] is None


@pytest.mark.parametrize("labels, null", [([0, 0, 0], "image_f1_max"), ([1, 1, 1], "image_auroc")])
def test_one_class_test_set_warns_and_reports_null(capsys, labels, null):
    result = metrics.evaluate(labels, [0.1, 0.2, 0.9], ["x"] * 3, val_scores=[0.1, 0.2, 0.3])
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: the test set has only")
    assert result["image_auroc"] is None and result[null] is None
    if labels[0] == 0:
        assert result["threshold_recall"] is None and result["threshold_f1"] is None
    json.dumps(result, allow_nan=False)


def test_per_defect_auroc():
    labels = [0, 0, 0, 1, 1, 1, 1]
    types = ["good", "good", "good", "crack", "crack", "hole", "hole"]
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.15, 0.25]
    # crack beats every good image -> 1.0; hole: 0.15 beats 1 of 3, 0.25 beats 2 of 3 -> 3/6.
    result = metrics.per_defect_auroc(labels, scores, types)
    assert result == {"crack": pytest.approx(1.0), "hole": pytest.approx(0.5)}
    assert list(result) == ["crack", "hole"]


def test_perfect_and_inverted_maps():
    masks, _ = _random_case(0)
    perfect = masks.astype(float)
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0)
    assert metrics.pixel_auroc(masks, perfect) == pytest.approx(1.0)
    inverted = 1.0 - perfect
    assert metrics.aupro(masks, inverted) == pytest.approx(0.0)
    assert metrics.pixel_auroc(masks, inverted) == pytest.approx(0.0)


def test_no_defects_gives_none():
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert metrics.aupro(masks, maps) is None
    assert metrics.pixel_auroc(masks, maps) is None


def test_aupro_hand_computed():
    masks = np.zeros((3, 4, 4), dtype=bool)
    maps = np.full((3, 4, 4), 0.1)
    # Image 0: region R1 of 2 pixels, scored highest.
    masks[0, 0, 0:2] = True
    maps[0, 0, 0:2] = 0.9
    # Image 1: region R2 of 4 pixels (2x2); its top half scores 0.7 together with
    # 5 defect-free pixels, its bottom half 0.4.
    masks[1, 2:4, 2:4] = True
    maps[1, 2, 2:4] = 0.7
    maps[1, 3, 2:4] = 0.4
    maps[1, 0, :] = 0.7
    maps[1, 1, 0] = 0.7
    # Image 2: good, all 16 pixels at 0.7 (false positives must count here too).
    maps[2] = 0.7
    # Defect-free pixels: 14 + 12 + 16 = 42. Curve (fpr, pro), 2 regions:
    #   start          (0, 0)
    #   t=0.9: R1 full (0, (1 + 0)/2)       = (0, 0.5)
    #   t=0.7: 16+5=21 fp, R2 half           = (21/42, (1 + 0.5)/2) = (0.5, 0.75)
    #   t=0.4: R2 full                       = (0.5, 1.0)
    #   t=0.1: all remaining fp              = (1.0, 1.0)
    # Up to 0.3: PRO at 0.3 interpolates 0.5 + 0.25 * 0.3/0.5 = 0.65;
    #   area = 0.5 * (0.5 + 0.65) * 0.3 = 0.1725 -> AUPRO = 0.1725 / 0.3 = 0.575.
    # Up to 1.0: 0.5 * (0.5 + 0.75) * 0.5 + 0 + 1.0 * 0.5 = 0.8125.
    assert metrics.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.575)
    assert metrics.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.8125)
    # Exactly at a curve point (0.5): 0.5 * (0.5 + 0.75) * 0.5 / 0.5 = 0.625.
    assert metrics.aupro(masks, maps, fpr_limit=0.5) == pytest.approx(0.625)


def test_aupro_uses_8_connectivity():
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region of 2
    masks[0, 4, 4] = True  # a separate region of 1
    maps = np.full((1, 5, 5), 0.5)
    maps[0, 0, 0] = 1.0
    maps[0, 1, 1] = maps[0, 4, 4] = 0.0
    # 8-connected: regions {2 px, 1 px}; t=1.0 gives PRO (1/2 + 0)/2 = 0.25 at FPR 0,
    # flat until FPR 1 -> AUPRO 0.25. 4-connectivity would give 3 regions and 1/3.
    assert metrics.aupro(masks, maps) == pytest.approx(0.25)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed,decimals", [(1, None), (2, None), (3, 1)])
def test_aupro_matches_slow_reference(seed, decimals, fpr_limit):
    masks, maps = _random_case(seed, decimals=decimals)
    expected = _reference_aupro(masks, maps, fpr_limit)
    assert 0.0 < expected < 1.0
    assert metrics.aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_evaluate_keys_and_json():
    """Every key, its type, and values from the parameters given: a non-default n_std sets the
    threshold, a non-default fpr_limit the AUPRO (checked against the slow reference, not the code)."""
    from stages.evaluation.statistics import PixelStats

    masks, maps = _random_case(4)
    labels = [0, 1, 1]
    scores = [float(m.max()) for m in maps]
    types = ["good", "crack", "hole"]
    pixels = PixelStats.from_maps(masks, maps, bins=metrics.DEFAULT_BINS)
    result = metrics.evaluate(labels, scores, types, val_scores=[0.1, 0.2, 0.3], pixels=pixels, fpr_limit=0.1, n_std=3)
    expected_keys = {
        "image_auroc", "image_f1_max", "image_f1_max_threshold", "threshold",
        "threshold_precision", "threshold_recall", "threshold_f1", "tp", "fp", "tn", "fn",
        "per_defect_auroc", "pixel_auroc", "aupro",
    }
    assert set(result) == expected_keys
    assert result["threshold"] == pytest.approx(0.2 + 3 * 0.1)
    assert result["aupro"] == pytest.approx(_reference_aupro(masks, maps, 0.1), abs=1e-9)
    assert result["aupro"] != pytest.approx(_reference_aupro(masks, maps, 0.3), abs=1e-3)  # the limit is used
    from sklearn.metrics import roc_auc_score
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    for key, value in result.items():
        if key == "per_defect_auroc":
            assert set(value) == {"crack", "hole"}
            assert all(type(v) is float for v in value.values())
        elif key in ("tp", "fp", "tn", "fn"):
            assert type(value) is int
        else:
            assert type(value) is float, key
    json.dumps(result, allow_nan=False)

    no_pixels = metrics.evaluate(labels, scores, types, val_scores=[0.1, 0.2, 0.3])
    assert "aupro" not in no_pixels and "pixel_auroc" not in no_pixels
    json.dumps(no_pixels, allow_nan=False)
    with pytest.raises(PipelineError, match="fpr_limit"):
        metrics.evaluate(labels, scores, types, [0.1], fpr_limit=0)


def test_one_validation_image_warns(capsys):
    assert metrics.mean_std_threshold([0.7]) == 0.7
    assert "one validation image: the threshold is its score" in capsys.readouterr().err


def test_report_shows_null_as_dash():
    from stages.report import markdown_table

    table = markdown_table([{"model": "m", "threshold_precision": None, "threshold_recall": 0.5}],
                           ["model", "threshold_precision", "threshold_recall"])
    assert table.splitlines()[-1] == "| m | – | 0.500 |"
