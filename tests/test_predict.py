"""`python -m stages.predict`: new images scored with the model's own recipe, as evaluate scores them."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.errors import PipelineError
from tests.conftest import EVERY_METHOD


def predict(project: Path, *args: str) -> tuple[int, list[dict]]:
    """predict's main() in `project`, into a fresh --out unless one is given; (exit code, scores.csv rows)."""
    import os
    import tempfile

    from stages.predict import main

    if "--out" not in args:
        args = (*args, "--out", tempfile.mkdtemp(prefix="predict-"))
    previous = Path.cwd()
    os.chdir(project)
    try:
        code = main(list(args))
    finally:
        os.chdir(previous)
    out = Path(args[args.index("--out") + 1])
    rows = list(csv.DictReader(open(out / "scores.csv"))) if (out / "scores.csv").exists() else []
    return code, rows


def evaluate_scores(project: Path, model: str) -> dict[str, float]:
    rows = csv.DictReader(open(project / "plots" / "carpet.category" / f"{model}.model" / "scores.csv"))
    return {row["image"]: float(row["score"]) for row in rows}


def scoring_record(project: Path, model: str) -> dict:
    return json.loads((project / "models" / "carpet.category" / f"{model}.scoring.json").read_text())


# torch: the pipeline's own code, features recomputed from the raw files (equal to evaluate's up to the
# order of the backbone's float sums); onnx: the exported graph, in onnxruntime's kernels
TOLERANCE = {"torch": 1e-5, "onnx": 1e-4}


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
@pytest.mark.parametrize("model", list(EVERY_METHOD))
def test_new_images_score_as_evaluate_scored_them(fitted, model, runtime, tmp_path):
    """Every method, both runtimes: the raw test images, given as files, get the scores the evaluate stage
    gave them (its first seed's fit), the threshold evaluate set (scoring.json = the metrics' first seed),
    and an overlay at the prepared size."""
    raw = fitted / "data" / "raw" / "carpet.dataset"
    expected = evaluate_scores(fitted, model)
    out = tmp_path / "out"
    code, rows = predict(
        fitted, model, *(str(raw / name) for name in expected), "--out", str(out), "--runtime", runtime
    )
    assert code == 0 and len(rows) == len(expected)
    record = scoring_record(fitted, model)
    metrics = json.loads((fitted / "metrics/models/carpet.category" / f"{model}.metrics.json").read_text())
    assert record["seed"] == metrics["seeds"][0] == 3
    assert record["threshold"] == metrics["per_seed"]["3"]["threshold"]
    for row, (name, score) in zip(rows, expected.items()):
        assert row["image"] == str(raw / name)
        assert float(row["score"]) == pytest.approx(score, rel=TOLERANCE[runtime])
        assert float(row["threshold"]) == record["threshold"]
        # the verdict of evaluate's own score (clear of the threshold by more than the tolerance)
        if abs(score - record["threshold"]) > 1e-3 * abs(score):
            assert int(row["anomalous"]) == int(score >= record["threshold"])
    overlays = sorted(out.glob("*_overlay.png"))
    has_maps = EVERY_METHOD[model]["method"] != "global_knn"
    assert len(overlays) == (len(expected) if has_maps else 0)  # same-named files from different folders are numbered
    if has_maps:
        assert Image.open(overlays[0]).size == (48, 48)


def test_the_scoring_record_holds_the_score_params_evaluate_used(fitted):
    from stages.core.params import load_params
    from stages.methods.entries import model_config

    params = load_params(fitted / "params.yaml")
    for model in EVERY_METHOD:
        record = scoring_record(fitted, model)
        assert record["score"] == model_config(params, "carpet", model).score.as_dict(), model
        assert record["threshold_rule"].startswith("anomalous when score >= mean + 2 std")
        assert len(record["validation_scores"]) == 2  # 8 training images, val_fraction 0.25


def test_the_overlay_uses_evaluates_colour_scale(fitted, tmp_path):
    """predict's overlay = the overlay of its own map on the scale evaluate wrote (the figures' scale:
    the validation maps' median palest, the threshold strongest)."""
    from stages.deploy.overlay import ColourScale, overlay
    from stages.deploy.torch_model import FittedModel

    image_file = fitted / "data" / "raw" / "carpet.dataset" / "test" / "hole" / "000.png"
    out = tmp_path / "out"
    predict(fitted, "pc", str(image_file), "--out", str(out))
    previous = Path.cwd()
    import os

    os.chdir(fitted)
    try:
        model = FittedModel.load("carpet", "pc")
        image = model.prepare(image_file)
        amap = model.score(image[None], ["x"]).anomaly_maps[0]
    finally:
        os.chdir(previous)
    scale = ColourScale(**scoring_record(fitted, "pc")["colour_scale"])
    assert model.colour_scale == scale and scale.low < scale.high
    written = np.asarray(Image.open(out / "000_overlay.png"))
    assert np.array_equal(written, overlay(image, amap, scale))
    assert not np.array_equal(written, overlay(image, amap, ColourScale(scale.low * 0.5, scale.high)))


def test_the_saved_recipe_wins_over_todays_params(fitted):
    """A model fitted at 48 px scores at 48 px even after params.yaml says otherwise."""
    raw = fitted / "data" / "raw" / "carpet.dataset" / "test" / "hole"
    _, before = predict(fitted, "pc", str(raw))
    shutil.copy(fitted / "params.yaml", fitted / "params.saved")
    text = (fitted / "params.yaml").read_text()
    assert "crop_size: 48" in text
    (fitted / "params.yaml").write_text(text.replace("crop_size: 48", "crop_size: 40"))
    try:
        _, after = predict(fitted, "pc", str(raw))
    finally:
        shutil.move(fitted / "params.saved", fitted / "params.yaml")
    assert [r["score"] for r in after] == [r["score"] for r in before]


def test_bad_files_are_named_and_skipped(fitted, tmp_path, capsys):
    folder = tmp_path / "incoming"
    folder.mkdir()
    good = fitted / "data" / "raw" / "carpet.dataset" / "test" / "good" / "000.png"
    shutil.copy(good, folder / "a_good.png")
    Image.open(good).convert("L").save(folder / "b_gray.png")  # another channel count: converted
    (folder / "c_text.png").write_text("not an image")
    (folder / "d_truncated.png").write_bytes(good.read_bytes()[:300])
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    code, rows = predict(fitted, "pc", str(folder), "--out", str(tmp_path / "out"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1
    assert [Path(r["image"]).name for r in rows] == ["a_good.png", "b_gray.png"]
    assert any("c_text.png" in e for e in errors) and any("d_truncated.png" in e for e in errors)
    assert errors[-1] == "error: 2 of 4 image(s) could not be scored (named above)"


def test_a_model_never_fitted_is_a_one_line_error(fitted):
    with pytest.raises(PipelineError, match=r"^models: model 'nope' was never fitted and evaluated"):
        predict(fitted, "nope", "x.png")
    with pytest.raises(
        PipelineError,
        match=r"models/grid.category/pc.model: model 'pc' was never fitted for grid \(run `dvc repro fit@grid-pc`\)",
    ):
        predict(fitted, "pc", "x.png", "--category", "grid")


def test_a_model_fitted_for_several_categories_needs_the_category(fitted, tmp_path):
    """With a second category's fit beside it, the category must be named; naming it picks that fit."""
    second = fitted / "models" / "other.category"
    shutil.copytree(fitted / "models" / "carpet.category", second)
    try:
        with pytest.raises(PipelineError, match=r"model 'pc' is fitted for carpet, other: pick one with --category"):
            predict(fitted, "pc", "x.png")
        image = fitted / "data" / "raw" / "carpet.dataset" / "test" / "hole" / "000.png"
        code, rows = predict(fitted, "pc", str(image), "--category", "other", "--out", str(tmp_path / "o"))
        assert code == 0 and len(rows) == 1
    finally:
        shutil.rmtree(second)


def test_watch_scores_images_as_they_appear(fitted, tmp_path):
    """predict --watch: images dropped into the folder are scored into the same scores.csv and overlays, a
    file still being written waits for the next look, and Ctrl-C ends the run normally."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    drop, out = tmp_path / "drop", tmp_path / "out"
    drop.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.predict", "pc", "--watch", str(drop), "--out", str(out), "--interval", "0.2"],
        cwd=fitted,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        raw = fitted / "data" / "raw" / "carpet.dataset" / "test"
        shutil.copy(raw / "good" / "000.png", drop / "first.png")
        half = (raw / "hole" / "000.png").read_bytes()
        with open(drop / "second.png", "wb") as slow:  # written in two parts, a second apart
            slow.write(half[: len(half) // 2])
            slow.flush()
            time.sleep(1.0)
            slow.write(half[len(half) // 2 :])
        deadline = time.time() + 60
        while time.time() < deadline:
            rows = list(csv.DictReader(open(out / "scores.csv"))) if (out / "scores.csv").exists() else []
            if len(rows) == 2:
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert [Path(r["image"]).name for r in rows] == ["first.png", "second.png"]
    assert "error" not in stderr  # the half-written file was never read
    expected = evaluate_scores(fitted, "pc")
    assert float(rows[1]["score"]) == pytest.approx(expected["test/hole/000.png"], rel=1e-5)
    assert sorted(p.name for p in out.glob("*_overlay.png")) == ["first_overlay.png", "second_overlay.png"]


def test_a_bank_scored_in_blocks_exports_whole(fitted, tmp_path, monkeypatch):
    """PatchCore scores in blocks of at most MAX_BLOCK_ELEMENTS distances; a traced block split would be
    frozen into the graph and onnxruntime would refuse it (a bank of 20,480 rows with 1,024 patches per
    image did). With blocks far smaller than one image's patches, the export still loads and equals torch."""
    import numpy as np

    from stages.data.prepared import load_split
    from stages.deploy.onnx_model import OnnxModel, export_onnx
    from stages.deploy.torch_model import FittedModel
    from stages.methods import neighbours

    monkeypatch.chdir(fitted)
    model = FittedModel.load("carpet", "pc")
    # blocks of 7 queries: an image's 36 patches split unevenly (7 x 5 + 1), as 1024 did into 819 + 205
    monkeypatch.setattr(neighbours, "MAX_BLOCK_ELEMENTS", 7 * len(model.detector.bank))
    path = tmp_path / "pc.export" / "model.onnx"
    path.parent.mkdir()
    export_onnx(model, path)
    test = load_split(fitted / "data/features/carpet.category/pixels.features/test.npz")
    torch_scores = model.score(test.images, test.names)
    onnx_scores = OnnxModel(path, "carpet", "pc").score(test.images, test.names)
    np.testing.assert_allclose(onnx_scores.image_scores, torch_scores.image_scores, rtol=1e-4)
    np.testing.assert_allclose(onnx_scores.anomaly_maps, torch_scores.anomaly_maps, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("model", list(EVERY_METHOD))
def test_an_export_holds_the_module_tensors_bit_for_bit(fitted, model, monkeypatch):
    """Every method's model.onnx is the same bytes on every CPU because the exporter computes nothing:
    every initializer is a parameter or buffer of the deployed module, bit for bit. torch's constant
    folding folded each BatchNorm into its convolution with a float32 square root whose last bit differs
    between Intel and AMD CPUs (the five EfficientNet-Lite0 exports had other bytes on an Intel CPU;
    bench/cross_cpu_check.py shows it under emulation, this test on any CPU)."""
    from onnx import load, numpy_helper

    from stages.deploy.torch_model import DeployedModule, FittedModel

    monkeypatch.chdir(fitted)
    module = DeployedModule(FittedModel.load("carpet", model))
    held = {(array.dtype, array.tobytes())
            for array in (t.detach().contiguous().numpy() for t in [*module.parameters(), *module.buffers()])}
    graph = load(str(fitted / "models" / "carpet.category" / f"{model}.export" / "model.onnx")).graph
    weights = [(init.name, numpy_helper.to_array(init)) for init in graph.initializer]
    assert weights  # the module's weights travel as initializers
    computed = [f"{name} {array.shape}" for name, array in weights
                if (array.dtype, array.tobytes()) not in held]
    assert not computed, f"{len(computed)} of {len(weights)} initializers were computed at export: {computed[:5]}"
