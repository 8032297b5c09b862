"""Set a model's deployment threshold from your own good images, taken the way the line takes them.

    python -m stages.calibrate <model> <folder of good images> [--category C] [--false-alarms 0.01]
                               [--confidence 0.95] [--runtime torch|onnx]

The images are scored exactly as `python -m stages.predict` scores them (the same code,
stages/deploy/batch.py). The threshold is the order statistic of their scores that keeps the
false-alarm rate on new good images at or below --false-alarms with --confidence, whatever the
scores' distribution (stages/evaluation/threshold.py): with n images it lies just above the m-th
highest score, m the largest count with P(Binomial(n, false_alarms) >= m) >= confidence. No threshold has that
guarantee with fewer than n_min = ceil(log(1 - confidence) / log(1 - false_alarms)) images (299 for
1 % at 95 %, 59 for 5 %, 29 for 10 %): then it is an error naming both numbers and the lowest target
the images can vouch for, and nothing is written. An error, not a warning: the file would be trusted
on the line as keeping the target, and with too few images no threshold does.

Writes deployments/<category>.category/<model>.deployment.json (stages/deploy/deployment.py): the
threshold, the rule, the target, the confidence, the number of images, their score quantiles and the
SHA-256 of the model files, so a refit makes it stale. predict, `--watch` and the demo use it from then on.
Every image must be scored: one that cannot be read is named, and nothing is written (exit 1).
The images must be good ones the model was not fitted on, and independent views (different parts,
not one part photographed over and over): the guarantee assumes each is a fresh draw of the line.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from stages.core.cli import run_main
from stages.core.device import resolve_device
from stages.core.errors import PipelineError, warn
from stages.core.params import check_name
from stages.core.paths import raw_category_dir
from stages.deploy import deployment
from stages.deploy.batch import choose_category, image_files, score_files
from stages.deploy.runtimes import RUNTIMES, load_model
from stages.evaluation.threshold import images_needed, too_few_message


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1 (exclusive), e.g. 0.01 for 1 %")
    return value


def warn_if_training_images(files: list[Path], category: str) -> None:
    """Training images score lower than new good ones (a memory bank holds their very patches): a
    threshold set on them flags good images that are merely new."""
    train = os.path.realpath(raw_category_dir(category) / "train")
    inside = [f for f in files if os.path.realpath(f).startswith(train + os.sep)]
    if inside:
        warn(f"{inside[0]}: {len(inside)} of the images are the model's training images ({train}); they score "
             "lower than new good images, so the threshold will be too low (use good images it was not fitted on)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model name from params.yaml `models:` that `dvc repro` fitted and evaluated")
    parser.add_argument("paths", nargs="+", help="good images: folders of them (the files directly inside) or files")
    parser.add_argument("--category", default=None,
                        help="which category's fit of the model (default: the only one the model is fitted for)")
    parser.add_argument("--false-alarms", type=fraction, default=0.01,
                        help="the share of good images the threshold may flag at most (default 0.01: 1 %%)")
    parser.add_argument("--confidence", type=fraction, default=0.95,
                        help="the confidence that the false-alarm rate is at most that (default 0.95)")
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES,
                        help="torch (default) or onnx: score with the runtime the line uses (they agree within 1e-4)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (torch runtime)")
    args = parser.parse_args(argv)
    check_name("models", args.model)
    device = resolve_device(args.device, "--device")
    category = choose_category(args.model, args.category)
    files = image_files(args.paths)
    given = " ".join(args.paths)
    if not files:
        raise PipelineError(f"{given}: no image files")
    needed = images_needed(args.false_alarms, args.confidence)
    if len(files) < needed:  # before anything is loaded or scored: no threshold could be written
        raise PipelineError(f"{given}: {too_few_message(len(files), args.false_alarms, args.confidence, 'images')}; "
                            "add good images or raise --false-alarms")
    warn_if_training_images(files, category)

    model = load_model(category, args.model, args.runtime, device)
    evaluate_threshold = model.threshold
    scores, failed = [], 0
    with tqdm(total=len(files), desc=f"calibrate {category}/{args.model}", unit="img") as bar:
        for outcome in score_files(model, files):
            bar.update()
            if outcome.error:
                print(f"error: {outcome.error}", file=sys.stderr)
                failed += 1
            else:
                scores.append(outcome.score)
    if failed:
        raise PipelineError(f"{failed} of {len(files)} image(s) could not be scored (named above); nothing written: "
                            "remove or replace them, every calibration image must be scored")
    record = deployment.build(model, scores, args.false_alarms, args.confidence, given, evaluate_threshold)
    path = deployment.write(record)
    print(f"{category}/{args.model}: {deployment.summary(record)} -> {path}")
    return 0


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
