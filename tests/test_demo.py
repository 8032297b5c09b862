"""The demo page in a real headless Chromium (Selenium + Debian's chromium and chromium-driver), its
HTTP answers, its behaviour under load, and the live camera mode with a fake camera."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, as_from_a_terminal
from tests.test_predict import predict

# one worker runs this file: its module-scoped projects are built once, not once per worker
pytestmark = pytest.mark.xdist_group("demo")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(project: Path, *args: str, cafile: Path | None = None, output=subprocess.PIPE):
    """The demo in its own process; with `cafile` (its self-signed certificate), over HTTPS, checked
    against that certificate (so it must name 127.0.0.1)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    process = subprocess.Popen([sys.executable, "-m", "stages.demo", "--port", str(port), *args], cwd=project, env=env,
                               stdout=output, stderr=subprocess.STDOUT, text=True, preexec_fn=as_from_a_terminal)
    url = f"{'https' if cafile else 'http'}://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    for _ in range(300):  # up to 30 s for torch to import
        try:
            urllib.request.urlopen(url + "/api/models", timeout=1, context=context)
            return process, url
        except OSError:
            assert process.poll() is None, process.stdout.read() if process.stdout else process.returncode
            time.sleep(0.1)
    raise AssertionError("the demo server did not start")


@pytest.fixture(scope="module")
def server(fitted):
    process, url = start_server(fitted)
    yield url, process
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory, fitted):
    """Chromium with a fake camera (2 s good carpet, 2 s defect), accepting the HTTPS site's self-signed
    certificate too."""
    camera = fake_camera(fitted, tmp_path_factory.mktemp("camera") / "line.y4m")
    driver = chromium(tmp_path_factory, camera, "--ignore-certificate-errors")
    yield driver
    driver.quit()


def chromium(tmp_path_factory, camera: Path, *extra: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (*extra,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1000,1300",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={camera}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def fake_camera(project: Path, path: Path, fps: int = 10, good_s: int = 2, defect_s: int = 2) -> Path:
    """A Y4M video (what Chromium's fake camera plays, in a loop): 2 s of good carpet, then 2 s of a colour
    defect. The good frame is a training image: through the camera's chroma subsampling and JPEG a good
    test image comes out just above the tiny model's threshold (8 training images of 64 px)."""
    raw = project / "data" / "raw" / "carpet.dataset"
    good = sorted((raw / "train" / "good").iterdir())[0]
    frames = [good] * (good_s * fps) + [raw / "test" / "color" / "000.png"] * (defect_s * fps)
    size = 256  # the camera's frame, scaled up from the 64 px test images
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{size} H{size} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            y, cb, cr = Image.open(frame).convert("RGB").resize((size, size), Image.BICUBIC).convert("YCbCr").split()
            out.write(
                b"FRAME\n"
                + y.tobytes()
                + cb.resize((size // 2, size // 2), Image.BOX).tobytes()
                + cr.resize((size // 2, size // 2), Image.BOX).tobytes()
            )
    return path


def upload(browser, url: str, model: str, path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, f"#model option[value='{model}']"))
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    browser.execute_script(
        "document.getElementById('score').textContent = ''; document.getElementById('error').textContent = '';"
    )
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, "score").text or b.find_element(By.ID, "error").text
    )
    return browser.find_element(By.ID, "score").text, browser.find_element(By.ID, "error").text


def post(url: str, model: str, body: bytes, name: str = "x.png") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/api/predict?model={model}&name={name}", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def decoded(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_demo_scores_an_upload_as_predict_does(fitted, server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = server
    image = fitted / "data" / "raw" / "carpet.dataset" / "test" / "hole" / "000.png"
    out = tmp_path / "pred"
    _, rows = predict(fitted, "pc", str(image), "--out", str(out), "--runtime", "onnx")
    score, error = upload(browser, url, "carpet/pc", image)
    assert error == ""
    assert float(score) == pytest.approx(float(rows[0]["score"]), rel=1e-5)
    verdict = browser.find_element(By.ID, "verdict").text
    assert verdict == ("anomalous" if rows[0]["anomalous"] == "1" else "normal")
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.is_displayed() and overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return document.getElementById('overlay').naturalWidth") == 48
    # the same overlay as predict's: one colour scale, evaluate's (stages/deploy/overlay.py)
    assert np.array_equal(decoded(overlay.get_attribute("src")), np.asarray(Image.open(out / rows[0]["overlay"])))
    browser.save_screenshot(str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_refuses_what_is_not_an_image_or_too_large(server, browser, tmp_path):
    url, _ = server
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert upload(browser, url, "carpet/ae", text) == ("", "notes.png: not an image that can be read")
    big = tmp_path / "huge.png"
    big.write_bytes(b"\0" * (10 * 1024 * 1024 + 1))
    assert upload(browser, url, "carpet/ae", big) == ("", "huge.png: larger than 10 MB")
    # the statuses behind those messages, and the pixel bounds
    assert post(url, "carpet/ae", b"not an image")[0] == 415  # (413 for a body over 10 MB: the next test)
    long_png = io.BytesIO()
    Image.new("L", (1, 20000)).save(long_png, format="PNG")
    status, body = post(url, "carpet/ae", long_png.getvalue(), "long.png")
    assert status == 413 and body["detail"].startswith("long.png: 1x20000 pixels is longer than 16:1")
    status, body = post(url, "carpet/nope", b"x")
    assert status == 404 and body["detail"] == "model 'carpet/nope' is not fitted and evaluated (run dvc repro)"
    assert urllib.request.urlopen(url + "/", timeout=5).status == 200
    for page in ("/docs", "/redoc", "/openapi.json"):  # FastAPI's own pages load from a CDN: off
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url + page, timeout=5)


def test_the_upload_limit_holds_while_the_body_streams_in(server):
    """A declared 300 MB body is refused before one byte of it is sent; an undeclared (chunked) one as
    soon as it passes the limit: the server never takes more than 10 MB."""
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/api/predict?model=carpet/pc&name=big.png")
    connection.putheader("Content-Length", str(300 * 1024 * 1024))
    connection.endheaders()  # headers only
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["detail"] == "big.png: larger than 10 MB"
    connection.close()

    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    sent = 0

    def chunks():
        nonlocal sent
        for _ in range(300):  # up to 300 MB, 1 MB at a time
            sent += 1
            yield b"\0" * (1024 * 1024)

    try:
        connection.request("POST", "/api/predict?model=carpet/pc&name=big.png", body=chunks(), encode_chunked=True)
        status = connection.getresponse().status
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed while we still sent
        status = 413
    assert status == 413 and sent < 100


def test_a_corrupt_model_file_is_a_json_error(fitted, tmp_path):
    """A damaged export (or model) answers 503 with its one-line error, as JSON, never a bare 500."""
    onnx = fitted / "models" / "carpet.category" / "ae.export" / "model.onnx"
    saved = onnx.read_bytes()
    onnx.write_bytes(b"garbage")
    process, url = start_server(fitted)
    try:
        status, body = post(url, "carpet/ae", (fitted / "data/raw/carpet.dataset/test/good/000.png").read_bytes())
        assert status == 503 and body["detail"].startswith(
            "models/carpet.category/ae.export/model.onnx: not a readable ONNX model"
        )
    finally:
        process.terminate()
        process.wait(timeout=10)
        onnx.write_bytes(saved)


def test_the_server_binds_to_localhost_unless_told(server):
    url, _ = server
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: it only picks the outgoing interface
        outside = probe.getsockname()[0]
    finally:
        probe.close()
    port = int(url.rsplit(":", 1)[1])
    assert urllib.request.urlopen(url + "/api/models", timeout=5).status == 200
    if outside != "127.0.0.1":
        with pytest.raises(OSError):
            socket.create_connection((outside, port), timeout=2).close()


def test_the_server_holds_under_20_concurrent_uploads(fitted, server):
    """Scoring runs in worker threads (one image at a time per model): /api/models keeps answering fast
    while 20 uploads wait, every upload is answered, and the server's memory stays bounded."""
    import psutil

    url, process = server
    # 12 MP photographs: decoding and resizing each takes about 0.1 s, so the 20 keep the workers busy for seconds
    photo = io.BytesIO()
    gradient = np.linspace(0, 255, 4000, dtype=np.float32)[None, :, None] * np.ones((3000, 1, 3), np.float32)
    Image.fromarray(gradient.astype(np.uint8)).save(photo, format="JPEG", quality=90)
    image = photo.getvalue()
    rss_before = psutil.Process(process.pid).memory_info().rss
    results, latencies, stop = [], [], threading.Event()

    def upload_one():
        results.append(post(url, "carpet/pc", image)[0])

    def poll_models():
        while not stop.is_set():
            start = time.perf_counter()
            urllib.request.urlopen(url + "/api/models", timeout=10).read()
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)

    poller = threading.Thread(target=poll_models)
    poller.start()
    uploads = [threading.Thread(target=upload_one) for _ in range(20)]
    for thread in uploads:
        thread.start()
    for thread in uploads:
        thread.join(timeout=120)
    stop.set()
    poller.join()
    assert results == [200] * 20
    assert len(latencies) >= 10 and max(latencies) < 1.0, (len(latencies), max(latencies))
    grown = psutil.Process(process.pid).memory_info().rss - rss_before
    assert grown < 300 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"


def test_live_mode_follows_the_camera(fitted, server, browser, tmp_path):
    """The fake camera plays good carpet, then a hole: the page's verdict goes from normal to anomalous,
    with frames per second and latency shown as they are measured in the browser."""
    url, _ = server
    live_mode(browser, url, tmp_path / "live.png")


def select_model(browser, url: str, model: str = "carpet/pc") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, f"#model option[value='{model}']"))
    Select(browser.find_element(By.ID, "model")).select_by_value(model)


def verdicts(browser, seconds: float = 20) -> tuple[list[str], set[str]]:
    """The live verdicts as they change, until one 'normal' is followed by 'anomalous' (or time is up)."""
    from selenium.webdriver.common.by import By

    seen, deadline, scores = [], time.time() + seconds, set()
    while time.time() < deadline and not (
        seen and "normal" in seen and seen[-1] == "anomalous" and seen.index("normal") < len(seen) - 1
    ):
        verdict = browser.find_element(By.ID, "live-verdict").text
        if verdict and (not seen or seen[-1] != verdict):
            seen.append(verdict)
        scores.add(browser.find_element(By.ID, "live-score").text)
        time.sleep(0.05)
    return seen, scores


def live_mode(browser, url: str, screenshot: Path) -> None:
    from selenium.webdriver.common.by import By

    select_model(browser, url)
    browser.find_element(By.ID, "live-start").click()
    seen, scores = verdicts(browser)
    fps = browser.find_element(By.ID, "live-fps").text
    latency = browser.find_element(By.ID, "live-latency").text
    browser.save_screenshot(str(screenshot))
    print(f"live mode, tiny 'pc' model: verdicts {seen}, {fps} frames/s, latency {latency} ms, scores {sorted(scores)}")
    assert "normal" in seen and "anomalous" in seen[seen.index("normal") :], seen
    assert int(fps) >= 1 and int(latency) > 0
    assert browser.find_element(By.ID, "live-error").text == ""
    assert browser.find_element(By.ID, "live-threshold-source").text.startswith("threshold ")
    browser.find_element(By.ID, "live-stop").click()


# --- HTTPS, a camera on another machine, and the calibrate button -----------------------------------------


def certificate_command() -> str:
    """The one command the demo's docstring gives for a self-signed certificate (the docs quote it)."""
    import stages.demo

    lines = stages.demo.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("openssl req"))
    command = []
    for line in lines[start:]:
        command.append(line.strip())
        if not line.rstrip().endswith("\\"):
            return "\n".join(command)
    raise AssertionError("the openssl command does not end")


@pytest.fixture(scope="module")
def https_site(fitted, tmp_path_factory):
    """A copy of the fitted project (the calibrate button writes its deployment file there), the demo
    over HTTPS with a certificate made by the documented command, and a Chromium that accepts it, with
    a fake camera that shows good carpet for 8 s before the defect (time to calibrate on 29 scored frames,
    about 2 s, 2.5 s with both cores busy, and to see them stay normal)."""
    project = tmp_path_factory.mktemp("https") / "project"
    shutil.copytree(fitted, project, ignore=shutil.ignore_patterns("plots", "dvc_plots"))
    subprocess.run(["bash", "-c", certificate_command()], cwd=project, check=True, capture_output=True)
    cert, key = project / "demo-cert.pem", project / "demo-key.pem"
    names = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-ext", "subjectAltName"], check=True,
                           capture_output=True, text=True).stdout
    assert "IP Address:127.0.0.1" in names, names
    process, url = start_server(project, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), cafile=cert)
    camera = fake_camera(project, tmp_path_factory.mktemp("camera") / "line.y4m", good_s=8, defect_s=4)
    driver = chromium(tmp_path_factory, camera, "--ignore-certificate-errors")
    yield project, url, driver
    driver.quit()
    process.terminate()
    process.wait(timeout=10)


def test_live_mode_over_https(https_site, browser, tmp_path):
    """Served over HTTPS (its self-signed certificate, made by the documented command), the page opens
    its live socket as wss:// (a ws:// one would find no server) and follows the camera (the short one:
    the HTTPS site's long camera is for calibrating)."""
    _, url, _ = https_site
    assert url.startswith("https://")
    live_mode(browser, url, tmp_path / "live-https.png")
    assert browser.execute_script("return location.protocol") == "https:"


def test_the_calibrate_button_sets_the_threshold_predict_uses(https_site):
    """Calibrate on the next 29 camera frames (at most 10 % false alarms at 95 %): the deployment file
    is written by the command's code, the page switches to its threshold, the good frames stay normal
    and the defect turns anomalous, and predict then uses the same threshold."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    project, url, browser = https_site
    select_model(browser, url)
    for field, value in (("cal-frames", "29"), ("cal-target", "10"), ("cal-confidence", "95")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    assert browser.find_element(By.ID, "cal-needed").text == "This target needs at least 29 frames."
    browser.find_element(By.ID, "calibrate").click()  # the camera starts on good carpet
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "cal-status").text.startswith("calibrated"))
    record = json.loads((project / "deployments/carpet.category/pc.deployment.json").read_text())
    assert (record["n_images"], record["false_alarms"], record["confidence"]) == (29, 0.1, 0.95)
    assert (record["images"], record["runtime"], record["rank"]) == ("29 camera frames (demo live mode)", "onnx", 1)
    source = browser.find_element(By.ID, "live-threshold-source").text
    assert source.startswith(f"threshold {record['threshold']:.6g} from deployments/carpet.category/pc.deployment.json")
    seen, _ = verdicts(browser, seconds=30)  # the rest of the good segment, then the defect
    assert seen and seen[0] == "normal" and "anomalous" in seen, seen
    assert browser.find_element(By.ID, "live-error").text == ""
    browser.find_element(By.ID, "live-stop").click()
    image = project / "data" / "raw" / "carpet.dataset" / "test" / "color" / "000.png"
    code, rows = predict(project, "pc", str(image))
    assert code == 0 and float(rows[0]["threshold"]) == record["threshold"] and rows[0]["anomalous"] == "1"


# --- the live socket: text messages, leaks, stopping --------------------------------------------------------


def test_a_text_message_closes_the_socket_and_sigterm_always_stops(fitted, tmp_path):
    """A text message on /api/live gets a close with 1008 (policy violation) at once; 300 such connections
    leave no handler behind (the shutdown finds no task to cancel) and no memory; and with a socket open
    and an upload stalled halfway, SIGTERM still ends the process within a few seconds."""
    import psutil
    import websocket

    log = tmp_path / "demo.log"
    process, url = start_server(fitted, output=open(log, "w"))
    try:
        live = url.replace("http://", "ws://") + "/api/live?model=carpet/pc"
        rss = psutil.Process(process.pid).memory_info().rss
        for _ in range(300):
            connection = websocket.create_connection(live, timeout=10)
            connection.send("hello text")
            opcode, payload = connection.recv_data(control_frame=True)
            assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(payload[:2], "big") == 1008, payload
            connection.close()
        grown = psutil.Process(process.pid).memory_info().rss - rss
        assert grown < 8 * 2**20, f"300 connections kept {grown / 2**20:.1f} MiB"
        frame = io.BytesIO()
        Image.open(fitted / "data/raw/carpet.dataset/test/good/000.png").save(frame, format="JPEG")
        idle = websocket.create_connection(live, timeout=10)  # a camera that is still connected
        idle.send_binary(struct.pack("<d", 1.0) + frame.getvalue())
        assert "score" in json.loads(idle.recv())
        host, port = url.removeprefix("http://").split(":")
        stalled = socket.create_connection((host, int(port)), timeout=10)  # an upload that stops halfway
        stalled.sendall(b"POST /api/predict?model=carpet/pc HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                        + b"\0" * 1000)
        time.sleep(0.5)
        start = time.time()
        process.terminate()
        process.wait(timeout=15)
        stopped = time.time() - start
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert stopped < 8, f"SIGTERM took {stopped:.1f} s"
    assert "Traceback" not in output, output
    # the 300 text-message handlers had all ended: only the two open connections were cancelled, if any
    cancelled = [line for line in output.splitlines() if "timeout graceful shutdown exceeded" in line]
    assert all("Cancel 1 running task" in line or "Cancel 2 running task" in line for line in cancelled), output


class StubModel:
    """A model whose scoring fails as `failure` says: the demo's answer for each kind of failure."""

    runtime, threshold = "onnx", 1.0

    def __init__(self, failure: BaseException | None, score: float = 0.5):
        self.failure, self.value = failure, score

    def prepare(self, data):
        from stages.deploy.inputs import prepare

        return prepare(data, {"resize": 32, "crop_size": 32})

    def score(self, images, names):
        from stages.methods.base import Prediction

        if self.failure is not None:
            raise self.failure
        return Prediction(np.array([self.value]), None)


def test_every_failure_of_one_image_is_a_json_error_with_its_status(fitted, monkeypatch):
    """Out of memory in torch (RuntimeError), onnxruntime's own errors and a NaN score: 503 naming the
    image and the exception type; not an image: 415; a programming error propagates (the app turns it
    into a JSON 500 and logs its traceback), never taken for a bad image."""
    from fastapi import HTTPException
    from fastapi.testclient import TestClient
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    from stages import demo

    png = (fitted / "data/raw/carpet.dataset/test/good/000.png").read_bytes()
    cases = [
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 7168200704 bytes"), 0.5, 503,
         "x.png: could not be scored (RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to "
         "allocate 7168200704 bytes)"),
        (InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: image"), 0.5,
         503, "x.png: could not be scored (InvalidArgument: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid "
         "dimensions for input: image)"),
        (MemoryError(), 0.5, 503, "x.png: out of memory while scoring it"),
        (None, float("nan"), 503, "x.png: the model gave a nan score (a damaged model file?)"),
    ]
    for failure, score, status, detail in cases:
        with pytest.raises(HTTPException) as caught:
            demo.score_bytes(StubModel(failure, score), "carpet/x", png, "x.png", "PNG")
        assert (caught.value.status_code, caught.value.detail) == (status, detail)
    with pytest.raises(HTTPException) as caught:
        demo.score_bytes(StubModel(None), "carpet/x", b"not an image", "x.png", "PNG")
    assert (caught.value.status_code, caught.value.detail) == (415, "x.png: not an image that can be read")
    with pytest.raises(TypeError):
        demo.score_bytes(StubModel(TypeError("a bug")), "carpet/x", png, "x.png", "PNG")

    monkeypatch.chdir(fitted)
    monkeypatch.setattr(demo.Models, "get", lambda self, name: StubModel(TypeError("a bug")))
    monkeypatch.setattr(demo.Models, "line", lambda self, name: "stub")
    response = TestClient(demo.create_app(), raise_server_exceptions=False).post(
        "/api/predict?model=carpet/pc&name=x.png", content=png)
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error (TypeError); see the demo's log"}


def test_tls_options_are_checked_before_serving(tmp_path):
    from tests.conftest import error_line, run_stage

    (tmp_path / "cert.pem").write_text("not a certificate\n")
    assert error_line(run_stage("demo", "--ssl-certfile", "cert.pem", cwd=tmp_path)) == (
        "error: --ssl-certfile and --ssl-keyfile go together (the certificate and its private key)")
    line = error_line(run_stage("demo", "--ssl-certfile", "cert.pem", "--ssl-keyfile", "cert.pem", cwd=tmp_path))
    assert line.startswith("error: --ssl-certfile cert.pem / --ssl-keyfile cert.pem: not a certificate and its "
                           "unencrypted key (SSLError")
    missing = run_stage("demo", "--ssl-certfile", "cert.pem", "--ssl-keyfile", "missing.pem", cwd=tmp_path)
    assert error_line(missing) == "error: --ssl-keyfile missing.pem: not a file"


HUNG_SERVER = """
import sys, time
import anyio, uvicorn
from fastapi import FastAPI
from stages.demo import Server


app = FastAPI()

@app.get("/hang")
async def hang():  # a scoring thread that never returns (a graph that loops, a stuck kernel)
    await anyio.to_thread.run_sync(time.sleep, 600)

@app.get("/up")
def up():
    return "up"

try:
    Server(uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                          timeout_graceful_shutdown=2)).run()
except KeyboardInterrupt:  # as stages.core.cli.run_main ends on Ctrl-C
    print("interrupted")
"""


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_the_demo_stops_even_when_a_scoring_thread_never_returns(stop):
    """SIGTERM: uvicorn cancels the request after its grace period and the signal ends the process.
    Ctrl-C (SIGINT): the same, but then Python waits for the stuck worker thread at exit, forever: the
    demo's deadline ends the process anyway, with one line saying why."""
    import signal

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", HUNG_SERVER, str(port)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, preexec_fn=as_from_a_terminal)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/up", timeout=1)
                break
            except OSError:
                assert process.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.1)
        def hang() -> None:
            try:
                urllib.request.urlopen(url + "/hang", timeout=30)
            except OSError:  # the request is cancelled when the server stops: that is the point
                pass

        threading.Thread(target=hang, daemon=True).start()
        time.sleep(1.0)
        start = time.time()
        process.send_signal(getattr(signal, stop))
        output, _ = process.communicate(timeout=30)
        stopped = time.time() - start
    finally:
        if process.poll() is None:
            process.kill()
    from stages.demo import EXIT_DEADLINE_S

    assert stopped < EXIT_DEADLINE_S + 2, f"{stopped:.1f} s"
    assert "Traceback" not in output, output
    if stop == "SIGTERM":
        assert process.returncode == -signal.SIGTERM, output
    else:
        assert "interrupted" in output and "still busy 5 s after the stop signal" in output, output
        assert process.returncode == 128 + signal.SIGINT
