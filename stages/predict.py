"""Score new images with a fitted model, exactly as `dvc repro` left it.

    python -m stages.predict <model> <image files or folders> [--category CATEGORY] [--out DIR] [--runtime onnx]
    python -m stages.predict <model> --watch <folder>    # score images as they appear, until Ctrl-C

--category picks which category's fit of the model to use; it may be left out when the model is
fitted for one category only. The model's own saved record says how its inputs were made (resize, crop,
backbone, layers,
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

from stages.core.cli import run_main
from stages.core.device import resolve_device
from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path, write_csv
from stages.core.params import check_categories, check_name
from stages.core.paths import MODELS_ROOT
from stages.data.raw import IMAGE_SUFFIXES
from stages.deploy.overlay import overlay
from stages.deploy.runtimes import RUNTIMES, fitted_models, load_model
from stages.evaluation.threshold import flagged
from stages.methods.base import Prediction

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
            raise PipelineError(
                f"--out {out}: inside {folder}/, which the pipeline writes or tracks; choose a folder "
                f"outside it (default: {DEFAULT_OUT}/<category>/<model>)"
            )
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise PipelineError(
            f"--out {out}: already holds {len(held)} file(s) ({', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}); pass --overwrite to replace files of the same "
            "names (nothing else is touched), or choose another folder"
        )


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


class Run:
    """One predict run's outputs: rows of scores.csv and overlays in `out`, every file written by it."""

    def __init__(self, model, out: Path):
        self.model, self.out = model, out
        self.rows: list[dict] = []
        self.failed, self.seconds, self.used = 0, 0.0, set()

    def score(self, files: list[Path], bar) -> None:
        for start in range(0, len(files), CHUNK):
            begin = time.perf_counter()
            images, paths = [], []
            for path in files[start : start + CHUNK]:
                try:
                    images.append(self.model.prepare(path))
                    paths.append(path)
                except PipelineError as exc:  # one bad file must not stop the others
                    self.fail(str(exc))
                except MemoryError:
                    self.fail(f"{path}: out of memory while reading it")
                bar.update()
            if images:
                for image, (path, result) in zip(images, score_chunk(self.model, images, paths)):
                    if isinstance(result, str):
                        self.fail(result)
                    else:
                        self.record(path, image, result)
            self.seconds += time.perf_counter() - begin
        if self.rows:
            write_csv(self.out / "scores.csv", self.rows)  # rewritten whole, atomically, after every chunk

    def fail(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        self.failed += 1

    def record(self, path: Path, image: np.ndarray, result: Prediction) -> None:
        score, name = float(result.image_scores[0]), ""
        if result.anomaly_maps is not None:
            name = unique_name(path, self.used)
            write_png(self.out / name, overlay(image, result.anomaly_maps[0], self.model.colour_scale))
        self.rows.append(
            {
                "image": str(path),
                "score": score,
                "anomalous": int(flagged(score, self.model.threshold)),
                "threshold": self.model.threshold,
                "overlay": name,
            }
        )

    def summary(self) -> str:
        flagged = sum(r["anomalous"] for r in self.rows)
        per_image = 1000 * self.seconds / max(1, len(self.rows))
        return (
            f"{self.model.category}/{self.model.name}: scored {len(self.rows)} image(s), {flagged} anomalous "
            f"(score >= {self.model.threshold:.4g}), {per_image:.0f} ms per image -> {self.out}/scores.csv"
        )


def watch(run: Run, folder: Path, interval: float) -> None:
    """Score every image of `folder` once it has stopped growing (a file still being written is left
    for the next look), until interrupted (Ctrl-C, SIGTERM)."""
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop ends the loop as Ctrl-C
    print(f"watching {folder} (Ctrl-C to stop)", file=sys.stderr)
    seen: set[Path] = set()
    sizes: dict[Path, tuple[int, float]] = {}
    try:
        with tqdm(desc=f"watch {folder}", unit="img") as bar:
            while True:
                ready = []
                for path in image_files([str(folder)]):
                    if path in seen:
                        continue
                    stat = path.stat()
                    if sizes.get(path) == (stat.st_size, stat.st_mtime):  # unchanged since the last look
                        ready.append(path)
                    sizes[path] = (stat.st_size, stat.st_mtime)
                if ready:
                    seen.update(ready)
                    run.score(ready, bar)
                    print(run.summary(), file=sys.stderr)
                time.sleep(interval)
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", help="a model name from params.yaml `models:` that `dvc repro` has fitted and evaluated"
    )
    parser.add_argument("paths", nargs="*", help="image files or folders of images")
    parser.add_argument(
        "--watch",
        type=Path,
        default=None,
        help="a folder to watch (a production line's drop folder): every image is scored once it "
        "has been written, into the same scores.csv and overlays, until Ctrl-C",
    )
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between two looks at --watch's folder")
    parser.add_argument(
        "--category",
        default=None,
        help="which category's fit of the model (default: the only one the model is fitted for)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder, outside the pipeline's folders (default: {DEFAULT_OUT}/<category>/<model>)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out that already holds files, replacing those of the same names",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (torch runtime)")
    parser.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help="torch: the pipeline's own code (default); onnx: the exported graph "
        "(models/<category>.category/<model>.export/)",
    )
    args = parser.parse_args(argv)
    check_name("models", args.model)  # it names folders: no path may climb out of models/ or predictions/
    if not args.paths and args.watch is None:
        parser.error("give image files or folders, or --watch FOLDER")
    if args.watch is not None and not args.watch.is_dir():
        raise PipelineError(f"--watch {args.watch}: not a folder")
    device = resolve_device(args.device, "--device")
    category = choose_category(args.model, args.category)
    out = args.out or DEFAULT_OUT / category / args.model
    check_out(out, args.overwrite)
    if args.watch is not None and out.resolve() == args.watch.resolve():
        raise PipelineError(f"--out {out}: the watched folder itself (its overlays would be scored in turn)")

    model = load_model(category, args.model, args.runtime, device)
    files = image_files(args.paths)
    if args.paths and not files:
        raise PipelineError(f"no image files in {' '.join(args.paths)}")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(model, out)
    if files:
        with tqdm(total=len(files), desc=f"predict {category}/{args.model}", unit="img") as bar:
            run.score(files, bar)
    if args.watch is not None:
        watch(run, args.watch, args.interval)
    if run.rows:
        print(run.summary())
    if run.failed:
        print(
            f"error: {run.failed} of {run.failed + len(run.rows)} image(s) could not be scored (named above)",
            file=sys.stderr,
        )
    return 1 if run.failed else 0


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
