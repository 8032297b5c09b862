"""Files that travel besides the ONNX export (model.pt, scoring.json, params.yaml, metrics JSON): plain
values are checked, sizes bounded, nothing outside its place is read (tests/test_onnx_graph.py: the
export; tests/test_hostile_data.py: archives and folder sources)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.core.errors import PipelineError
from tests.conftest import REPO, default_params, error_line, run_stage, write_params


def model_copy(fitted: Path, tmp_path: Path, name: str = "pc") -> Path:
    """A project holding a copy of one fitted model and its scoring record (altered freely by a test)."""
    project = tmp_path / "project"
    target = project / "models" / "carpet.category"
    target.mkdir(parents=True)
    shutil.copytree(fitted / "models" / "carpet.category" / f"{name}.model", target / f"{name}.model")
    shutil.copy(fitted / "models" / "carpet.category" / f"{name}.scoring.json", target)
    return project


def alter_state(project: Path, change, name: str = "pc") -> Path:
    path = project / "models" / "carpet.category" / f"{name}.model" / "seed-3" / "model.pt"
    blob = torch.load(path, weights_only=True)
    change(blob)
    torch.save(blob, path)
    return path


def load(project: Path, monkeypatch, name: str = "pc"):
    from stages.deploy.torch_model import FittedModel

    monkeypatch.chdir(project)
    return FittedModel.load("carpet", name)


# ------------------------------------------------------------------------------------------- model.pt


def deflate(path: Path) -> None:
    """Rewrite a torch file's zip with every member deflated, as a hostile copy would be."""
    with zipfile.ZipFile(path) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for info, data in members:
            target.writestr(info.filename, data)


def test_a_deflated_model_file_is_refused_before_torch_load(fitted, tmp_path, monkeypatch):
    """A model.pt re-zipped with deflate put 1.5 GB of tensor into 4.8 MB; here 64 MB of zeros into a few
    hundred kB. It is refused from the zip's directory, before torch.load inflates anything."""
    project = model_copy(fitted, tmp_path)
    path = alter_state(project, lambda blob: blob["state"].update(padding=torch.zeros(16 * 2**20)))
    deflate(path)
    assert path.stat().st_size < 2**20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a compressed file"))
    with pytest.raises(PipelineError) as caught:
        load(project, monkeypatch)
    message = str(caught.value)
    assert message.startswith("models/carpet.category/pc.model/seed-3/model.pt: refused to load this fitted model: "
                              "its member ")
    assert "is compressed" in message and "which torch.save never writes (run the fit stage again)" in message


def test_a_stored_model_file_still_loads(fitted, tmp_path, monkeypatch):
    model = load(model_copy(fitted, tmp_path), monkeypatch)
    assert model.preprocess["resize"] == 56 and model.preprocess["crop_size"] == 48 and model.source.name == "model.pt"


@pytest.mark.parametrize("change, expected", [
    (lambda b: b["inputs"]["preprocess"].update(resize=20000),
     "inputs.preprocess.resize: must be an integer in [16, 2048], got 20000"),
    (lambda b: b["inputs"]["preprocess"].update(resize=-5), "preprocess.resize: must be an integer in [16, 2048]"),
    (lambda b: b["inputs"]["preprocess"].update(resize="abc"), "inputs.preprocess.resize: must be an integer"),
    (lambda b: b["inputs"]["preprocess"].update(crop_size=100, resize=64),
     "inputs.preprocess.crop_size: must be at most preprocess.resize (64), got 100"),
    (lambda b: b["inputs"].update(preprocess="x"), "inputs.preprocess: not an input recipe"),
    (lambda b: b.update(inputs="x"), "its inputs are not a mapping (got 'x')"),
    (lambda b: b["inputs"]["backbone"].update(layers="__class__"),
     "inputs.backbone.layers: must be a non-empty list of strings or null, got '__class__'"),
    (lambda b: b["inputs"]["backbone"].update(arch="os.system"), "name and arch must be plain names"),
    (lambda b: b["inputs"].update(backbone=None), "inputs.backbone: not a backbone entry"),
])
def test_the_saved_recipe_is_checked_against_the_params_schema(fitted, tmp_path, monkeypatch, change, expected):
    """resize: 20000 in a model.pt scored at 2.35 GB; -5, 'abc' and a string `inputs` gave tracebacks."""
    project = model_copy(fitted, tmp_path)
    path = alter_state(project, change)
    with pytest.raises(PipelineError) as caught:
        load(project, monkeypatch)
    assert str(caught.value).startswith(f"{path.relative_to(project)}: ") and expected in str(caught.value), caught


def test_a_weights_path_outside_weights_is_refused_alike_whether_it_exists_or_not(fitted, tmp_path, monkeypatch):
    """A model.pt naming /etc/shadow made predict open it, and the wording told whether a path existed."""
    from stages.core.schema import shown
    from stages.features import backbones

    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("a backbone was loaded"))
    secret = tmp_path / "secret.pth"
    secret.write_bytes(b"private")
    messages = []
    for weights in (str(secret), str(tmp_path / "absent.pth"), "/etc/shadow", "~/.ssh/id_rsa", "weights/../../x.pth"):
        project = model_copy(fitted, tmp_path / weights.replace("/", "_"))
        path = alter_state(project, lambda blob, weights=weights: blob["inputs"]["backbone"].update(weights=weights))
        with pytest.raises(PipelineError) as caught:
            load(project, monkeypatch)
        messages.append(str(caught.value).replace(shown(weights), "<weights>"))
        assert str(caught.value) == (f"{path.relative_to(project)}: inputs.backbone.weights: {shown(weights)} is not "
                                     "under weights/, where a fitted model's backbone checkpoint must lie (refit it "
                                     "with backbones.<name>.weights there)")
    assert len(set(messages)) == 1


def test_a_nan_state_is_an_error_not_a_normal_verdict(fitted, tmp_path, monkeypatch):
    """A memory bank of NaN scored `nan` with verdict 0 (normal) and rc 0."""
    project = model_copy(fitted, tmp_path)
    alter_state(project, lambda blob: blob["state"]["bank"].fill_(float("nan")))
    model = load(project, monkeypatch)
    images = np.zeros((1, 48, 48, 3), np.uint8)
    with pytest.raises(PipelineError, match=r"^a\.png: models/carpet\.category/pc\.model/seed-3/model\.pt gave a score "
                                            r"or map that is not finite \(nan\): its fitted state is corrupt"):
        model.score(images, ["a.png"])


def test_a_state_that_fails_to_score_is_one_line(fitted, tmp_path, monkeypatch):
    """A bank of the wrong shape gave `RuntimeError: mat1 and mat2 shapes cannot be multiplied` (rc 2); now one
    plain line, the same under strict (numpy's product) and fast (torch's)."""
    project = model_copy(fitted, tmp_path)
    alter_state(project, lambda blob: blob["state"].update(bank=torch.zeros(5, 3)))
    model = load(project, monkeypatch)
    with pytest.raises(PipelineError, match=r"^2 images \(a\.png, b\.png\): models/carpet\.category/pc\.model/seed-3/"
                                            r"model\.pt could not score it \(ValueError: the queries have \d+ "
                                            r"features, the bank's rows 3\)$"):
        model.score(np.zeros((2, 48, 48, 3), np.uint8), ["a.png", "b.png"])


def test_a_huge_smoothing_sigma_in_scoring_json_is_refused_with_its_bound(fitted, tmp_path, monkeypatch):
    """A scoring.json with sigma 1e6 asked for 7.2 GB per image; 1e308 overflowed."""
    project = model_copy(fitted, tmp_path)
    path = project / "models/carpet.category/pc.scoring.json"
    record = json.loads(path.read_text())
    for sigma in (1e6, 1e308):
        record["score"]["smoothing_sigma"] = sigma
        path.write_text(json.dumps(record))
        expected = f"score.smoothing_sigma: must be a finite number in [0, 64], got {sigma}"
        with pytest.raises(PipelineError, match=re.escape(expected)):
            load(project, monkeypatch)


@pytest.mark.parametrize("method", ["patchcore", "padim", "autoencoder", "skip_autoencoder", "feature_ae",
                                    "feature_vae"])
def test_every_smoothing_sigma_has_the_bound(method):
    from stages.methods import get_method

    with pytest.raises(PipelineError, match=r"smoothing_sigma: must be a finite number in \[0, 64\], got 65"):
        get_method(method)(score={"smoothing_sigma": 65})
    assert get_method(method)(score={"smoothing_sigma": 64}).score_params.smoothing_sigma == 64


@pytest.mark.parametrize("key, value, expected", [
    ("resize", 100000, "error: preprocess.resize: must be an integer in [16, 2048], got 100000"),
    ("crop_size", 4096, "error: preprocess.crop_size: must be an integer in [16, 2048], got 4096"),
])
def test_preprocess_sizes_have_upper_bounds(project, key, value, expected):
    params = default_params()
    params["preprocess"][key] = value
    write_params(project, params)
    assert error_line(run_stage("check", cwd=project)) == expected


def test_the_real_datasets_and_paper_sizes_fit_the_bounds():
    """Never reject the real datasets or the papers' settings: VisA's largest images (about 1562 x 1500) at
    full resolution, and PatchCore's sigma 4."""
    from stages.core.params import Preprocess
    from stages.methods.patchcore import Score

    assert Preprocess(resize=1562, crop_size=1500).crop_size == 1500
    assert Preprocess(resize=1024, crop_size=1024).resize == 1024
    assert Score(smoothing_sigma=4).smoothing_sigma == 4


# ---------------------------------------------------------------------------------------- params.yaml


def alias_bomb(levels: int = 9) -> str:
    """A YAML list of 9 aliases of 9 aliases ...: a few kB of text, 9**levels strings when expanded."""
    def level(i: int) -> str:
        if i == 0:
            return "&x0 [" + ", ".join(["lol"] * 9) + "]"
        return f"&x{i} [" + level(i - 1) + ", " + ", ".join([f"*x{i - 1}"] * 8) + "]"

    return level(levels)


@pytest.mark.parametrize("key", ["categories", "top_variance_dims"])
def test_a_yaml_alias_bomb_is_one_short_line_quickly(project, key):
    """stages.check ran past 60 s at 2.7 GB building repr() of 9**9 strings for its message."""
    text = (project / "params.yaml").read_text()
    given = {"categories": "categories:\n  - carpet\n", "top_variance_dims": "top_variance_dims: null\n"}[key]
    assert text.count(given) == 1
    (project / "params.yaml").write_text(text.replace(given, f"{key}: {alias_bomb()}\n"))
    assert len((project / "params.yaml").read_bytes()) < len(text) + 10_000
    begin = time.monotonic()
    # the check's own peak, measured by a small launcher: a process forked from this worker starts its count
    # at the worker's resident size (2 GB once the worker has run stages in-process), the launcher's child
    # at the launcher's; RUSAGE_CHILDREN there is that one child's
    launcher = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    child = subprocess.run([sys.executable, "-c", launcher, sys.executable, "-m", "stages.check"], cwd=project,
                           env=env, capture_output=True, text=True)
    *lines, peak = child.stderr.rstrip().splitlines()
    stdout, stderr, seconds, peak_kb = child.stdout, "\n".join(lines), time.monotonic() - begin, int(peak)
    line = error_line(subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr))
    assert line.startswith("error: ") and f"{key}: must be " in line and len(line) < 500, line
    assert seconds < 30 and peak_kb < 1_500_000, (seconds, peak_kb)


# ------------------------------------------------------------------------------------------- few_shot


def test_few_shot_never_replaces_a_file_that_is_not_its_table(tmp_path, monkeypatch):
    """`few_shot --out notes.txt` replaced a 1-line note (the guard only counted lines)."""
    import dvc.api

    from stages import few_shot

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(dvc.api, "exp_show", lambda: [{
        "metrics/models/carpet.category/knn_effnet.metrics.json:n_train": 8,
        "metrics/models/carpet.category/knn_effnet.metrics.json:image_auroc": 0.9,
    }])
    note = tmp_path / "thesis.txt"
    note.write_text("my one line\n")
    with pytest.raises(PipelineError, match=r"thesis\.txt: exists and is not a few-shot table \(its first line is not "
                                            r"model,n_train,image_auroc,pixel_auroc\); left as it is"):
        few_shot.main(["--out", str(note), "--allow-fewer"])
    assert note.read_text() == "my one line\n"
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(PipelineError, match="exists and is not a few-shot table"):
        few_shot.main(["--out", str(empty)])
    table = tmp_path / "few_shot.csv"
    table.write_text("model,n_train,image_auroc,pixel_auroc\nknn_effnet,4,0.8,\n")
    few_shot.main(["--out", str(table)])  # its own table, as long: replaced
    assert table.read_text().splitlines()[1:] == ["knn_effnet,8,0.9,"]
    fresh = tmp_path / "new.csv"
    few_shot.main(["--out", str(fresh)])
    assert fresh.read_text().startswith("model,n_train,image_auroc,pixel_auroc\n")


# ---------------------------------------------------------------------------------- report and compare


@pytest.fixture
def evaluated(tmp_path):
    """Two categories x two models of metrics and resamples, as evaluate writes them (tests/test_report.py)."""
    from tests.test_report import write_metrics

    params = default_params()
    params["data"]["categories"] = ["bottle", "grid"]
    params["models"] = {name: params["models"][name] for name in ("knn_effnet", "patchcore_effnet")}
    write_params(tmp_path, params)
    for category, model, values in [("bottle", "knn_effnet", {"image_auroc": 0.8}),
                                     ("grid", "knn_effnet", {"image_auroc": 0.6}),
                                     ("bottle", "patchcore_effnet", {"image_auroc": 1.0, "pixel_auroc": 0.98}),
                                     ("grid", "patchcore_effnet", {"image_auroc": 0.9, "pixel_auroc": 0.96})]:
        write_metrics(tmp_path, category, model, **values)
    return tmp_path


METRICS = "metrics/models/bottle.category/knn_effnet.metrics.json"


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not readable JSON (JSONDecodeError"),
    ("[]", "not a metrics file of the evaluate stage (holds a list, not a mapping"),
    ("{}", "not a metrics file of the evaluate stage (method is not a string"),
    ("[" * 200_000 + "]" * 200_000, "not readable JSON (RecursionError"),
    ("NaN", "not a metrics file of the evaluate stage (NaN is not a number JSON allows"),
])
@pytest.mark.parametrize("stage", ["report", "compare"])
def test_report_and_compare_refuse_a_broken_metrics_file_in_one_line(evaluated, stage, content, reason):
    """These gave JSONDecodeError, KeyError, AttributeError, TypeError and RecursionError tracebacks."""
    from tests.conftest import call_stage

    call_stage("compare", cwd=evaluated)
    (evaluated / METRICS).write_text(content)
    with pytest.raises(PipelineError) as caught:
        call_stage(stage, cwd=evaluated)
    message = str(caught.value)
    assert message.startswith(f"{METRICS}: {reason}") and "\n" not in message, message
    assert message.endswith("rerun evaluate@bottle-knn_effnet)")


@pytest.mark.parametrize("change, reason", [
    (lambda r: r.update(image_auroc="abc"), "image_auroc is not a number or null"),
    (lambda r: r.update(per_seed=[1, 2]), "per_seed is not a mapping of each seed's metrics"),
    (lambda r: r["interval"].update(image_auroc=[0.1]), "interval's image_auroc is not [low, high]"),
    (lambda r: r.update(seed_std="x"), "seed_std is not a mapping of numbers"),
])
def test_report_refuses_a_metrics_file_of_the_wrong_shape(evaluated, change, reason):
    from tests.conftest import call_stage

    call_stage("compare", cwd=evaluated)
    record = json.loads((evaluated / METRICS).read_text())
    change(record)
    (evaluated / METRICS).write_text(json.dumps(record))
    expected = f"{METRICS}: not a metrics file of the evaluate stage ({reason}"
    with pytest.raises(PipelineError, match=re.escape(expected)):
        call_stage("report", cwd=evaluated)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_never_reaches_summary_json(evaluated, value):
    """image_auroc: NaN went into metrics/summary.json as `NaN`, which strict JSON parsers refuse."""
    from tests.conftest import call_stage

    call_stage("compare", cwd=evaluated)
    text = (evaluated / METRICS).read_text()
    (evaluated / METRICS).write_text(re.sub(r'"image_auroc": [0-9.e-]+', f'"image_auroc": {value}', text, count=1))
    line = error_line(run_stage("report", cwd=evaluated))
    assert line.startswith(f"error: {METRICS}: not a metrics file of the evaluate stage (") and value[:8] in line
    assert not (evaluated / "metrics" / "summary.json").exists()
    (evaluated / METRICS).write_text(text)
    call_stage("report", cwd=evaluated)
    json.loads((evaluated / "metrics" / "summary.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))


def test_compare_refuses_a_compressed_or_broken_resamples_file(evaluated):
    from tests.conftest import call_stage

    samples = evaluated / "data/evaluations/bottle.category/knn_effnet.resamples.npz"
    deflate(samples)
    with pytest.raises(PipelineError, match=r"knn_effnet\.resamples\.npz: refused to load this resamples file of the "
                                            r"evaluate stage: its member 'image_auroc\.npy' is compressed"):
        call_stage("compare", cwd=evaluated)
    samples.write_bytes(b"garbage")
    with pytest.raises(PipelineError, match=r"knn_effnet\.resamples\.npz: not a readable resamples file of the "
                                            r"evaluate stage \(corrupt or not a zip archive"):
        call_stage("compare", cwd=evaluated)


def test_the_security_page_commands_run(project):
    """docs/explanation/security.md shows one command; it runs as written (python: this interpreter)."""
    import os
    import subprocess
    import sys

    page = (REPO / "docs" / "explanation" / "security.md").read_text()
    commands = [line.strip() for block in re.findall(r"```bash\n(.*?)```", page, re.S)
                for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert commands == ["python -m stages.check"]
    for command in commands:
        result = subprocess.run([sys.executable, *command.split()[1:]], cwd=project, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert result.returncode == 0 and result.stdout.startswith("params.yaml: ok ("), result.stderr
