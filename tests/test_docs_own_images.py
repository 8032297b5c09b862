"""docs/how-to/own-images.md and configs/own_folder.yaml, run as the page writes them: a folder of one's own
(generated elongated frames in MVTec AD layout), the template, the calibration on 300 good frames, predict and
a restarted --watch. The page's other blocks are run by tests/test_modes.py (`python -m stages.check`) and
tests/test_demo_start.py (the certificate and the demo over HTTPS)."""
from __future__ import annotations

import csv
import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from tests.conftest import REPO, call_stage
from tests.docs import commands
from tests.elongated import write_elongated

PAGE = "docs/how-to/own-images.md"
TEMPLATE = REPO / "configs" / "own_folder.yaml"
DEPLOYMENT = "deployments/my_part.category/patchcore_effnet.deployment.json"


def page_lines(heading: str, starts: str) -> list[str]:
    """The page's command lines in that section that start so (tests.docs.commands: as a shell reads them)."""
    found = [line for line in commands(PAGE, heading) if line.startswith(starts)]
    assert found, f"{PAGE} '{heading}': no command starting with {starts!r}"
    return found


def stage_arguments(line: str) -> tuple[str, list[str]]:
    """`python -m stages.<tool> args` -> (tool, args), for tests.conftest.run_stage and the demo's start_server."""
    python, flag, module, *args = shlex.split(line)
    assert (python, flag) == ("python", "-m") and module.startswith("stages."), line
    return module.removeprefix("stages."), args


def shell_env() -> dict:
    """The page's `python` is this interpreter; the stages import from the repository."""
    return dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def bash(line: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=shell_env(), capture_output=True, text=True)


def in_process(line: str, capsys) -> tuple[int, str, str]:
    """`python -m stages.<tool> args` as written, its main(args) called here: the same arguments without an
    interpreter start (torch is imported once per test run, not per command)."""
    tool, args = stage_arguments(line)
    capsys.readouterr()
    code = importlib.import_module(f"stages.{tool}").main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_template_differs_from_params_yaml_only_where_it_says():
    """configs/own_folder.yaml: the folder source, pad, PatchCore and PaDiM as params.yaml has them; every
    other value params.yaml's default (its comments say so)."""
    template = yaml.safe_load(TEMPLATE.read_text())
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    assert template["data"].pop("source") == "folder" and template["data"].pop("categories") == ["my_part"]
    assert template["data"].pop("folder") == "/path/to/line_images"
    assert template["preprocess"].pop("mode") == "pad"
    assert template.pop("models") == {name: default["models"][name] for name in ("patchcore_effnet", "padim_effnet")}
    for key in ("source", "categories", "folder"):
        default["data"].pop(key)
    default["preprocess"].pop("mode")
    default.pop("models")
    assert template == default


def rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path))) if path.exists() else []


def wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_own_folder_to_a_calibrated_detector(tmp_path, capsys, monkeypatch):
    """cp the template; set data.folder as the page says (and small sizes, for time); the stages `dvc repro`
    runs; then the page's calibrate (5 % at 95 %: 59 frames, the order statistic's minimum), predict on
    incoming/ with the calibrated threshold, and --watch on the same --out: it resumes, scores the new
    frame, and stops on SIGTERM with exit code 0."""
    write_elongated(tmp_path / "line_images" / "my_part", n_train=20, n_test_good=2, n_test_defect=2,
                    width=192, height=64)
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(TEMPLATE, project / "configs")
    [copy] = page_lines("3. Run the pipeline on your folder", "cp ")
    assert bash(copy, project).returncode == 0
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["data"]["categories"] == ["my_part"]
    params["data"]["folder"] = str(tmp_path / "line_images")  # "Edit data.folder ... to your folder"
    params["preprocess"].update(resize=56, crop_size=48)  # small and quick; pad, as the template says
    params.update(device="cpu", fit_seeds=[0])
    params["evaluate"]["bootstrap"]["resamples"] = 20
    params["models"] = {"patchcore_effnet": params["models"]["patchcore_effnet"]}
    params["models"]["patchcore_effnet"]["fit"].update(pretrain_embed_dimension=32, target_embed_dimension=32)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage, args in (("download", ()), ("preprocess", ()), ("extract", ("efficientnet_lite0",)),
                        ("fit", ("patchcore_effnet",)), ("evaluate", ("patchcore_effnet",))):
        call_stage(stage, "my_part", *args, cwd=project)  # what `dvc repro` runs for the category

    # 59 new good frames "through the line's camera": the generator at another seed
    frames = write_elongated(tmp_path / "camera", n_train=59, n_test_good=0, n_test_defect=0, width=192, height=64,
                             seed=1)
    (project / "calibration").mkdir()
    shutil.move(frames / "train" / "good", project / "calibration" / "good")
    [calibrate] = page_lines("4. Set the threshold on your own good images", "python -m stages.calibrate")
    monkeypatch.chdir(project)
    code, out, err = in_process(calibrate, capsys)
    assert code == 0, err
    assert out.rstrip().endswith(f"-> {DEPLOYMENT}")
    record = json.loads((project / DEPLOYMENT).read_text())
    assert (record["n_images"], record["false_alarms"], record["confidence"]) == (59, 0.05, 0.95)
    # P(Binomial(59, 0.05) >= 1) = 0.952 >= 0.95 > P(>= 2): just above the highest of the 59 scores
    assert record["rank"] == 1 and record["threshold"] == np.nextafter(record["score_quantiles"]["max"], np.inf)

    incoming = project / "incoming"
    incoming.mkdir()
    test = tmp_path / "line_images" / "my_part" / "test"
    for source in ("good/000.png", "good/001.png", "spot/000.png"):
        shutil.copy(test / source, incoming / source.replace("/", "-"))
    batch, watch = page_lines("5. Score images on the line", "python -m stages.predict")
    assert "--watch" in watch and "--out predictions/line1" in batch and "--out predictions/line1" in watch
    code, out, err = in_process(batch, capsys)
    assert code == 0, err
    assert err.splitlines()[0].startswith(f"threshold {record['threshold']:.6g} from {DEPLOYMENT}: calibrated on 59 ")
    scores = project / "predictions" / "line1" / "scores.csv"
    first = rows(scores)
    assert len(first) == 3 and {float(r["threshold"]) for r in first} == {record["threshold"]}

    log = tmp_path / "watch.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(["bash", "-c", f"exec {watch}"], cwd=project, env=shell_env(),
                                   stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        wait_for(lambda: "watching incoming" in log.read_text(), "the watcher to start")
        assert "resuming predictions/line1/scores.csv: 3 row(s) from before are kept" in log.read_text()
        shutil.copy(test / "spot" / "001.png", project / "arriving.tmp")
        os.replace(project / "arriving.tmp", incoming / "spot-001.png")  # appears whole, as a camera's file
        wait_for(lambda: len(rows(scores)) == 4, "the new frame's row")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    after = rows(scores)
    assert after[:3] == first and after[3]["image"].endswith("spot-001.png")
    assert float(after[3]["threshold"]) == record["threshold"]
