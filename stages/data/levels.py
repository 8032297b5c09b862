"""The difficulty level of each defective test image: `levels.csv` at a category's root.

The synthetic generator writes it (stages/data/synthetic.py); preprocess reads it into the prepared
test split (`levels`: 1..L per image, 0 for good images; `ladder`: each level's physical values), and
evaluate scores each level apart. Categories without the file (MVTec AD, VisA, most folders) have no
levels, and everything per level is then absent.

Columns: image (relative to the category root, e.g. test/cut/003.png), level (1 = the first, easiest,
rung of the ladder), delta_e, area, width (the level's definition: mean CIE76 ΔE*ab against the
defect-free carpet, pixels in the mask, width of threads and cuts in px), delta_e_measured (the mean
ΔE*ab this image reached; empty where unknown). A folder the user supplies may carry its own file:
it is checked row by row, and every error names the file.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path

LEVELS_FILE = "levels.csv"
COLUMNS = ("image", "level", "delta_e", "area", "width", "delta_e_measured")
LADDER_COLUMNS = ("delta_e", "area", "width")  # the columns of a prepared split's `ladder`
MAX_BYTES = 16 * 2**20  # a levels file is one short line per test image
MAX_LEVELS = 1000


@dataclass(frozen=True)
class LevelRow:
    image: str
    level: int
    delta_e: float
    area: int
    width: float
    delta_e_measured: float | None = None


def write_levels(root: Path, rows: list[LevelRow]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        measured = "" if row.delta_e_measured is None else f"{row.delta_e_measured:.4f}"
        writer.writerow([row.image, row.level, f"{row.delta_e:g}", row.area, f"{row.width:g}", measured])
    with atomic_path(Path(root) / LEVELS_FILE) as tmp:
        tmp.write_text(buffer.getvalue())


def _number(path: Path, line: int, column: str, text: str, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise PipelineError(f"{path}: line {line}: {column} must be {'an integer' if integer else 'a number'}, "
                            f"got {text[:40]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise PipelineError(f"{path}: line {line}: {column} must be positive, got {text[:40]!r}")
    return value


def read_levels(root: Path, test_names: list[str], labels) -> tuple[np.ndarray, np.ndarray] | None:
    """(levels, ladder) for the test images `test_names` (as listed by stages.data.raw, labels 0 good /
    1 defective), or None when the category has no levels file.

    levels: (N,) int64, the level (1..L) of each defective image, 0 for good ones; ladder: (L, 3)
    float64, each level's delta_e, area and width. Every defective test image must have exactly one
    row, good ones none, and a level's definition must be the same on every row.
    """
    path = Path(root) / LEVELS_FILE
    if not path.exists():
        return None
    if not path.is_file():
        raise PipelineError(f"{path}: not a regular file")
    if path.stat().st_size > MAX_BYTES:
        raise PipelineError(f"{path}: larger than {MAX_BYTES // 2**20} MiB (one line per test image expected)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc})") from exc
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != COLUMNS:
        raise PipelineError(f"{path}: the first line must be {','.join(COLUMNS)}")
    index = {name: i for i, name in enumerate(test_names)}
    labels = np.asarray(labels)
    levels = np.zeros(len(test_names), dtype=np.int64)
    definitions: dict[int, tuple[float, float, float]] = {}
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(COLUMNS):
            raise PipelineError(f"{path}: line {line}: expected {len(COLUMNS)} columns, got {len(row)}")
        image = row[0]
        if image not in index:
            raise PipelineError(f"{path}: line {line}: {image[:80]!r} is not a test image of this category")
        i = index[image]
        if labels[i] == 0:
            raise PipelineError(f"{path}: line {line}: {image} is a good image (only defective ones have a level)")
        if levels[i]:
            raise PipelineError(f"{path}: line {line}: {image} listed twice")
        level = int(_number(path, line, "level", row[1], integer=True))
        if level > MAX_LEVELS:
            raise PipelineError(f"{path}: line {line}: level {level} (at most {MAX_LEVELS})")
        definition = tuple(_number(path, line, column, row[c]) for c, column in enumerate(LADDER_COLUMNS, start=2))
        if definitions.setdefault(level, definition) != definition:
            raise PipelineError(f"{path}: line {line}: level {level} defined as {definition}, "
                                f"earlier as {definitions[level]}")
        if row[5]:
            _number(path, line, "delta_e_measured", row[5])
        levels[i] = level
    missing = [name for name, label, level in zip(test_names, labels, levels) if label == 1 and not level]
    if missing:
        raise PipelineError(f"{path}: no level for {len(missing)} defective test image(s), e.g. {missing[0]}")
    if not definitions:  # a ladder without defective test images: nothing to score per level
        return None
    used = sorted(definitions)
    if used != list(range(1, len(used) + 1)):
        raise PipelineError(f"{path}: levels must be numbered 1, 2, ... without gaps, got {used}")
    ladder = np.array([definitions[level] for level in used], dtype=np.float64).reshape(-1, 3)
    return levels, ladder
