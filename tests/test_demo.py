"""The demo page in a real headless Chromium (Selenium + Debian's chromium and chromium-driver):
upload a generated defective image, read the score off the page, compare with `predict`."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_predict import predict

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(fitted):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    process = subprocess.Popen([sys.executable, "-m", "stages.demo", "--port", str(port)], cwd=fitted, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # up to 30 s for torch to import
            try:
                urllib.request.urlopen(url + "/api/models", timeout=1)
                break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def upload(browser, url: str, model: str, path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, f"#model option[value='{model}']"))
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    browser.execute_script("document.getElementById('score').textContent = ''; "
                           "document.getElementById('error').textContent = '';")
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, "score").text or b.find_element(By.ID, "error").text
    )
    return browser.find_element(By.ID, "score").text, browser.find_element(By.ID, "error").text


def test_demo_scores_an_upload_as_predict_does(fitted, server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image = fitted / "data" / "raw" / "carpet.dataset" / "test" / "hole" / "000.png"
    _, rows = predict(fitted, "pc", str(image), "--out", str(tmp_path / "pred"))
    score, error = upload(browser, server, "carpet/pc", image)
    assert error == ""
    assert float(score) == pytest.approx(float(rows[0]["score"]), rel=1e-5)
    verdict = browser.find_element(By.ID, "verdict").text
    assert verdict == ("anomalous" if rows[0]["anomalous"] == "1" else "normal")
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.is_displayed() and overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return document.getElementById('overlay').naturalWidth") == 48
    browser.save_screenshot(str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_refuses_what_is_not_an_image_or_too_large(server, browser, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert upload(browser, server, "carpet/ae", text) == ("", "notes.png: not an image that can be read")
    big = tmp_path / "huge.png"
    big.write_bytes(b"\0" * (10 * 1024 * 1024 + 1))
    assert upload(browser, server, "carpet/ae", big) == ("", "huge.png: larger than 10 MB")
