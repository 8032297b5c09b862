"""The demo server's start and its list of models: --device checked before anything is served, and
models/ read at start and on GET /api/models (each page load), not on every image."""
from __future__ import annotations

import pytest

from tests.conftest import error_line, run_stage
from tests.test_demo import start_server


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


def https_post(url: str, model: str, body: bytes, context) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}/api/predict?model={model}&name=x.png", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_model_list_is_read_at_start_and_on_each_page_load(project):
    """Started as docs/how-to/own-images.md starts it for a camera on another machine: its openssl command
    makes a certificate that names the line's address and 127.0.0.1, and the demo serves HTTPS with it
    (every request below checks the certificate against 127.0.0.1)."""
    import json
    import ssl
    import subprocess
    import urllib.request

    from tests.test_docs_own_images import bash, page_lines, stage_arguments

    heading = "6. The live demo on another machine"
    [certificate] = page_lines(heading, "openssl req")
    assert bash(certificate, project).returncode == 0
    cert = project / "demo-cert.pem"
    names = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-ext", "subjectAltName"], check=True,
                           capture_output=True, text=True).stdout
    assert "IP Address:192.168.1.20" in names and "IP Address:127.0.0.1" in names, names
    [demo] = page_lines(heading, "python -m stages.demo")
    tool, args = stage_arguments(demo)
    assert tool == "demo" and "--host" in args

    fake_fit(project, "carpet", "first")
    process, url = start_server(project, *args, "--runtime", "torch", cafile=cert)
    context = ssl.create_default_context(cafile=str(cert))
    try:
        assert url.startswith("https://")
        assert https_post(url, "carpet/first", b"x", context)[0] == 503  # listed; its files cannot be read
        fake_fit(project, "carpet", "second")  # fitted while the server runs
        assert https_post(url, "carpet/second", b"x", context)[0] == 404  # requests use the list read at start
        with urllib.request.urlopen(url + "/api/models", timeout=10, context=context) as response:  # a page load
            assert json.loads(response.read()) == ["carpet/first", "carpet/second"]
        status, body = https_post(url, "carpet/second", b"x", context)
        assert status == 503 and body["detail"].startswith("models/carpet.category/second.scoring.json")
    finally:
        process.terminate()
        process.wait(timeout=10)
