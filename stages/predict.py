"""Score new images with a fitted model, exactly as `dvc repro` left it.

    python -m stages.predict <model> <image files or folders> [--category CATEGORY] [--out DIR] [--runtime onnx]
    python -m stages.predict <model> --watch <folder>    # score images as they appear, until Ctrl-C

--category picks which category's fit of the model to use; it may be left out when the model is
fitted for one category only. The model's own saved record says how its inputs were made (resize, crop,
backbone, layers, weights), so a model fitted at 224 px scores at 224 px whatever params.yaml says
today; the scoring params are the ones its evaluate stage used (models/<category>.category/<model>.scoring.json).
The threshold is the one `python -m stages.calibrate` set on your own good images
(deployments/<category>.category/<model>.deployment.json) when there is one, else evaluate's; the
first line says which and where it came from (--threshold-from evaluate ignores the deployment file;
one calibrated for another fit of the model is refused, never used silently). `--watch` reads it
once, at its start: restart it after calibrating (it resumes where it stopped).
Writes DIR/scores.csv (image, score, anomalous, threshold, overlay) and one heatmap overlay PNG per
image (DIR/<name>_overlay.png). An image that cannot be read or scored is reported on one line
naming it and skipped; the others are still scored (exit code 1 if any was skipped).

--watch can be stopped and started again on the same --out: it keeps the rows of scores.csv and
scores only the files not in it yet. A file or the folder itself that vanishes is a warning (the
watcher waits for the folder to come back); a file that cannot be decoded (still being written, or
paused mid-copy) is tried again once it is stable, up to MAX_READ_ATTEMPTS times, then one error line.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from stages.core.cli import run_main
from stages.core.device import resolve_device
from stages.core.errors import PipelineError, warn
from stages.core.outputs import atomic_path, write_csv
from stages.core.params import check_name
from stages.data.raw import IMAGE_SUFFIXES
from stages.deploy import deployment
from stages.deploy.batch import CHUNK, Scored, choose_category, image_files, score_files
from stages.deploy.overlay import overlay
from stages.deploy.runtimes import RUNTIMES, load_model
from stages.evaluation.threshold import flagged

DEFAULT_OUT = Path("predictions")
COLUMNS = ["image", "score", "anomalous", "threshold", "overlay"]
MAX_READ_ATTEMPTS = 5  # --watch: tries of a file that does not decode, waiting 2, 4, 8, 16 intervals in between


def unique_name(path: Path, used: set[str]) -> str:
    """<stem>_overlay.png, numbered when two inputs share a name (e.g. test/cut/000.png, test/hole/000.png)."""
    name, n = f"{path.stem}_overlay.png", 1
    while name in used:
        n += 1
        name = f"{path.stem}_{n}_overlay.png"
    used.add(name)
    return name


# Folders `dvc repro` writes or depends on (weights/ is a dependency of extract and every export), the
# deployment thresholds, and DVC's and git's own: predictions never go inside them, where they would
# overwrite a stage output (evaluate's scores.csv is one), be taken for one, or make stages out of date.
PIPELINE_FOLDERS = ("data", "models", "metrics", "plots", "dvc_plots", "weights", str(deployment.DEPLOYMENTS_ROOT),
                    ".dvc", ".git", ".tmp", "stages")


def check_out(out: Path, overwrite: bool, resume: bool = False) -> list[dict]:
    """--out must be a folder of its own: never a pipeline folder, never someone's file, and only
    with --overwrite one that already holds files (an earlier run's, or anyone's); with `resume`
    (--watch), a folder of predict's own outputs is continued: its scores.csv rows are returned."""
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
    if held and resume and all(n == "scores.csv" or n.endswith("_overlay.png") for n in held):
        return earlier_rows(out / "scores.csv")
    if held and not overwrite:
        raise PipelineError(
            f"--out {out}: already holds {len(held)} file(s) ({', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}); pass --overwrite to replace files of the same "
            "names (nothing else is touched), or choose another folder"
            + (" (--watch continues a folder that holds only scores.csv and overlays)" if resume else "")
        )
    return []


def earlier_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's scores.csv (none when it has none yet), each checked."""
    if not path.exists():
        return []
    remedy = "pass --overwrite to start it over, or choose another --out"
    if path.is_symlink() or not path.is_file():
        raise PipelineError(f"{path}: not a regular file, so not the scores.csv predict writes; {remedy}")
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != COLUMNS:
                raise PipelineError(f"{path}: columns {reader.fieldnames}, not predict's {COLUMNS}; {remedy}")
            rows = []
            for line, row in enumerate(reader, start=2):
                if not (row["image"] and _number(row["score"]) and row["anomalous"] in ("0", "1")
                        and _number(row["threshold"]) and None not in row):
                    raise PipelineError(f"{path}: line {line} is not a row predict writes; {remedy}")
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"{path}: not readable ({type(exc).__name__}: {exc}); {remedy}") from None
    return rows


def _number(text: str | None) -> bool:
    try:
        return text is not None and math.isfinite(float(text))
    except ValueError:
        return False


def write_png(path: Path, picture) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")


class Run:
    """One predict run's outputs: rows of scores.csv (an earlier run's first, when resumed) and overlays in `out`."""

    def __init__(self, model, out: Path, rows: list[dict] | None = None):
        self.model, self.out = model, out
        self.rows: list[dict] = list(rows or [])
        self.resumed = len(self.rows)
        self.failed, self.seconds = 0, 0.0
        self.used = {r["overlay"] for r in self.rows if r["overlay"]}
        self.used |= {p.name for p in out.glob("*_overlay.png")} if out.is_dir() else set()  # never overwritten

    def score(self, files: list[Path], bar, defer_read_errors: bool = False) -> list[Scored]:
        """Score `files` into the rows and overlays; failures get their one line, except that with
        `defer_read_errors` (--watch) the files that could not be read are returned for it to decide."""
        deferred, unsaved = [], 0
        begin = time.perf_counter()
        try:
            for outcome in score_files(self.model, files):
                bar.update()
                if outcome.error is None:
                    self.record(outcome)
                    unsaved += 1
                elif outcome.stage == "read" and defer_read_errors:
                    deferred.append(outcome)
                else:
                    self.fail(outcome.error)
                if unsaved >= CHUNK:
                    self.save()
                    unsaved = 0
        finally:  # stopped midway (Ctrl-C, SIGTERM): the rows of the overlays already written are kept
            self.seconds += time.perf_counter() - begin
            if unsaved:
                self.save()
        return deferred

    def save(self) -> None:
        write_csv(self.out / "scores.csv", self.rows, COLUMNS)  # rewritten whole, atomically

    def fail(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        self.failed += 1

    def record(self, outcome: Scored) -> None:
        score, name = outcome.score, ""
        if outcome.prediction.anomaly_maps is not None:
            name = unique_name(outcome.path, self.used)
            picture = overlay(outcome.image, outcome.prediction.anomaly_maps[0], self.model.colour_scale)
            write_png(self.out / name, picture)
        self.rows.append(
            {
                "image": str(outcome.path),
                "score": score,
                "anomalous": int(flagged(score, self.model.threshold)),
                "threshold": self.model.threshold,
                "overlay": name,
            }
        )

    def summary(self) -> str:
        new = self.rows[self.resumed :]
        anomalous = sum(int(r["anomalous"]) for r in new)
        per_image = 1000 * self.seconds / max(1, len(new))
        earlier = f" (+{self.resumed} from before)" if self.resumed else ""
        return (
            f"{self.model.category}/{self.model.name}: scored {len(new)} image(s){earlier}, {anomalous} anomalous "
            f"(score >= {self.model.threshold:.4g}), {per_image:.0f} ms per image -> {self.out}/scores.csv"
        )


@dataclass
class Pending:
    """A file --watch has seen but not scored yet: its size and mtime at the last look, and its tries."""

    signature: tuple[int, int]
    attempts: int = 0
    first_failure: float = 0.0
    retry_at: float = 0.0


def listed_images(folder: Path) -> list[Path]:
    """The image files directly in `folder` (OSError when the folder itself is gone or unreadable)."""
    return sorted(
        folder / entry.name for entry in os.scandir(folder)
        if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file()
    )


class Watcher:
    """--watch: every image of `folder` scored once it has stopped growing (a file still being written
    is left for the next look), the files of `run`'s earlier rows skipped, until Ctrl-C or SIGTERM."""

    def __init__(self, run: Run, folder: Path, interval: float):
        self.run, self.folder, self.interval = run, folder, interval
        self.done_real = {os.path.realpath(r["image"]) for r in run.rows}  # scored, or given up on
        self.done: set[Path] = set()
        self.pending: dict[Path, Pending] = {}
        self.folder_gone = False

    def look(self, bar) -> None:
        try:
            listed = listed_images(self.folder)
        except OSError as exc:  # gone (unmounted, removed) or unreadable: wait for it, say so once
            if not self.folder_gone:
                warn(f"{self.folder}: the watched folder is gone or unreadable ({type(exc).__name__}); "
                     "waiting for it to come back")
                self.folder_gone = True
            return
        if self.folder_gone:
            print(f"{self.folder}: the watched folder is back", file=sys.stderr)
            self.folder_gone = False
        present = set(listed)
        for path in [p for p in self.pending if p not in present]:
            self.vanished(path)
        ready, now = [], time.monotonic()
        for path in listed:
            if path in self.done:
                continue
            if os.path.realpath(path) in self.done_real:
                self.done.add(path)
                continue
            try:
                stat = path.stat()
            except OSError:
                self.vanished(path)
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            state = self.pending.get(path)
            if state is None:  # found now: scored at the earliest on the next look, if unchanged by then
                self.pending[path] = Pending(signature)
            elif state.signature != signature:  # still being written: its tries start again once it is stable
                state.signature, state.attempts, state.retry_at = signature, 0, 0.0
            elif now >= state.retry_at:
                ready.append(path)
        if ready:
            self.score(ready, bar)

    def score(self, ready: list[Path], bar) -> None:
        unread = {outcome.path: outcome for outcome in self.run.score(ready, bar, defer_read_errors=True)}
        for path in ready:
            if path not in unread:
                self.finish(path)
        for path, outcome in unread.items():
            state = self.pending[path]
            state.attempts += 1
            if not path.exists():
                self.vanished(path)
            elif state.attempts >= MAX_READ_ATTEMPTS:
                self.run.fail(f"{outcome.error} (gave up after {state.attempts} tries over "
                              f"{time.monotonic() - state.first_failure:.1f} s)")
                self.finish(path)
            else:
                if state.attempts == 1:
                    state.first_failure = time.monotonic()
                state.retry_at = time.monotonic() + self.interval * 2**state.attempts  # maybe paused mid-write
        if len(ready) > len(unread):
            print(self.run.summary(), file=sys.stderr)

    def finish(self, path: Path) -> None:
        self.done.add(path)
        self.done_real.add(os.path.realpath(path))
        self.pending.pop(path, None)

    def vanished(self, path: Path) -> None:
        self.pending.pop(path, None)
        warn(f"{path}: vanished before it was scored")

    def run_forever(self) -> None:
        import signal

        signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop ends the loop as Ctrl-C
        print(f"watching {self.folder} (Ctrl-C to stop)", file=sys.stderr)
        try:
            with tqdm(desc=f"watch {self.folder}", unit="img") as bar:
                while True:
                    self.look(bar)
                    time.sleep(self.interval)
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
        "has been written, into the same scores.csv and overlays, until Ctrl-C; started again on the "
        "same --out, it continues scores.csv and skips the files already in it",
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
    parser.add_argument(
        "--threshold-from",
        default="auto",
        choices=deployment.THRESHOLD_FROM,
        help="auto (default): the deployment file python -m stages.calibrate wrote, when there is one, else "
        "evaluate's threshold; deployment: that file or an error; evaluate: evaluate's threshold",
    )
    args = parser.parse_args(argv)
    check_name("models", args.model)  # it names folders: no path may climb out of models/ or predictions/
    if not args.paths and args.watch is None:
        parser.error("give image files or folders, or --watch FOLDER")
    if args.watch is not None and not args.watch.is_dir():
        raise PipelineError(f"--watch {args.watch}: not a folder")
    if not (args.interval > 0 and math.isfinite(args.interval)):
        raise PipelineError(f"--interval {args.interval}: must be a positive number of seconds")
    device = resolve_device(args.device, "--device")
    category = choose_category(args.model, args.category)
    out = args.out or DEFAULT_OUT / category / args.model
    earlier = check_out(out, args.overwrite, resume=args.watch is not None)
    if args.watch is not None and out.resolve() == args.watch.resolve():
        raise PipelineError(f"--out {out}: the watched folder itself (its overlays would be scored in turn)")

    model = load_model(category, args.model, args.runtime, device)
    choice = deployment.choose(model, model.threshold, args.threshold_from)
    deployment.apply(model, choice, model.colour_scale)
    print(choice.line, file=sys.stderr)
    files = image_files(args.paths)
    if args.paths and not files:
        raise PipelineError(f"no image files in {' '.join(args.paths)}")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(model, out, earlier)
    if earlier:
        print(f"resuming {out}/scores.csv: {len(earlier)} row(s) from before are kept, their files not scored again",
              file=sys.stderr)
        scored = {os.path.realpath(r["image"]) for r in earlier}
        files = [f for f in files if os.path.realpath(f) not in scored]
    if files:
        with tqdm(total=len(files), desc=f"predict {category}/{args.model}", unit="img") as bar:
            run.score(files, bar)
    if args.watch is not None:
        Watcher(run, args.watch, args.interval).run_forever()
    if len(run.rows) > run.resumed:
        print(run.summary())
    if run.failed:
        print(
            f"error: {run.failed} of {run.failed + len(run.rows) - run.resumed} image(s) could not be scored "
            "(named above)",
            file=sys.stderr,
        )
    return 1 if run.failed else 0


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
