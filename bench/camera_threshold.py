"""Good frames flagged through the camera path: evaluate's threshold against one calibrated on other frames.

    .venv/bin/python bench/camera_threshold.py [--project /tmp/camera_threshold] [--models patchcore_effnet ...]

The default-size setup (params.yaml as committed: the synthetic carpet at 256 px, 100 training
images, 256 -> 224, EfficientNet-Lite0) is built in a scratch project for the models named (their
download, preprocess, extract, fit and evaluate stages, in-process). Then every image goes through a
simulated camera path, as the demo's live mode gets it: rescaled to the camera's 480 x 480 (bicubic),
colour subsampled 4:2:0 as a camera / Y4M stream carries it (chroma box-averaged over 2 x 2, then
upsampled by the decoder), and JPEG-compressed at quality 90 with 4:2:0 chroma (demo.html's
canvas.toBlob("image/jpeg", 0.9)). Three sets of simulated frames:
- calibration: 300 new good carpets (the generator at seed 1001), given to `python -m stages.calibrate`
  (1 % false alarms at 95 % confidence: 299 images at least);
- good: the 20 good test images and 300 other new good carpets (seed 1002), never calibrated on;
- defective: the 40 defective test images.
Each is scored by `python -m stages.predict` (the torch runtime) and counted against evaluate's
threshold (mean + 2 std of the 10 validation images, set on pristine PNGs) and the calibrated one.
Writes bench/results/camera_threshold.json and .txt.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import REPO, call_stage  # noqa: E402

CAMERA_SIZE, JPEG_QUALITY = 480, 90
MODELS = ["patchcore_effnet", "padim_effnet", "knn_effnet"]


def camera(image: Image.Image) -> bytes:
    """One image as the live mode's server receives it (module docstring)."""
    frame = image.convert("RGB").resize((CAMERA_SIZE, CAMERA_SIZE), Image.BICUBIC)
    y, cb, cr = frame.convert("YCbCr").split()
    half = (CAMERA_SIZE // 2, CAMERA_SIZE // 2)
    cb, cr = (c.resize(half, Image.BOX).resize(frame.size, Image.BILINEAR) for c in (cb, cr))
    buffer = io.BytesIO()
    Image.merge("YCbCr", (y, cb, cr)).convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY,
                                                          subsampling="4:2:0")
    return buffer.getvalue()


def write_frames(folder: Path, images: list[tuple[str, Image.Image]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images:
        (folder / f"{name}.jpg").write_bytes(camera(image))
    return folder


def build(project: Path, models: list[str]) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"] = {name: params["models"][name] for name in models}
    params["device"] = "cpu"
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (project / "data/features/carpet.category/pixels.features").is_dir():
        for stage, args in [("download", ()), ("preprocess", ()), ("extract", ("efficientnet_lite0",))]:
            call_stage(stage, "carpet", *args, cwd=project)
    for name in models:
        if not (project / f"models/carpet.category/{name}.scoring.json").is_file():
            for stage in ("fit", "evaluate"):
                call_stage(stage, "carpet", name, cwd=project)


def scores(project: Path, model: str, folder: Path, out: str) -> list[float]:
    from stages.predict import main

    shutil.rmtree(project / out, ignore_errors=True)
    call_in(project, main, [model, str(folder), "--out", out, "--threshold-from", "evaluate"])
    return [float(row["score"]) for row in csv.DictReader(open(project / out / "scores.csv"))]


def call_in(project: Path, function, argv):
    import os

    previous = Path.cwd()
    os.chdir(project)
    try:
        return function(argv)
    finally:
        os.chdir(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path("/tmp/camera_threshold"))
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    import os

    from stages.calibrate import main as calibrate
    from stages.data.synthetic import render_image

    project = args.project.resolve()
    start = time.time()
    build(project, args.models)
    raw = project / "data/raw/carpet.dataset/test"
    generated = lambda seed, n: [(f"{seed}-{i:03d}", Image.fromarray(render_image(seed, 1, i, 256)[0]))  # noqa: E731
                                 for i in range(n)]
    test_good = [(f"test-{p.stem}", Image.open(p)) for p in sorted((raw / "good").glob("*.png"))]
    defective = [(f"{p.parent.name}-{p.stem}", Image.open(p)) for p in sorted(raw.glob("*/*.png"))
                 if p.parent.name != "good"]
    frames = project / "frames"
    if not frames.is_dir():
        write_frames(frames / "calibration", generated(1001, 300))
        write_frames(frames / "good", test_good + generated(1002, 300))
        write_frames(frames / "defective", defective)
    results = {"setup": {"camera": f"{CAMERA_SIZE}x{CAMERA_SIZE} bicubic, 4:2:0 chroma, JPEG quality {JPEG_QUALITY}",
                         "calibration_frames": 300, "good_frames": 320, "defective_frames": len(defective),
                         "target": "at most 1% false alarms with 95% confidence"}, "models": {}}
    for model in args.models:
        shutil.rmtree(project / "deployments", ignore_errors=True)
        code = call_in(project, calibrate, [model, str(frames / "calibration")])
        assert code == 0
        record = json.loads((project / f"deployments/carpet.category/{model}.deployment.json").read_text())
        good = np.array(scores(project, model, frames / "good", f"predictions/{model}-good"))
        bad = np.array(scores(project, model, frames / "defective", f"predictions/{model}-defective"))
        pristine_good = np.array(scores(project, model, raw / "good", f"predictions/{model}-pristine-good"))
        evaluate_t, calibrated_t = record["evaluate_threshold"], record["threshold"]
        results["models"][model] = {
            "evaluate_threshold": evaluate_t,
            "calibrated_threshold": calibrated_t,
            "calibration_rank": record["rank"],
            "calibration_score_quantiles": record["score_quantiles"],
            "good_frames_flagged": {"evaluate": int((good >= evaluate_t).sum()),
                                    "calibrated": int((good >= calibrated_t).sum()), "of": len(good)},
            "good_test_frames_flagged": {"evaluate": int((good[:20] >= evaluate_t).sum()),
                                         "calibrated": int((good[:20] >= calibrated_t).sum()), "of": 20},
            "pristine_good_test_flagged_by_evaluate": {"flagged": int((pristine_good >= evaluate_t).sum()),
                                                       "of": len(pristine_good)},
            "defective_frames_flagged": {"evaluate": int((bad >= evaluate_t).sum()),
                                         "calibrated": int((bad >= calibrated_t).sum()), "of": len(bad)},
            "good_frame_score_quantiles": {q: float(np.quantile(good, v)) for q, v in
                                           (("min", 0), ("p50", .5), ("p99", .99), ("max", 1))},
        }
        print(model, json.dumps(results["models"][model]), flush=True)
    results["seconds"] = round(time.time() - start)
    results["load"] = os.getloadavg()
    results["date"] = time.strftime("%Y-%m-%d %H:%M")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "camera_threshold.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["model | threshold (evaluate -> calibrated) | good frames flagged (evaluate -> calibrated) | "
             "of them the 20 good test images | defective frames flagged (evaluate -> calibrated)"]
    for model, r in results["models"].items():
        g, t, d = r["good_frames_flagged"], r["good_test_frames_flagged"], r["defective_frames_flagged"]
        lines.append(f"{model} | {r['evaluate_threshold']:.4g} -> {r['calibrated_threshold']:.4g} | "
                     f"{g['evaluate']}/{g['of']} -> {g['calibrated']}/{g['of']} | "
                     f"{t['evaluate']}/20 -> {t['calibrated']}/20 | "
                     f"{d['evaluate']}/{d['of']} -> {d['calibrated']}/{d['of']}")
    (args.out / "camera_threshold.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
