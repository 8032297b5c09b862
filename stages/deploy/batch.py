"""Image files scored with a fitted model, in bounded chunks, each image's failure its own one-line
message: the code `python -m stages.predict`, its `--watch` and `python -m stages.calibrate` share,
so a threshold calibrated on a folder holds for the same folder's images in predict.

What counts as one image's failure (the others go on): the pipeline's own one-line errors, running out
of memory (torch's CPU allocator raises RuntimeError, not MemoryError), the numeric and I/O errors of
numpy, Pillow and torch (ValueError, OverflowError, OSError) and onnxruntime's own exception types.
Anything else (TypeError, KeyError, AttributeError, ...) is a programming error: it is not caught
here, so it stops the run with its traceback instead of being reported as a bad image.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from stages.core.errors import PipelineError
from stages.core.params import check_categories
from stages.core.paths import MODELS_ROOT
from stages.data.raw import IMAGE_SUFFIXES
from stages.deploy.runtimes import fitted_models
from stages.methods.base import Prediction

CHUNK = 32  # images read and scored together: bounded memory for any number of files
_ONNXRUNTIME_ERRORS = "onnxruntime.capi.onnxruntime_pybind11_state"


def image_failures() -> tuple[type[BaseException], ...]:
    """The exception types that mean 'this image could not be read or scored' (module docstring)."""
    types: list[type[BaseException]] = [PipelineError, MemoryError, RuntimeError, ValueError, OverflowError, OSError]
    ort = sys.modules.get(_ONNXRUNTIME_ERRORS)  # only loaded when the onnx runtime is in use: only it raises them
    if ort is not None:
        types += [v for v in vars(ort).values() if isinstance(v, type) and issubclass(v, Exception)]
    return tuple(types)


def describe(exc: BaseException, label, doing: str) -> str:
    """One line naming the image (`label`) and, unless it is the pipeline's own message, the exception type."""
    label = str(label)
    if isinstance(exc, PipelineError):
        message = str(exc)
        return message if message.startswith(label) else f"{label}: {message}"
    if isinstance(exc, MemoryError):
        return f"{label}: out of memory while {doing} it"
    first = (str(exc).strip().splitlines() or [""])[0]
    first = first if len(first) <= 200 else first[:200] + "..."
    return f"{label}: could not be {'read' if doing == 'reading' else 'scored'} ({type(exc).__name__}" + (
        f": {first})" if first else ")")


def non_finite(score: float, label) -> str | None:
    """A NaN or infinite score would be 'normal' (NaN >= t is false) without a word: it is an error."""
    return None if np.isfinite(score) else f"{label}: the model gave a {score} score (a damaged model file?)"


@dataclass
class Scored:
    """One file's outcome: its prepared image and one-image prediction, or why it failed and where."""

    path: Path
    image: np.ndarray | None = None
    prediction: Prediction | None = None
    error: str | None = None
    stage: str = ""  # "read" or "score" when it failed

    @property
    def score(self) -> float:
        return float(self.prediction.image_scores[0])


def score_files(model, files: list[Path], chunk: int = CHUNK) -> Iterator[Scored]:
    """Each file's outcome, chunk by chunk (a chunk's read failures first, then its scored images in order)."""
    failures = image_failures()
    for start in range(0, len(files), chunk):
        prepared = []
        for path in files[start : start + chunk]:
            try:
                prepared.append((path, model.prepare(path)))
            except failures as exc:  # one bad file must not stop the others
                yield Scored(path, error=describe(exc, path, "reading"), stage="read")
        yield from score_prepared(model, prepared)


def score_prepared(model, items: list[tuple[Path, np.ndarray]]) -> list[Scored]:
    """Prepared images scored together; if that fails, one by one, so one image that cannot be scored
    (out of memory, a model that fails on it) fails alone."""
    if not items:
        return []
    failures = image_failures()
    try:
        prediction = model.score(np.stack([image for _, image in items]), [path.name for path, _ in items])
    except failures as exc:
        if len(items) == 1:
            path, image = items[0]
            return [Scored(path, image, error=describe(exc, path, "scoring"), stage="score")]
        return [outcome for item in items for outcome in score_prepared(model, [item])]
    outcomes = []
    for i, (path, image) in enumerate(items):
        row = prediction.row(i)
        error = non_finite(float(row.image_scores[0]), path)
        outcomes.append(Scored(path, image, error=error, stage="score") if error else Scored(path, image, row))
    return outcomes


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
