"""Sufficient statistics and the bootstrap: binned metrics equal the exact ones, intervals cover, resamples pair."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from stages.evaluation import metrics
from stages.evaluation.bootstrap import interval, stratified_weights
from stages.evaluation.paired import MEAN, differences, with_means
from stages.evaluation.statistics import ImageStats, PixelStats
from tests.test_metrics import _random_case, _reference_aupro


def exact_aupro(masks, maps, fpr_limit):
    """AUPRO at every distinct threshold, sort-based (MVTec's generic_util.compute_pro): the exact value the
    binned one approximates, fast enough for maps of 10^5 distinct scores (the slow reference is not)."""
    from scipy import ndimage

    from stages.evaluation.statistics import area_up_to

    regions = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3), int))
        regions[i] = np.where(labelled > 0, labelled + count, 0)
        count += n
    good = regions == 0
    sizes = np.bincount(regions.ravel(), minlength=count + 1).astype(np.float64)
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    fprs = np.cumsum(good.ravel()[order]) / good.sum()
    pros = np.cumsum(np.where(good, 0.0, 1.0 / sizes[regions]).ravel()[order]) / count
    keep = np.append(np.diff(maps.ravel()[order]) != 0, True)  # equal scores switch together
    fpr = np.concatenate(([0.0], np.minimum(fprs[keep], 1.0)))
    pro = np.concatenate(([0.0], np.minimum(pros[keep], 1.0)))
    return area_up_to(fpr, pro, fpr_limit) / fpr_limit


@pytest.mark.parametrize("seed", [1, 2])
def test_the_exact_reference_is_the_slow_one(seed):
    masks, maps = _random_case(seed)
    assert exact_aupro(masks, maps, 0.3) == pytest.approx(_reference_aupro(masks, maps, 0.3), abs=1e-12)


def realistic_maps(seed: int, n: int = 24, size: int = 64):
    """Smooth anomaly maps of many distinct values, with blob-shaped defects scored higher in most images."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 3, 3))
    masks = noise > np.quantile(noise, 0.93)
    masks[: n // 3] = False  # good images
    maps = np.abs(ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 2, 2)))
    maps = maps + 0.4 * masks * rng.random((n, 1, 1)) + rng.exponential(0.05, masks.shape)
    return masks, maps


@pytest.mark.parametrize("seed", [0, 1])
def test_binned_pixel_auroc_and_aupro_equal_the_exact_values(seed):
    masks, maps = realistic_maps(seed)
    assert len(np.unique(maps)) > 50_000  # far more distinct scores than bins
    stats = PixelStats.from_maps(masks, maps, bins=8192)
    assert stats.auroc()[0] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-4)
    for fpr_limit in (0.05, 0.3):
        assert stats.aupro(fpr_limit)[0] == pytest.approx(exact_aupro(masks, maps, fpr_limit), abs=1e-4)
    coarse = PixelStats.from_maps(masks, maps, bins=16)  # the bins matter: too few, and the estimate drifts
    assert abs(coarse.aupro(0.3)[0] - exact_aupro(masks, maps, 0.3)) > 1e-4


def test_with_few_distinct_scores_the_binned_metrics_are_exact():
    masks, maps = _random_case(3, decimals=1)
    stats = PixelStats.from_maps(masks, maps, bins=8192)
    assert stats.auroc()[0] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert stats.aupro(0.3)[0] == pytest.approx(_reference_aupro(masks, maps, 0.3), abs=1e-12)


def test_weights_are_multiplicities():
    """A resample that draws an image twice scores as the test set with that image copied."""
    masks, maps = _random_case(5, n=4)
    labels = np.array([0, 1, 1, 0])
    scores = maps.reshape(4, -1).max(axis=1)
    weights = np.array([[2, 1, 0, 1]])
    copied = [0, 0, 1, 3]
    stats = PixelStats.from_maps(masks, maps, bins=8192)
    assert stats.auroc(weights)[0] == pytest.approx(
        roc_auc_score(masks[copied].ravel(), maps[copied].ravel()), abs=1e-12
    )
    assert stats.aupro(0.3, weights)[0] == pytest.approx(_reference_aupro(masks[copied], maps[copied], 0.3), abs=1e-12)
    images = ImageStats.from_scores(labels, scores)
    assert images.auroc(weights)[0] == pytest.approx(roc_auc_score(labels[copied], scores[copied]))
    assert images.f1_max(weights)[0] == pytest.approx(metrics.f1_max(labels[copied], scores[copied])["f1"])


def test_stratified_resamples_keep_the_counts_and_depend_on_category_and_seed():
    labels = np.array([0] * 7 + [1] * 13)
    weights = stratified_weights(labels, 500, seed=0, category="carpet")
    assert weights.shape == (500, 20)
    assert (weights[:, labels == 0].sum(axis=1) == 7).all() and (weights[:, labels == 1].sum(axis=1) == 13).all()
    assert (weights >= 0).all() and (weights == np.round(weights)).all()
    assert np.array_equal(weights, stratified_weights(labels, 500, seed=0, category="carpet"))
    assert not np.array_equal(weights, stratified_weights(labels, 500, seed=1, category="carpet"))
    assert not np.array_equal(weights, stratified_weights(labels, 500, seed=0, category="tile"))


def test_the_interval_covers_the_population_auroc_95_percent_of_the_time():
    """Binormal scores with a known population AUROC: Phi(delta / sqrt(2)). 200 simulated test sets of
    the default run's make-up (20 good, 40 defective), 1000 stratified resamples each."""
    delta = 1.2
    population = scipy_stats.norm.cdf(delta / np.sqrt(2))
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 40)
    covered = 0
    for trial in range(200):
        scores = np.where(labels == 1, rng.normal(delta, 1, labels.size), rng.normal(0, 1, labels.size))
        weights = stratified_weights(labels, 1000, seed=trial, category="simulated")
        low, high = interval(ImageStats.from_scores(labels, scores).auroc(weights), 0.95)
        covered += low <= population <= high
    assert 0.91 <= covered / 200 <= 0.99, covered


def test_a_model_against_itself_differs_by_exactly_zero():
    rng = np.random.default_rng(1)
    points = {("carpet", "a"): 0.91, ("carpet", "b"): 0.80, ("tile", "a"): 0.95, ("tile", "b"): 0.93}
    samples = {k: v + rng.normal(0, 0.02, 300) for k, v in points.items()}
    points, samples = with_means(points, samples, {MEAN: ["carpet", "tile"]}, ["a", "b"])
    assert points[MEAN, "a"] == pytest.approx(0.93)
    rows = differences(points, samples, ["carpet", "tile", MEAN], ["a", "b"], 0.95)
    for row in rows:
        if row["model"] == row["versus"]:
            assert (row["value"], row["low"], row["high"], row["significant"]) == (0.0, 0.0, 0.0, False)
    carpet = next(r for r in rows if (r["category"], r["model"], r["versus"]) == ("carpet", "a", "b"))
    assert carpet["significant"] and carpet["verdict"] == "better" and carpet["low"] > 0
    flipped = next(r for r in rows if (r["category"], r["model"], r["versus"]) == ("carpet", "b", "a"))
    assert flipped["verdict"] == "worse" and flipped["value"] == pytest.approx(-carpet["value"])
