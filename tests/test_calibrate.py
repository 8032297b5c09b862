"""A threshold from the user's own good images: the order-statistic rule (scipy's binomial as the oracle),
`python -m stages.calibrate`, its deployment file, and predict using it (or refusing a stale one)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binom, norm

from stages.core.errors import PipelineError
from stages.evaluation import threshold
from tests.conftest import call_stage, error_line, run_in_process, run_stage

# one worker runs this file: its module-scoped projects are built once, not once per worker
pytestmark = pytest.mark.xdist_group("calibrate")

FALSE_ALARMS, CONFIDENCE = 0.3, 0.9  # 7 images at least: the tiny project's tests stay small


def oracle_rank(n: int, a: float, c: float) -> int | None:
    """The largest m with P(Binomial(n, a) >= m) >= c, by scipy."""
    tails = binom.sf(np.arange(n), n, a)  # P(X >= m) for m = 1..n is sf(m - 1)
    eligible = np.flatnonzero(tails >= c)
    return int(eligible[-1]) + 1 if eligible.size else None


@pytest.mark.parametrize("a", [0.001, 0.01, 0.05, 0.1, 0.3, 0.5])
@pytest.mark.parametrize("c", [0.5, 0.9, 0.95, 0.99])
def test_the_rank_is_the_largest_the_binomial_allows(a, c):
    ns = [*range(1, 400), 599, 1000, 2999, 10000]
    for n in ns:
        tails = binom.sf(np.arange(n), n, a)
        if np.any(np.abs(tails - c) < 1e-9):  # a knife edge: float rounding may go either way
            continue
        assert threshold.order_statistic_rank(n, a, c) == oracle_rank(n, a, c), (n, a, c)
    needed = threshold.images_needed(a, c)
    assert binom.sf(0, needed, a) >= c > binom.sf(0, needed - 1, a)
    assert threshold.order_statistic_rank(needed, a, c) == 1
    assert threshold.order_statistic_rank(needed - 1, a, c) is None


def test_one_percent_at_95_percent_needs_299_images():
    assert threshold.images_needed(0.01, 0.95) == 299
    assert threshold.images_needed(0.05, 0.95) == 59 and threshold.images_needed(0.1, 0.95) == 29
    with pytest.raises(threshold.TooFewImages, match=(
        r"^298 good images are too few for at most 1% false alarms with 95% confidence: that needs at least 299; "
        r"298 can vouch for 1.01% at best$"
    )):
        threshold.order_statistic_threshold(np.arange(298.0), 0.01, 0.95)


def coverage(draw, rule, n: int, a: float, sets: int, seed: int = 0) -> float:
    """The share of calibration sets whose threshold keeps the true false-alarm rate at most a."""
    rng = np.random.default_rng(seed)
    kept = 0
    for _ in range(sets):
        scores, false_alarm_rate = draw(rng, n)
        kept += false_alarm_rate(rule(scores)) <= a
    return kept / sets


def normal(rng, n):
    return rng.normal(size=n), lambda t: norm.sf(t)  # P(score >= t)


def tied(rng, n):
    """Heavily tied scores (five values), as identical camera frames give: P(score >= t)."""
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    p = np.array([0.5, 0.3, 0.15, 0.04, 0.01])
    return rng.choice(values, size=n, p=p), lambda t: float(p[values >= t].sum())


@pytest.mark.parametrize("draw", [normal, tied])
def test_the_guarantee_holds_where_a_point_quantile_does_not(draw):
    """Over 3000 calibration sets of 200 scores, the order statistic keeps the false-alarm rate at most
    5 % in at least 90 % of them (continuous or tied scores); the plain 95 % quantile in about half."""
    n, a, c, sets = 200, 0.05, 0.9, 3000
    rule = lambda scores: threshold.order_statistic_threshold(scores, a, c).threshold  # noqa: E731
    held = coverage(draw, rule, n, a, sets)
    assert held >= c - 3 * np.sqrt(c * (1 - c) / sets), held
    if draw is normal:
        point = coverage(draw, lambda scores: float(np.quantile(scores, 1 - a)), n, a, sets)
        assert point < 0.7, point


def test_the_threshold_lies_just_above_the_statistic():
    """Identical frames: the rule flags none of them (score >= threshold means score > the statistic)."""
    chosen = threshold.order_statistic_threshold([2.5] * 40, 0.1, 0.95)
    assert chosen.score == 2.5 and chosen.threshold == np.nextafter(2.5, np.inf)
    assert not threshold.flagged(2.5, chosen.threshold)
    scores = np.arange(100.0)
    chosen = threshold.order_statistic_threshold(scores, 0.1, 0.95)
    assert chosen.rank == oracle_rank(100, 0.1, 0.95) == 5
    assert chosen.score == 95.0 and threshold.flagged(scores, chosen.threshold).sum() == chosen.rank - 1
    assert chosen.describe() == ("just above the 5th highest of 100 good image scores: at most 10% false alarms "
                                 "with 95% confidence, distribution-free")


def test_evaluate_rules():
    settings = {"threshold_rule": "mean_std", "threshold_n_std": 2, "threshold_false_alarms": 0.3,
                "threshold_confidence": 0.9}
    value, rule = threshold.validation_threshold([1.0, 2.0, 3.0], settings)
    assert value == pytest.approx(4.0)
    assert rule == "anomalous when score >= mean + 2 std of the validation (good) image scores"
    scores = np.linspace(0, 1, 30)
    value, rule = threshold.validation_threshold(scores, {**settings, "threshold_rule": "quantile"})
    rank = oracle_rank(30, 0.3, 0.9)
    assert value == np.nextafter(np.sort(scores)[30 - rank], np.inf)
    assert rule.startswith(f"anomalous when score >= just above the {threshold.ordinal(rank)} highest of 30 "
                           "validation (good) image scores: at most 30% false alarms with 90% confidence")
    with pytest.raises(PipelineError, match=(
        r"^evaluate.threshold_rule quantile: 5 validation images are too few for at most 30% false alarms with "
        r"90% confidence: that needs at least 7; 5 can vouch for 37% at best \(raise evaluate.threshold_false_"
    )):
        threshold.validation_threshold(scores[:5], {**settings, "threshold_rule": "quantile"})


# --- the command, on a copy of the tiny fitted project ------------------------------------------------------


@pytest.fixture(scope="module")
def site(fitted, tmp_path_factory) -> Path:
    """A copy of the fitted project (its deployment files and model edits stay here) with a folder of
    new good images: the generator's carpet at another seed, as a site's own camera would give."""
    from stages.data.synthetic import render_image

    project = tmp_path_factory.mktemp("site") / "project"
    shutil.copytree(fitted, project, ignore=shutil.ignore_patterns("plots", "dvc_plots"))
    good = project / "line" / "good"
    good.mkdir(parents=True)
    for i in range(12):
        image, _ = render_image(seed=77, split_index=1, image_index=i, image_size=64)
        Image.fromarray(image).save(good / f"{i:03d}.png")
    return project


@pytest.fixture
def clean(site):
    shutil.rmtree(site / "deployments", ignore_errors=True)
    yield site
    shutil.rmtree(site / "deployments", ignore_errors=True)


def calibrate(project: Path, *args: str):
    return run_in_process("calibrate", "pc", "line/good", "--false-alarms", str(FALSE_ALARMS),
                          "--confidence", str(CONFIDENCE), *args, cwd=project)


def predicted(project: Path, out: str, *args: str):
    result = run_in_process("predict", "pc", "line/good", "--out", out, *args, cwd=project)
    rows = list(csv.DictReader(open(project / out / "scores.csv"))) if (project / out / "scores.csv").exists() else []
    return result, rows


DEPLOYMENT = Path("deployments/carpet.category/pc.deployment.json")


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_calibrate_sets_the_threshold_predict_then_uses(clean, runtime):
    """The images scored as predict scores them; the threshold just above the order statistic scipy's
    binomial picks; predict (both runtimes), with one line saying where its threshold comes from."""
    project = clean
    before, rows = predicted(project, f"before-{runtime}", "--runtime", runtime)
    assert before.returncode == 0, before.stderr
    assert "no deployments/carpet.category/pc.deployment.json" in before.stderr.splitlines()[0]
    scores = np.array([float(r["score"]) for r in rows])
    result = calibrate(project, "--runtime", runtime)
    assert result.returncode == 0, result.stderr
    record = json.loads((project / DEPLOYMENT).read_text())
    rank = oracle_rank(12, FALSE_ALARMS, CONFIDENCE)
    statistic = np.sort(scores)[12 - rank]
    assert record["threshold"] == np.nextafter(statistic, np.inf) and record["order_statistic"] == statistic
    assert (record["rank"], record["n_images"], record["runtime"]) == (rank, 12, runtime)
    assert (record["false_alarms"], record["confidence"], record["images"]) == (FALSE_ALARMS, CONFIDENCE, "line/good")
    assert record["score_quantiles"]["max"] == scores.max() and record["score_quantiles"]["min"] == scores.min()
    assert record["evaluate_threshold"] == float(rows[0]["threshold"])
    pt = project / "models/carpet.category/pc.model/seed-3/model.pt"
    import hashlib
    assert record["identity"]["torch"]["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    assert result.stdout.startswith(f"carpet/pc: threshold {record['threshold']:.6g} = just above the ")
    assert result.stdout.rstrip().endswith(f"-> {DEPLOYMENT}")

    for used in ("torch", "onnx"):  # one calibration serves both runtimes while both files are unchanged
        after, rows = predicted(project, f"after-{runtime}-{used}", "--runtime", used)
        assert after.returncode == 0, after.stderr
        assert after.stderr.splitlines()[0].startswith(
            f"threshold {record['threshold']:.6g} from {DEPLOYMENT}: calibrated on 12 good images (line/good, "
            f"{runtime} runtime, ")
        assert {float(r["threshold"]) for r in rows} == {record["threshold"]}
        assert [r["anomalous"] for r in rows] == [str(int(float(r["score"]) >= record["threshold"])) for r in rows]
        if used == runtime:  # the very scores calibrated on: the rank - 1 above the statistic are flagged
            assert sum(r["anomalous"] == "1" for r in rows) == rank - 1 == 1
    evaluate_only, rows = predicted(project, f"eval-{runtime}", "--threshold-from", "evaluate", "--runtime", runtime)
    assert "(--threshold-from evaluate)" in evaluate_only.stderr.splitlines()[0]
    assert {float(r["threshold"]) for r in rows} == {record["evaluate_threshold"]}


def test_too_few_images_is_an_error_and_writes_nothing(clean):
    result = run_in_process("calibrate", "pc", "line/good", cwd=clean)  # 1 % at 95 %: 299 images
    assert error_line(result) == (
        "error: line/good: 12 images are too few for at most 1% false alarms with 95% confidence: that needs at "
        "least 299; 12 can vouch for 22.1% at best; add good images or raise --false-alarms"
    )
    assert not (clean / "deployments").exists()


def test_an_unreadable_image_is_named_and_nothing_is_written(clean):
    bad = clean / "line" / "good" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    try:
        result = calibrate(clean)
    finally:
        bad.unlink()
    assert "line/good/zz_broken.png: unreadable or truncated image" in result.stderr
    assert error_line(result).startswith("error: 1 of 13 image(s) could not be scored (named above); nothing written")
    assert not (clean / "deployments").exists()


def test_a_file_that_is_not_a_deployment_is_never_replaced(clean):
    path = clean / DEPLOYMENT
    path.parent.mkdir(parents=True)
    path.write_text('{"my": "notes"}\n')
    result = calibrate(clean)
    assert error_line(result) == (
        f"error: {DEPLOYMENT}: not a deployment file written by python -m stages.calibrate; not replaced: move it "
        "away to calibrate again"
    )
    assert path.read_text() == '{"my": "notes"}\n'
    # predict will not take it for a threshold either
    result, _ = predicted(clean, "foreign")
    assert error_line(result) == f"error: {DEPLOYMENT}: not a deployment file written by python -m stages.calibrate"


def test_a_refit_makes_the_deployment_stale_and_never_used_silently(clean):
    """A changed model.pt: predict refuses the deployment file with one line; --threshold-from evaluate
    works; the onnx runtime (its file unchanged) still uses it; calibrating again replaces it, keeping
    the old record in `previous`."""
    import torch

    project = clean
    assert calibrate(project).returncode == 0
    first = json.loads((project / DEPLOYMENT).read_text())
    pt = project / "models/carpet.category/pc.model/seed-3/model.pt"
    saved = pt.read_bytes()
    blob = torch.load(pt, weights_only=True)
    blob["state"] = {k: (v + 1e-3 if torch.is_tensor(v) and v.is_floating_point() else v)
                     for k, v in blob["state"].items()}  # as a refit with other data would
    torch.save(blob, pt)
    try:
        result, _ = predicted(project, "stale")
        assert error_line(result) == (
            f"error: {DEPLOYMENT}: calibrated for another fit of carpet/pc (models/carpet.category/pc.model/seed-3/"
            "model.pt has changed since (refitted or re-exported)); calibrate again (python -m stages.calibrate), "
            "or use evaluate's threshold with --threshold-from evaluate"
        )
        assert predicted(project, "stale-evaluate", "--threshold-from", "evaluate")[0].returncode == 0
        onnx, rows = predicted(project, "stale-onnx", "--runtime", "onnx")
        assert onnx.returncode == 0 and {float(r["threshold"]) for r in rows} == {first["threshold"]}
        again = calibrate(project)
        assert again.returncode == 0, again.stderr
        second = json.loads((project / DEPLOYMENT).read_text())
        assert second["previous"] == first
        assert second["identity"]["torch"]["sha256"] != first["identity"]["torch"]["sha256"]
        assert predicted(project, "recalibrated")[0].returncode == 0
    finally:
        pt.write_bytes(saved)


def test_evaluate_follows_the_quantile_rule(site):
    """evaluate.threshold_rule: quantile sets the pipeline's own threshold just above an order statistic
    of the validation scores (2 here: only a loose target is possible), and refuses a target they cannot vouch for."""
    import yaml

    project = site
    params_path = project / "params.yaml"
    original = params_path.read_text()
    scoring = project / "models/carpet.category/pc.scoring.json"
    saved = scoring.read_bytes()
    params = yaml.safe_load(original)
    params["evaluate"].update(threshold_rule="quantile", threshold_false_alarms=0.8, threshold_confidence=0.95)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        call_stage("evaluate", "carpet", "pc", cwd=project)
        record = json.loads(scoring.read_text())
        metrics = json.loads((project / "metrics/models/carpet.category/pc.metrics.json").read_text())
        validation = record["validation_scores"]
        assert len(validation) == 2 and oracle_rank(2, 0.8, 0.95) == 1
        assert record["threshold"] == np.nextafter(max(validation), np.inf) == metrics["per_seed"]["3"]["threshold"]
        assert record["threshold_rule"] == (
            "anomalous when score >= just above the highest of 2 validation (good) image scores: at most 80% false "
            "alarms with 95% confidence, distribution-free")
        params["evaluate"]["threshold_false_alarms"] = 0.5
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        result = run_stage("evaluate", "carpet", "pc", cwd=project)
        assert error_line(result).startswith(
            "error: evaluate.threshold_rule quantile: 2 validation images are too few for at most 50% false alarms "
            "with 95% confidence: that needs at least 5; 2 can vouch for 77.7% at best")
    finally:
        params_path.write_text(original)
        call_stage("evaluate", "carpet", "pc", cwd=project)
    assert scoring.read_bytes() == saved  # mean_std, the default, gives back the same record
