"""`python -m stages.predict`: new images scored with the model's own recipe, as evaluate scores them."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.errors import PipelineError
from tests.conftest import EVERY_METHOD, as_from_a_terminal


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
        preexec_fn=as_from_a_terminal,
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


@pytest.mark.parametrize("inside", ["weights", "weights/today", "deployments/carpet.category"])
def test_out_inside_weights_or_deployments_is_refused(fitted, inside):
    """weights/ is a dependency of extract and every export (a file there puts 9 stages out of date);
    deployments/ holds the calibrated thresholds."""
    image = str(fitted / "data/raw/carpet.dataset/test/hole/000.png")
    top = inside.split("/")[0]
    with pytest.raises(PipelineError, match=rf"^--out {inside}: inside {top}/, which the pipeline writes or tracks"):
        predict(fitted, "pc", image, "--out", inside)
    assert not (fitted / top).exists()


def test_a_failure_of_one_image_is_one_line_and_the_rest_go_on(fitted, tmp_path, capsys, monkeypatch):
    """Torch's CPU allocation failure (a RuntimeError), onnxruntime's own exception types and a NaN score
    each fail their image alone, with one line naming it and the exception type; a programming error
    (TypeError) is not taken for a bad image: it propagates."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from stages.deploy.torch_model import FittedModel

    folder = tmp_path / "in"
    folder.mkdir()
    good = fitted / "data" / "raw" / "carpet.dataset" / "test" / "good" / "000.png"
    for name in ("a_fine", "b_alloc", "c_onnx", "d_nan", "e_fine"):
        shutil.copy(good, folder / f"{name}.png")
    original = FittedModel.score

    def failing(self, images, names):
        if any(n.startswith("b_") for n in names):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 7168200704 bytes. Error code 12")
        if any(n.startswith("c_") for n in names):
            raise Fail("[ONNXRuntimeError] : 1 : FAIL : Failed to allocate memory for requested buffer")
        prediction = original(self, images, names)
        prediction.image_scores[[n.startswith("d_") for n in names]] = np.nan
        return prediction

    monkeypatch.setattr(FittedModel, "score", failing)
    code, rows = predict(fitted, "pc", str(folder), "--out", str(tmp_path / "out"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and [Path(r["image"]).name for r in rows] == ["a_fine.png", "e_fine.png"]
    assert errors == [
        f"error: {folder}/b_alloc.png: could not be scored (RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == "
        "0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 7168200704 bytes. Error code 12)",
        f"error: {folder}/c_onnx.png: could not be scored (Fail: [ONNXRuntimeError] : 1 : FAIL : Failed to allocate "
        "memory for requested buffer)",
        f"error: {folder}/d_nan.png: the model gave a nan score (a damaged model file?)",
        "error: 3 of 5 image(s) could not be scored (named above)",
    ]

    def buggy(self, images, names):
        raise TypeError("unsupported operand type(s) for /: 'str' and 'int'")

    monkeypatch.setattr(FittedModel, "score", buggy)
    with pytest.raises(TypeError):
        predict(fitted, "pc", str(folder), "--out", str(tmp_path / "out2"))


def test_watch_continues_only_a_folder_of_its_own(tmp_path):
    from stages.predict import COLUMNS, check_out

    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text(",".join(COLUMNS) + "\nin/a.png,1.5,0,2.0,a_overlay.png\n")
    (out / "a_overlay.png").write_bytes(b"png")
    assert check_out(out, overwrite=False, resume=True) == [
        {"image": "in/a.png", "score": "1.5", "anomalous": "0", "threshold": "2.0", "overlay": "a_overlay.png"}
    ]
    with pytest.raises(PipelineError, match=r"already holds 2 file\(s\).*pass --overwrite"):
        check_out(out, overwrite=False, resume=False)  # without --watch: as before
    (out / "scores.csv").write_text("image,score\nin/a.png,1.5\n")
    with pytest.raises(PipelineError, match=r"scores.csv: columns \['image', 'score'\], not predict's"):
        check_out(out, overwrite=False, resume=True)
    (out / "scores.csv").write_text(",".join(COLUMNS) + "\nin/a.png,nan,0,2.0,\n")
    with pytest.raises(PipelineError, match=r"scores.csv: line 2 is not a row predict writes"):
        check_out(out, overwrite=False, resume=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match=r"already holds 3 file\(s\).*\(--watch continues a folder that holds "
                                            r"only scores.csv and overlays\)"):
        check_out(out, overwrite=False, resume=True)


def test_watch_resumes_survives_vanishing_and_retries_half_written_files(fitted, tmp_path):
    """Restarted on the same --out, --watch keeps the earlier rows and scores only new files; a file
    paused mid-write is retried until it is complete; a file that never decodes is one error line after
    bounded tries; a file or the watched folder that vanishes is one warning, and the watcher goes on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    drop, out = tmp_path / "drop", tmp_path / "out"
    drop.mkdir()
    raw = fitted / "data" / "raw" / "carpet.dataset" / "test"
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    command = [sys.executable, "-m", "stages.predict", "pc", "--watch", str(drop), "--out", str(out),
               "--interval", "0.2"]

    def rows() -> list[dict]:
        return list(csv.DictReader(open(out / "scores.csv"))) if (out / "scores.csv").exists() else []

    def wait_for(condition, what: str, seconds: float = 60) -> None:
        deadline = time.time() + seconds
        while not condition():
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def start(log: Path):
        return subprocess.Popen(command, cwd=fitted, env=env, stderr=open(log, "w"), text=True,
                                preexec_fn=as_from_a_terminal)

    def stop(process) -> int:
        process.send_signal(signal.SIGINT)
        return process.wait(timeout=30)

    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    process = start(first_log)
    try:
        shutil.copy(raw / "good" / "000.png", drop / "first.png")
        wait_for(lambda: len(rows()) == 1, "the first file")
        assert stop(process) == 0
        assert [Path(r["image"]).name for r in rows()] == ["first.png"]

        process = start(second_log)  # same --out, no --overwrite; first.png is still in the drop folder
        wait_for(lambda: "resuming" in second_log.read_text(), "the resume line")
        shutil.copy(raw / "hole" / "000.png", drop / "second.png")
        whole = (raw / "color" / "000.png").read_bytes()
        with open(drop / "slow.png", "wb") as slow:  # paused mid-write for longer than the watcher waits
            slow.write(whole[: len(whole) // 2])
            slow.flush()
            wait_for(lambda: len(rows()) == 2, "the second file")
            time.sleep(1.5)
            slow.write(whole[len(whole) // 2 :])
        (drop / "broken.png").write_bytes(whole[:300])  # never completed
        (drop / "gone.png").write_bytes(whole[:100])
        time.sleep(0.5)  # seen, not yet readable
        (drop / "gone.png").unlink()
        wait_for(lambda: len(rows()) == 3 and "broken.png" in second_log.read_text(), "slow.png and broken.png")
        shutil.rmtree(drop)  # an unmounted share
        wait_for(lambda: "watched folder is gone" in second_log.read_text(), "the folder warning")
        drop.mkdir()
        shutil.copy(raw / "good" / "001.png", drop / "third.png")
        wait_for(lambda: len(rows()) == 4, "the file in the folder that came back")
        code = stop(process)
    finally:
        if process.poll() is None:
            process.kill()
    log = second_log.read_text()
    assert code == 1, log  # broken.png could not be scored
    assert "Traceback" not in log
    assert f"resuming {out}/scores.csv: 1 row(s) from before are kept, their files not scored again" in log
    assert [Path(r["image"]).name for r in rows()] == ["first.png", "second.png", "slow.png", "third.png"]
    expected = evaluate_scores(fitted, "pc")
    assert float(rows()[2]["score"]) == pytest.approx(expected["test/color/000.png"], rel=1e-5)  # read once complete
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0].startswith(f"error: {drop}/broken.png: unreadable or truncated image")
    assert "(gave up after 5 tries over" in errors[0]
    assert errors[1] == "error: 1 of 4 image(s) could not be scored (named above)"
    assert log.count(f"warning: {drop}/gone.png: vanished before it was scored") == 1
    assert log.count("the watched folder is gone") == 1 and "the watched folder is back" in log
    assert sorted(p.name for p in out.glob("*_overlay.png")) == [
        "first_overlay.png", "second_overlay.png", "slow_overlay.png", "third_overlay.png"]


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
    # and every large tensor is an initializer, never a Constant node: a Constant is inside the protobuf, which
    # cannot pass 2 GiB (PaDiM's Gaussians at the paper's settings are 3.5 GiB, and their export failed so),
    # while initializers over the limit go to files beside model.onnx
    constants = {node.output[0]: math.prod(numpy_helper.to_array(attribute.t).shape)
                 for node in graph.node if node.op_type == "Constant" for attribute in node.attribute
                 if attribute.name == "value"}
    largest = max(math.prod(t.shape) for t in [*module.parameters(), *module.buffers()])
    assert not {name: n for name, n in constants.items() if n >= min(largest, 2**16)}, "large Constant nodes"
