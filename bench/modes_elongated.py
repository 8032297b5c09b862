"""What each preprocess.mode shows the model, and what it finds on elongated frames (issue 26 item 6).

    python bench/modes_elongated.py [--out bench/results/modes_elongated] [--resize 256 --crop 224]

1. The share of a frame the model sees per mode, for 1:1, 4:3, 16:9 and 1:2.4 frames (stages/data/raw.py
   Placement, the recipe preprocess and both runtimes apply), and under pad the share of the model input
   that shows the frame.
2. The generated set of tests/elongated.py (480 x 160 frames, one dark disc near an end of each defective
   frame; default 60 good training, 30 good and 30 defective test images) through the pipeline's own
   download, preprocess, extract, fit and evaluate stages, once per mode, with params.yaml's
   `patchcore_effnet` (PatchCore on EfficientNet-Lite0 at its params.yaml settings, nothing tuned to this
   set), at the paper's 256 -> 224: the share of defect pixels inside the model's view, image AUROC,
   pixel AUROC and AUPRO (with their bootstrap intervals, 1000 resamples).

Writes <out>.json and <out>.md (a Markdown table for the docs) and prints the table. Runs on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

ASPECTS = {"1:1": (1000, 1000), "4:3": (1333, 1000), "16:9": (1778, 1000), "1:2.4": (2400, 1000)}
MODES = ("crop", "resize", "pad")


def coverage(resize: int, crop: int) -> list[dict]:
    from stages.data.raw import Placement

    rows = []
    for name, (width, height) in ASPECTS.items():
        row = {"aspect": name, "frame": f"{width}x{height}"}
        for mode in MODES:
            placement = Placement.of(width, height, {"resize": resize, "crop_size": crop, "mode": mode})
            row[f"{mode}_seen"] = placement.seen()
            if mode == "pad":
                row["pad_input_shows_frame"] = float(placement.valid().mean())
        rows.append(row)
    return rows


def detection(workdir: Path, resize: int, crop: int, n_train: int, n_test: int) -> list[dict]:
    import numpy as np

    from stages.data.raw import Placement, list_category, read_mask
    from tests.elongated import PATCHCORE, mode_project, write_elongated

    source = write_elongated(workdir / "src" / "long", n_train=n_train, n_test_good=n_test, n_test_defect=n_test)
    _, raw_test, _ = list_category(source)
    masks = [np.asarray(read_mask(item.mask_path)) > 0 for item in raw_test if item.mask_path]
    rows = []
    for mode in MODES:
        start = time.process_time()
        project = mode_project(workdir / mode, source, mode, [PATCHCORE], resize=resize, crop_size=crop)
        metrics = json.loads((project / f"metrics/models/long.category/{PATCHCORE}.metrics.json").read_text())
        view = Placement.of(480, 160, {"resize": resize, "crop_size": crop, "mode": mode}).view_mask()
        rows.append({
            "mode": mode,
            "defect_pixels_in_view": float(sum((m & view).sum() for m in masks) / sum(m.sum() for m in masks)),
            **{key: metrics.get(key) for key in ("image_auroc", "pixel_auroc", "aupro")},
            "interval": {key: metrics["interval"].get(key) for key in ("image_auroc", "pixel_auroc", "aupro")},
            "cpu_s": round(time.process_time() - start, 1),
        })
    return rows


def percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def metric(value, interval) -> str:
    if value is None:
        return "undefined (no defect pixel in view)"
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def table(result: dict) -> str:
    lines = [f"Share of the frame the model sees (resize {result['resize']}, crop_size {result['crop']}):", "",
             "| frame | crop | resize | pad | pad: share of the input showing the frame |", "|---|---|---|---|---|"]
    for row in result["coverage"]:
        lines.append(f"| {row['aspect']} ({row['frame']}) | {percent(row['crop_seen'])} | "
                     f"{percent(row['resize_seen'])} (squashed) | {percent(row['pad_seen'])} | "
                     f"{percent(row['pad_input_shows_frame'])} |")
    lines += ["", f"Elongated frames (480 x 160, a defect near an end; {result['n_train']} good training, "
              f"{result['n_test']} good + {result['n_test']} defective test images), PatchCore on EfficientNet-Lite0 "
              "(params.yaml patchcore_effnet), 95 % bootstrap intervals:", "",
              "| mode | defect pixels in view | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|"]
    for row in result["detection"]:
        interval = row["interval"]
        values = " | ".join(metric(row[key], interval[key]) for key in ("image_auroc", "pixel_auroc", "aupro"))
        lines.append(f"| {row['mode']} | {percent(row['defect_pixels_in_view'])} | {values} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "modes_elongated"))
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-test", type=int, default=30, help="good and defective test images, each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modes-") as workdir:
        result = {
            "command": "python bench/modes_elongated.py " + " ".join(sys.argv[1:]),
            "resize": args.resize, "crop": args.crop, "n_train": args.n_train, "n_test": args.n_test,
            "coverage": coverage(args.resize, args.crop),
            "detection": detection(Path(workdir), args.resize, args.crop, args.n_train, args.n_test),
            "load_average": os.getloadavg(),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
