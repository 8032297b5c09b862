"""Files and arguments from elsewhere: nothing runs code, exhausts memory, hangs or overwrites the user's work.

Each case was found by a hostile run (a careful attacker, a careless user); each test fails on the
version before the fix.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.core.errors import PipelineError
from tests.conftest import REPO, error_line, run_stage, write_params
from tests.test_predict import predict


class Payload:
    """A harmless stand-in for an attack: unpickling it would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_copy(project: Path, marker: Path) -> Path:
    """The fitted `pc` model with its state replaced by the payload, as a teammate's push could hold it."""
    folder = project / "models" / "carpet.category" / "pc.model" / "seed-3"
    blob = torch.load(folder / "model.pt", weights_only=True)
    saved = folder.parent.parent / "pc.saved"
    shutil.copytree(folder.parent, saved)
    blob["state"] = Payload(marker)
    torch.save(blob, folder / "model.pt")
    return saved


def restore(project: Path, saved: Path) -> None:
    folder = project / "models" / "carpet.category" / "pc.model"
    shutil.rmtree(folder)
    shutil.move(saved, folder)


def test_a_crafted_model_file_is_refused_before_it_runs(fitted, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    saved = crafted_copy(fitted, marker)
    try:
        image = fitted / "data/raw/carpet.dataset/test/hole/000.png"
        with pytest.raises(PipelineError, match=r"pc\.model/seed-3/model\.pt: refused to load this fitted model: "
                                                r"it holds \S+, not only tensors and plain data"):
            predict(fitted, "pc", str(image))
        result = run_stage("evaluate", "carpet", "pc", cwd=fitted)  # evaluate, figures and the demo load the same way
        assert "refused to load this fitted model" in error_line(result)
        assert not marker.exists()
    finally:
        restore(fitted, saved)


def test_a_crafted_feature_file_is_refused(tmp_path):
    from stages.features.cache import load_features

    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"global": torch.zeros(1, 2), "maps": {}, "image_size": [4, 4], "names": [Payload(marker)]},
               tmp_path / "test.pt")
    with pytest.raises(PipelineError, match=r"test\.pt: refused to load this feature cache"):
        load_features(tmp_path / "test.pt")
    assert not marker.exists()


@pytest.mark.parametrize("content, reason", [(b"", "not a readable fitted model"),
                                             (b"PK\x03\x04 truncated zip", "not a readable fitted model"),
                                             (b"garbage", "not a readable fitted model")])
def test_a_corrupt_model_file_is_one_line(fitted, tmp_path, content, reason):
    saved = crafted_copy(fitted, tmp_path / "unused")
    (fitted / "models/carpet.category/pc.model/seed-3/model.pt").write_bytes(content)
    try:
        with pytest.raises(PipelineError, match=reason):
            predict(fitted, "pc", "x.png")
    finally:
        restore(fitted, saved)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"score": {}, "threshold": "high"}'])
def test_a_corrupt_scoring_file_is_one_line(fitted, content):
    path = fitted / "models/carpet.category/pc.scoring.json"
    original = path.read_text()
    path.write_text(content)
    try:
        with pytest.raises(PipelineError, match=r"pc\.scoring\.json: not (readable JSON|a scoring record)"):
            predict(fitted, "pc", "x.png")
    finally:
        path.write_text(original)


def long_png(path: Path, width: int, height: int) -> Path:
    Image.new("L", (width, height)).save(path)
    return path


def test_a_tiny_png_with_a_huge_long_side_is_refused_and_the_others_are_scored(fitted, tmp_path, capsys):
    """118 bytes, 1 x 20000 pixels: resized to 256 on its short side it would need 5 GB."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(fitted / "data/raw/carpet.dataset/test/good/000.png", folder / "a_good.png")
    bomb = long_png(folder / "b_long.png", 1, 20000)
    assert bomb.stat().st_size < 1024
    code, rows = predict(fitted, "pc", str(folder))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and [Path(r["image"]).name for r in rows] == ["a_good.png"]
    assert errors[0] == f"error: {bomb}: 1x20000 pixels is longer than 16:1 (stages/data/raw.py MAX_ASPECT_RATIO); " \
                        "crop it to the part to inspect"


def test_too_many_pixels_is_refused_before_decoding(tmp_path):
    from stages.data.raw import MAX_PIXELS, read_image

    side = int(MAX_PIXELS**0.5) + 1
    path = tmp_path / "big.png"
    Image.new("1", (side, side)).save(path)  # 1 bit per pixel: a small file
    limit = rf"big\.png: {side}x{side} pixels is more than the limit of {MAX_PIXELS:,}"
    with pytest.raises(PipelineError, match=limit):
        read_image(path)


def test_a_fifo_is_refused_not_waited_on(fitted, tmp_path, capsys):
    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)
    code, rows = predict(fitted, "pc", str(fifo), str(fitted / "data/raw/carpet.dataset/test/good/000.png"))
    assert code == 1 and len(rows) == 1
    assert f"error: {fifo}: not a regular file (a folder, FIFO or device)" in capsys.readouterr().err


def test_only_the_first_frame_is_scored_with_a_warning(tmp_path, capsys):
    from stages.data.raw import read_image

    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    for name in ("pages.tif", "moving.gif"):
        image = read_image(tmp_path / name)
        assert np.asarray(image)[0, 0].tolist() == [255, 0, 0]
        assert f"warning: {tmp_path / name}: holds 3 frames (pages); only the first is used" in capsys.readouterr().err


def test_scores_csv_names_each_overlay(fitted, tmp_path):
    images = sorted((fitted / "data/raw/carpet.dataset/test").rglob("000.png"))
    out = tmp_path / "out"
    code, rows = predict(fitted, "pc", *map(str, images), "--out", str(out))
    assert code == 0 and len(rows) == len(images)
    assert len({r["overlay"] for r in rows}) == len(rows)  # same-named inputs get numbered overlays
    assert all((out / r["overlay"]).is_file() for r in rows)
    _, ae_rows = predict(fitted, "ae", str(images[0]))
    assert ae_rows[0]["overlay"].endswith("_overlay.png")


def test_out_never_overwrites_or_deletes_what_predict_did_not_write(fitted, tmp_path):
    image = str(fitted / "data/raw/carpet.dataset/test/hole/000.png")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious\n")
    with pytest.raises(
        PipelineError, match=r"--out .*mine: already holds 1 file\(s\) \(notes\.txt\); pass --overwrite"
    ):
        predict(fitted, "pc", image, "--out", str(out))
    code, rows = predict(fitted, "pc", image, "--out", str(out), "--overwrite")
    assert code == 0 and (out / "notes.txt").read_text() == "precious\n"  # --overwrite touches only its own names

    trap = tmp_path / "trap"
    (trap / "scores.csv").mkdir(parents=True)  # a folder where scores.csv would go
    (trap / "scores.csv" / "data.bin").write_bytes(b"precious")
    with pytest.raises(PipelineError, match=r"trap/scores\.csv: exists and is a folder, not the file"):
        predict(fitted, "pc", image, "--out", str(trap), "--overwrite")
    assert (trap / "scores.csv" / "data.bin").read_bytes() == b"precious"

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PipelineError, match=r"--out .*a_file: exists and is not a folder"):
        predict(fitted, "pc", image, "--out", str(tmp_path / "a_file"))


@pytest.mark.parametrize("inside", ["plots", "plots/carpet.category/pc.model", "models", "metrics", "data/raw"])
def test_out_inside_the_pipeline_folders_is_refused(fitted, inside):
    image = str(fitted / "data/raw/carpet.dataset/test/hole/000.png")
    before = sorted(p.name for p in (fitted / inside.split("/")[0]).rglob("*"))
    with pytest.raises(
        PipelineError, match=rf"--out {inside}: inside {inside.split('/')[0]}/, which the pipeline writes"
    ):
        predict(fitted, "pc", image, "--out", inside)
    assert sorted(p.name for p in (fitted / inside.split("/")[0]).rglob("*")) == before


BAD_DEVICES = [
    ("bogus", "error: --device: unknown device 'bogus' (auto, cpu, cuda or cuda:N)"),
    (
        "cuda:7",
        "error: --device: 'cuda:7' requested but "
        + (
            f"only {torch.cuda.device_count()} GPU(s) present"
            if torch.cuda.is_available()
            else "no CUDA GPU is available"
        ),
    ),
]


@pytest.mark.parametrize("device, message", BAD_DEVICES)
def test_a_bad_device_is_one_line(fitted, device, message):
    result = run_stage("predict", "pc", "x.png", "--device", device, cwd=fitted)
    assert error_line(result) == message


def test_few_shot_has_a_help_and_never_shrinks_the_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    shown = subprocess.run(
        [sys.executable, "-m", "stages.few_shot", "--help"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0 and "--allow-fewer" in shown.stdout and "dvc exp run --queue" in shown.stdout

    from stages.few_shot import existing_rows, sweep_rows

    rows = sweep_rows(
        [
            {
                "metrics/models/carpet.category/m.metrics.json:n_train": 4,
                "metrics/models/carpet.category/m.metrics.json:image_auroc": 0.9,
            }
        ],
        "carpet",
        ["m"],
    )
    assert rows == [{"model": "m", "n_train": 4, "image_auroc": 0.9, "pixel_auroc": None}]
    # exp_show's '!' (no metrics file: the commit before any repro, a failed or queued run) and '-' are skipped
    prefix = "metrics/models/carpet.category/m.metrics.json:"
    shown = [{prefix + "n_train": "!", prefix + "image_auroc": "!"},
             {prefix + "n_train": 8, prefix + "image_auroc": "-"}]
    assert sweep_rows(shown, "carpet", ["m"]) == [
        {"model": "m", "n_train": 8, "image_auroc": None, "pixel_auroc": None}]
    table = tmp_path / "few_shot.csv"
    table.write_text("model,n_train,image_auroc,pixel_auroc\nm,4,0.9,\nm,8,0.95,\n")
    assert existing_rows(table) == 2


def test_few_shot_refuses_to_replace_a_longer_table(tmp_path, monkeypatch, capsys):
    import dvc.api

    from stages import few_shot

    table = tmp_path / "few_shot.csv"
    table.write_text("model,n_train,image_auroc,pixel_auroc\n" + "m,1,0.5,\nm,2,0.6,\n")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(
        dvc.api,
        "exp_show",
        lambda: [
            {
                "metrics/models/carpet.category/knn_effnet.metrics.json:n_train": 8,
                "metrics/models/carpet.category/knn_effnet.metrics.json:image_auroc": 0.9,
            }
        ],
    )
    with pytest.raises(
        PipelineError, match=r"few_shot\.csv: holds 2 rows, the experiments found give 1; left as it is"
    ):
        few_shot.main(["--out", str(table)])
    assert "give 1 row(s) for carpet: 1 size(s) (8)" in capsys.readouterr().out
    assert existing_rows_of(table) == 2
    few_shot.main(["--out", str(table), "--allow-fewer"])
    assert existing_rows_of(table) == 1


def existing_rows_of(path: Path) -> int:
    return len(path.read_text().splitlines()) - 1


def test_the_generator_has_upper_bounds(project):
    from tests.conftest import default_params

    params = default_params()
    params["data"]["synthetic"]["n_train"] = 1_000_000_000
    write_params(project, params)
    line = error_line(run_stage("download", "carpet", cwd=project))
    assert line == "error: data.synthetic.n_train: must be an integer in [1, 10000], got 1000000000"
    assert not (project / "data").exists()


def test_one_validation_image_is_warned_about(project):
    from tests.test_errors import TINY, raw_category, tiny_params

    raw_category(project)
    params = tiny_params(project)
    params["preprocess"]["val_fraction"] = 0.05  # of 8 images: 1 held out
    write_params(project, params)
    result = run_stage("preprocess", "carpet", cwd=project, check=True)
    assert (
        f"warning: preprocess.val_fraction=0.05 holds out 1 of {TINY['n_train']} good training images of carpet: "
        "the mean + n_std * std threshold rests on 1 validation score(s) (with one, the threshold is that image's "
        "score)"
    ) in result.stderr


def test_a_string_where_dvc_expands_a_list_is_named(project):
    """DVC itself stops on `data.categories: carpet` before any stage runs ('Value' object is not iterable);
    `python -m stages.check` names the key."""
    text = (project / "params.yaml").read_text().replace("categories:\n  - carpet", "categories: carpet")
    assert "categories: carpet\n" in text
    (project / "params.yaml").write_text(text)
    assert (
        error_line(run_stage("check", cwd=project))
        == "error: data.categories: must be a non-empty list of strings, got 'carpet'"
    )
