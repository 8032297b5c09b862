"""The demo page in a real headless Chromium (Selenium + Debian's chromium and chromium-driver), its
HTTP answers, its behaviour under load, and the live camera mode with a fake camera."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
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

from tests.conftest import REPO
from tests.test_predict import predict

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(project: Path, *args: str):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    process = subprocess.Popen([sys.executable, "-m", "stages.demo", "--port", str(port), *args], cwd=project, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):  # up to 30 s for torch to import
        try:
            urllib.request.urlopen(url + "/api/models", timeout=1)
            return process, url
        except OSError:
            assert process.poll() is None, process.stdout.read()
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
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    camera = fake_camera(fitted, tmp_path_factory.mktemp("camera") / "line.y4m")
    for arg in (
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
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def fake_camera(project: Path, path: Path, fps: int = 10) -> Path:
    """A Y4M video (what Chromium's fake camera plays, in a loop): 2 s of good carpet, then 2 s of a colour
    defect. The good frame is a training image: through the camera's chroma subsampling and JPEG a good
    test image comes out just above the tiny model's threshold (8 training images of 64 px)."""
    raw = project / "data" / "raw" / "carpet.dataset"
    good = sorted((raw / "train" / "good").iterdir())[0]
    frames = [good] * (2 * fps) + [raw / "test" / "color" / "000.png"] * (2 * fps)
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
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, _ = server
    browser.get(url)
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option[value='carpet/pc']"))
    Select(browser.find_element(By.ID, "model")).select_by_value("carpet/pc")
    browser.find_element(By.ID, "live-start").click()
    seen, deadline, scores = [], time.time() + 20, set()
    while time.time() < deadline and not (
        seen and "normal" in seen and seen[-1] == "anomalous" and seen.index("normal") < len(seen) - 1
    ):
        verdict = browser.find_element(By.ID, "live-verdict").text
        if verdict and (not seen or seen[-1] != verdict):
            seen.append(verdict)
        scores.add(browser.find_element(By.ID, "live-score").text)
        time.sleep(0.05)
    fps = browser.find_element(By.ID, "live-fps").text
    latency = browser.find_element(By.ID, "live-latency").text
    browser.save_screenshot(str(tmp_path / "live.png"))
    print(f"live mode, tiny 'pc' model: verdicts {seen}, {fps} frames/s, latency {latency} ms, scores {sorted(scores)}")
    assert "normal" in seen and "anomalous" in seen[seen.index("normal") :], seen
    assert int(fps) >= 1 and int(latency) > 0
    assert browser.find_element(By.ID, "live-error").text == ""
    browser.find_element(By.ID, "live-stop").click()
