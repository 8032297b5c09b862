"""The demo's live mode with the default run's model, in headless Chromium with a fake camera.

    .venv/bin/python bench/live_demo.py --model carpet/patchcore_effnet --runtime onnx --seconds 20

Run after `dvc repro` (and with Debian's chromium + chromium-driver). The fake camera plays the
default run's carpet (a training image, then a test image of a defect type, in a loop, at 30
frames per second) into the page, which streams it to the server; the server scores the newest
frame each time it is free. Every 0.2 s the script reads what the page shows (frames scored per
second, latency, verdict) and writes bench/results/live_demo_<runtime>.json and a screenshot.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_demo import CHROMEDRIVER, CHROMIUM, start_server  # noqa: E402


def camera(project: Path, path: Path, defect: str, fps: int = 30, seconds: float = 2.0) -> Path:
    from PIL import Image

    raw = project / "data" / "raw" / "carpet.dataset"
    frames = [sorted((raw / "train" / "good").iterdir())[0]] * int(fps * seconds)
    frames += [sorted((raw / "test" / defect).iterdir())[0]] * int(fps * seconds)
    size = Image.open(frames[0]).size[0]
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{size} H{size} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            y, cb, cr = Image.open(frame).convert("RGB").convert("YCbCr").split()
            half = (size // 2, size // 2)
            out.write(
                b"FRAME\n" + y.tobytes() + cb.resize(half, Image.BOX).tobytes() + cr.resize(half, Image.BOX).tobytes()
            )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="carpet/patchcore_effnet")
    parser.add_argument("--runtime", default="onnx", choices=("onnx", "torch"))
    parser.add_argument("--defect", default="color")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    project = Path.cwd()
    video = camera(project, Path("/tmp/live_demo.y4m"), args.defect)
    process, url = start_server(project, "--runtime", args.runtime)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1000,1100",
        "--disable-background-networking",
        "--user-data-dir=/tmp/live-demo-chromium",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={video}",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.get(url)
        WebDriverWait(browser, 30).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, f"#model option[value='{args.model}']")
        )
        Select(browser.find_element(By.ID, "model")).select_by_value(args.model)
        browser.find_element(By.ID, "live-start").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "live-fps").text not in ("", "–"))
        time.sleep(2.0)  # past the first frames (model loading)
        samples, verdicts, end = [], [], time.time() + args.seconds
        while time.time() < end:
            fps, latency = (
                browser.find_element(By.ID, "live-fps").text,
                browser.find_element(By.ID, "live-latency").text,
            )
            verdict = browser.find_element(By.ID, "live-verdict").text
            samples.append((int(fps), int(latency)))
            if not verdicts or verdicts[-1] != verdict:
                verdicts.append(verdict)
            time.sleep(0.2)
        args.out.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(args.out / f"live_demo_{args.runtime}.png"))
        dropped = int(browser.find_element(By.ID, "live-dropped").text)
    finally:
        browser.quit()
        process.terminate()
        process.wait(timeout=10)
    fps = [s[0] for s in samples]
    latency = [s[1] for s in samples]
    result = {
        "model": args.model,
        "runtime": args.runtime,
        "camera_fps": 30,
        "seconds": args.seconds,
        "scored_fps_median": statistics.median(fps),
        "scored_fps_min": min(fps),
        "latency_ms_median": statistics.median(latency),
        "latency_ms_max": max(latency),
        "frames_dropped": dropped,
        "verdicts_seen": verdicts,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (args.out / f"live_demo_{args.runtime}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
