"""The one threshold rule (stages/evaluation/threshold.py: anomalous when score >= threshold) as every path
applies it: evaluate's confusion counts and confusion.csv, predict's scores.csv, the demo's answer and the
heatmap grid's verdict. A score exactly at the threshold is anomalous in all four; `>` in any one of them
(the drift fixed once already, 3e7ee4c) fails here."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from stages.deploy.overlay import ColourScale
from stages.deploy.torch_model import FittedModel
from stages.methods import get_method

# one worker runs this file: its module-scoped projects are built once, not once per worker
pytestmark = pytest.mark.xdist_group("threshold")


@pytest.fixture(scope="module")
def model_at_its_threshold(tmp_path_factory):
    """A small fitted pixel autoencoder, an image file, and the model with its threshold set to exactly
    that image's score (a float64 read back from the scorer, as evaluate would have written it)."""
    from stages.data.prepared import Split

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    train = Split(images, [f"{i}.png" for i in range(4)], np.zeros(4, np.int64), ["good"] * 4, None)
    fit = {"image_size": 32, "channels": [8, 16], "latent": 4, "epochs": 1}
    detector = get_method("autoencoder")(fit=fit, score={"smoothing_sigma": 1.0}).fit(train)
    path = tmp_path_factory.mktemp("threshold") / "new.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    model = FittedModel("carpet", "ae", detector, {"resize": 32, "crop_size": 32}, None, 0.0, ColourScale(0.0, 1.0), 0)
    image = model.prepare(path)
    prediction = model.score(image[None], [path.name])
    model.threshold = float(prediction.image_scores[0])
    return model, path, image, prediction


def test_a_score_at_the_threshold_is_anomalous_in_every_path(model_at_its_threshold, tmp_path):
    from stages.core.progress import progress_bar
    from stages.demo import score_bytes
    from stages.evaluation import curves, metrics
    from stages.plotting.grids import heatmap_figure
    from stages.predict import Run

    model, path, image, prediction = model_at_its_threshold
    score = threshold = model.threshold

    # evaluate: the threshold from validation scores (mean + n_std * std of two equal scores: the score
    # itself), and the confusion counts and confusion.csv rows at it
    labels, scores = np.array([1, 0, 0]), np.array([score, score, score / 2])
    result = metrics.evaluate(labels, scores, ["hole", "good", "good"], [score, score], n_std=2.0)
    assert result["threshold"] == threshold
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (1, 1, 1, 0)
    rows = curves.confusion_rows(["a", "b", "c"], labels, scores, threshold)
    assert [row["predicted"] for row in rows] == ["anomalous", "anomalous", "good"]

    # predict: the scores.csv row of the image file
    run = Run(model, tmp_path / "out")
    (tmp_path / "out").mkdir()
    with progress_bar(total=1, show=False) as bar:
        run.score([path], bar)
    [row] = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert float(row["score"]) == float(row["threshold"]) == threshold
    assert row["anomalous"] == "1"

    # the demo: its JSON answer to the same image's bytes
    answer = score_bytes(model, "carpet/ae", path.read_bytes(), "new.png", "PNG")
    assert answer["score"] == answer["threshold"] == threshold
    assert answer["anomalous"] is True

    # the heatmap grid (figures stage): the row's verdict
    fig, _ = heatmap_figure("ae", image[None], ["new.png"], ["unknown"], None, prediction.anomaly_maps,
                            prediction.image_scores, threshold, model.colour_scale)
    verdict = fig.axes[0].get_ylabel().splitlines()[-1]
    assert verdict == "flagged"


def test_just_below_the_threshold_is_good_in_every_path(model_at_its_threshold, tmp_path):
    """The other side of the rule: the same image against the next float above its score."""
    from stages.demo import score_bytes
    from stages.evaluation import metrics
    from stages.plotting.grids import heatmap_figure

    model, path, image, prediction = model_at_its_threshold
    score = model.threshold
    above = float(np.nextafter(score, np.inf))
    assert metrics.threshold_report([1], [score], above)["fn"] == 1
    model_above = FittedModel(model.category, model.name, model.detector, model.preprocess, None, above,
                              model.colour_scale, 0)
    assert score_bytes(model_above, "carpet/ae", path.read_bytes(), "new.png", "PNG")["anomalous"] is False
    fig, _ = heatmap_figure("ae", image[None], ["new.png"], ["unknown"], None, prediction.anomaly_maps,
                            prediction.image_scores, above, model.colour_scale)
    assert fig.axes[0].get_ylabel().splitlines()[-1] == "not flagged"


def test_an_image_written_as_png_scores_as_its_array(model_at_its_threshold):
    """The premise of the test above: the demo decodes the bytes into the same array predict reads."""
    model, path, image, _ = model_at_its_threshold
    np.testing.assert_array_equal(model.prepare(io.BytesIO(path.read_bytes())), image)
