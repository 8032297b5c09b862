"""The demo server's start and its list of models: --device checked before anything is served, and
models/ read at start and on GET /api/models (each page load), not on every image."""
from __future__ import annotations

import pytest

from tests.conftest import error_line, run_stage
from tests.test_demo import post, start_server


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "error: --device: unknown device 'gpu' (auto, cpu, cuda or cuda:N)"),
        ("cuda:99", "error: --device: 'cuda:99' requested but "),  # no GPU here, or fewer than 100
    ],
)
def test_a_bad_device_is_a_one_line_error_at_start(project, device, message):
    assert error_line(run_stage("demo", "--device", device, cwd=project)).startswith(message)


def test_no_fitted_model_is_a_one_line_error_at_start(project):
    assert error_line(run_stage("demo", cwd=project)) == (
        "error: no fitted and evaluated model under models/ (run dvc repro first)"
    )


def fake_fit(project, category: str, name: str) -> None:
    """The files that make a model count as fitted and evaluated (unreadable ones: the server answers 503)."""
    folder = project / "models" / f"{category}.category"
    (folder / f"{name}.model" / "seed-0").mkdir(parents=True)
    (folder / f"{name}.model" / "seed-0" / "model.pt").write_bytes(b"not a model")
    (folder / f"{name}.scoring.json").write_text("{}")


def test_the_model_list_is_read_at_start_and_on_each_page_load(project):
    import json
    import urllib.request

    fake_fit(project, "carpet", "first")
    process, url = start_server(project, "--runtime", "torch")
    try:
        assert post(url, "carpet/first", b"x")[0] == 503  # listed; its files cannot be read
        fake_fit(project, "carpet", "second")  # fitted while the server runs
        assert post(url, "carpet/second", b"x")[0] == 404  # requests use the list read at start
        with urllib.request.urlopen(url + "/api/models", timeout=10) as response:  # a page load
            assert json.loads(response.read()) == ["carpet/first", "carpet/second"]
        status, body = post(url, "carpet/second", b"x")
        assert status == 503 and body["detail"].startswith("models/carpet.category/second.scoring.json")
    finally:
        process.terminate()
        process.wait(timeout=10)
