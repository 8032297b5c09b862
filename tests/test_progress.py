"""Progress bars, one per wait: predict draws its own and the library's loops stay silent under it, the
demo draws none per image, and the export stage one (its parity check). Run as subprocesses with
TQDM_DISABLE unset, as a user runs them (only the evaluate refusal, which draws no bar, runs in-process);
a bar is recognised by tqdm's `<desc>: NN%|` prefix."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import yaml

from tests.conftest import REPO, error_line, run_stage

BAR = re.compile(r"(?:^|[\r\n])([^\r\n]*?): +\d+%\|")


def bars(stderr: str) -> set[str]:
    """The descriptions of every tqdm bar drawn on `stderr`."""
    return set(BAR.findall(stderr))


def with_bars() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    return dict(env, PYTHONPATH=str(REPO))


def test_predict_draws_one_bar_of_its_own(fitted, tmp_path):
    """pc reads backbone features: before, the extractor's and the scorer's bars were drawn inside
    predict's, on every chunk."""
    images = fitted / "data" / "raw" / "carpet.dataset" / "test" / "hole"
    for model in ("pc", "ae"):
        result = subprocess.run(
            [sys.executable, "-m", "stages.predict", model, str(images), "--out", str(tmp_path / model)],
            cwd=fitted, env=with_bars(), capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr
        assert bars(result.stderr) == {f"predict carpet/{model}"}


def test_the_demo_draws_no_bar_per_image(fitted):
    from tests.test_demo import free_port, post

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.demo", "--port", str(port), "--runtime", "torch"],
        cwd=fitted, env=with_bars(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        image = (fitted / "data" / "raw" / "carpet.dataset" / "test" / "hole" / "000.png").read_bytes()
        import time
        import urllib.request

        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        for model in ("carpet/pc", "carpet/ae"):  # a backbone model and a pixel model
            status, body = post(f"http://127.0.0.1:{port}", model, image)
            assert status == 200 and "score" in body, body
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert "demo: http://" in output and bars(output) == set(), output


def test_export_runs_on_the_cpu_whatever_params_say(fitted, tmp_path):
    """params.yaml `device: cuda` on a machine without a GPU: the model stages refuse it, the export
    (traced on the CPU, run by onnxruntime's CPU package) still writes the same graph, under one bar."""
    import torch

    project = tmp_path / "project"
    shutil.copytree(fitted, project, ignore=shutil.ignore_patterns("*.export"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["device"] = "cuda"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not torch.cuda.is_available():  # the case this test is for: fit and evaluate would need the GPU
        assert "'cuda' requested but no CUDA GPU is available" in error_line(
            run_stage("evaluate", "carpet", "pc", cwd=project)
        )
    result = subprocess.run([sys.executable, "-m", "stages.export", "carpet", "pc"], cwd=project, env=with_bars(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    exported = project / "models" / "carpet.category" / "pc.export" / "model.onnx"
    assert exported.read_bytes() == (fitted / "models" / "carpet.category" / "pc.export" / "model.onnx").read_bytes()
    assert bars(result.stderr) == {"parity: onnxruntime vs torch"}
