"""Score new images with a fitted model, exactly as `dvc repro` left it.

    python -m stages.predict <model> <image files or folders> [--category CATEGORY] [--out DIR]

--category picks which category's fit of the model to use; it may be left out when the model is
fitted for one category only. The model's own saved record says how its inputs were made (resize, crop, backbone, layers,
weights), so a model fitted at 224 px scores at 224 px whatever params.yaml says today; the
scoring params and the mean + n·σ threshold are the ones its evaluate stage used
(models/<category>.category/<model>.scoring.json). Writes DIR/scores.csv (image, score, anomalous, threshold) and one
heatmap overlay PNG per image (DIR/<name>_overlay.png). An image that cannot be read is reported on
one line and skipped; the others are still scored (exit code 1 if any was skipped).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stages.cli import run_main
from stages.errors import PipelineError
from stages.outputs import atomic_path, write_csv
from stages.runtime import resolve_device
from stages.data.raw import IMAGE_SUFFIXES
from stages.deployed import RUNTIMES, fitted_models, load_model
from stages.methods.base import Prediction
from stages.overlay import overlay
from stages.params import check_categories, check_name
from stages.paths import MODELS_ROOT

DEFAULT_OUT = Path("predictions")
CHUNK = 32  # images read and scored together: bounded memory for any number of files


def fitted_categories(name: str) -> list[str]:
    """The categories for which `dvc repro` has fitted and evaluated model `name`."""
    return [category for category, model in fitted_models() if model == name]


def choose_category(name: str, category: str | None) -> str:
    if category is not None:
        check_categories([category])
        return category
    categories = fitted_categories(name)
    if len(categories) == 1:
        return categories[0]
    if not categories:
        raise PipelineError(f"{MODELS_ROOT}: model '{name}' was never fitted and evaluated (run `dvc repro`)")
    raise PipelineError(f"model '{name}' is fitted for {', '.join(categories)}: pick one with --category")


def image_files(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to the image files directly inside them (sorted)."""
    files = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)  # even a missing or odd file: it gets its own one-line error
    return files


def unique_name(path: Path, used: set[str]) -> str:
    """<stem>_overlay.png, numbered when two inputs share a name (e.g. test/cut/000.png, test/hole/000.png)."""
    name, n = f"{path.stem}_overlay.png", 1
    while name in used:
        n += 1
        name = f"{path.stem}_{n}_overlay.png"
    used.add(name)
    return name


# Folders `dvc repro` writes (and DVC's and git's own): predictions never go inside them, where they
# would overwrite a stage output (evaluate's scores.csv is one) or be taken for one.
PIPELINE_FOLDERS = ("data", "models", "metrics", "plots", "dvc_plots", ".dvc", ".git", ".tmp", "stages")


def check_out(out: Path, overwrite: bool) -> None:
    """--out must be a folder of its own: never a pipeline folder, never someone's file, and only
    with --overwrite one that already holds files (an earlier run's, or anyone's)."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out}: exists and is not a folder (predictions go into a folder)")
    resolved, root = out.resolve(), Path.cwd().resolve()
    for folder in PIPELINE_FOLDERS:
        inside = root / folder
        if resolved == inside or inside in resolved.parents:
            raise PipelineError(f"--out {out}: inside {folder}/, which the pipeline writes or tracks; choose a folder "
                                f"outside it (default: {DEFAULT_OUT}/<category>/<model>)")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise PipelineError(f"--out {out}: already holds {len(held)} file(s) ({', '.join(held[:3])}"
                            f"{', ...' if len(held) > 3 else ''}); pass --overwrite to replace files of the same "
                            "names (nothing else is touched), or choose another folder")


def write_png(path: Path, picture: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")


def score_chunk(model, images: list[np.ndarray], paths: list[Path]) -> list[tuple[Path, Prediction | str]]:
    """Each path with its one-image prediction, or the reason it failed. Out of memory on the whole chunk,
    the images are tried one by one, so one oversized image fails alone (a last resort: the pixel
    bounds of stages/data/raw.py stop such images before they are decoded)."""
    try:
        prediction = model.score(np.stack(images), [p.name for p in paths])
        return [(path, prediction.row(i)) for i, path in enumerate(paths)]
    except MemoryError:
        if len(images) == 1:
            return [(paths[0], f"{paths[0]}: out of memory while scoring")]
    return [result for image, path in zip(images, paths) for result in score_chunk(model, [image], [path])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model name from params.yaml `models:` that `dvc repro` has fitted and evaluated")
    parser.add_argument("paths", nargs="+", help="image files or folders of images")
    parser.add_argument("--category", default=None,
                        help="which category's fit of the model (default: the only one the model is fitted for)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder, outside the pipeline's folders (default: {DEFAULT_OUT}/<category>/<model>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out that already holds files, replacing those of the same names")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (torch runtime)")
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES,
                        help="torch: the pipeline's own code (default); onnx: the exported graph (models/<category>.category/<model>.onnx)")
    args = parser.parse_args(argv)
    check_name("models", args.model)  # it names folders: no path may climb out of models/ or predictions/
    device = resolve_device(args.device, "--device")
    category = choose_category(args.model, args.category)
    out = args.out or DEFAULT_OUT / category / args.model
    check_out(out, args.overwrite)

    model = load_model(category, args.model, args.runtime, device)
    files = image_files(args.paths)
    if not files:
        raise PipelineError(f"no image files in {' '.join(args.paths)}")

    rows, failed, seconds, used = [], 0, 0.0, set()
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(files), desc=f"predict {category}/{args.model}", unit="img") as bar:
        for start in range(0, len(files), CHUNK):
            begin = time.perf_counter()
            images, paths = [], []
            for path in files[start : start + CHUNK]:
                try:
                    images.append(model.prepare(path))
                    paths.append(path)
                except PipelineError as exc:  # one bad file must not stop the others
                    print(f"error: {exc}", file=sys.stderr)
                    failed += 1
                except MemoryError:
                    print(f"error: {path}: out of memory while reading it", file=sys.stderr)
                    failed += 1
                bar.update()
            if not images:
                continue
            for image, (path, result) in zip(images, score_chunk(model, images, paths)):
                if isinstance(result, str):
                    print(f"error: {result}", file=sys.stderr)
                    failed += 1
                    continue
                score, name = float(result.image_scores[0]), ""
                if result.anomaly_maps is not None:
                    name = unique_name(path, used)
                    write_png(out / name, overlay(image, result.anomaly_maps[0], model.colour_scale))
                # the threshold rule of the metrics: score >= threshold is anomalous
                rows.append({"image": str(path), "score": score, "anomalous": int(score >= model.threshold),
                             "threshold": model.threshold, "overlay": name})
            seconds += time.perf_counter() - begin
    if rows:
        write_csv(out / "scores.csv", rows)
        flagged = sum(r["anomalous"] for r in rows)
        print(f"{category}/{args.model}: scored {len(rows)} image(s), {flagged} anomalous (score >= {model.threshold:.4g}), "
              f"{1000 * seconds / len(rows):.0f} ms per image -> {out}/scores.csv")
    if failed:
        print(f"error: {failed} of {len(files)} image(s) could not be scored (named above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
