"""Published results to read beside ours: references/<name>.csv, named by `models.<model>.reference`.

One row per (dataset, category): `dataset` is the data source the numbers are for (mvtec, visa), the
category `mean` is a published mean over all of that dataset's categories, and each metric column
(image_auroc, pixel_auroc, aupro; fractions, as our metrics) is empty where nothing was published.
Every row names its `source` (a paper's table or the authors' published results file). A value is
compared with our bootstrap interval of the same metric, dataset and category only: a synthetic
"carpet" is never set beside MVTec AD's carpet.
"""
from __future__ import annotations

import csv
import math

from stages.core.errors import PipelineError
from stages.core.paths import reference_file

METRICS = ("image_auroc", "pixel_auroc", "aupro")
# Every category of each dataset a published mean is over (the data sources' own lists, stages/data/mvtec.py
# and visa.py, repeated here so the report does not depend on the download code; a test keeps them equal).
DATASET_CATEGORIES = {
    "mvtec": ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
              "tile", "toothbrush", "transistor", "wood", "zipper"),
    "visa": ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
             "pcb4", "pipe_fryum"),
}
COLUMNS = ("dataset", "category", *METRICS, "source")
MEAN = "mean"  # a published mean over every category of the dataset


def read_table(name: str) -> dict[tuple[str, str], dict[str, float | None]]:
    """references/<name>.csv -> {(dataset, category): {metric: value or None}}; a malformed row is one
    line naming the file and the row."""
    path = reference_file(name)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise PipelineError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(COLUMNS)})")
            table: dict[tuple[str, str], dict[str, float | None]] = {}
            for row in reader:
                at = f"{path} line {reader.line_num}"
                key = ((row["dataset"] or "").strip(), (row["category"] or "").strip())
                if not all(key):
                    raise PipelineError(f"{at}: dataset and category must be given")
                if key in table:
                    raise PipelineError(f"{at}: {key[0]}/{key[1]} is listed twice")
                if not (row["source"] or "").strip():
                    raise PipelineError(f"{at}: no source (every published value names where it comes from)")
                table[key] = {metric: _value(row[metric], f"{at}: {metric}") for metric in METRICS}
    except OSError as exc:
        raise PipelineError(f"{path}: unreadable ({exc.strerror or exc})") from exc
    return table


def _value(text: str | None, where: str) -> float | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise PipelineError(f"{where}: {text!r} is not a number") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise PipelineError(f"{where}: {text} is not a fraction in [0, 1] (write 0.992, not 99.2)")
    return value


def inside(value: float | None, low: float | None, high: float | None) -> bool | None:
    """Whether a published value lies in our interval [low, high]; None when either is missing."""
    if value is None or low is None or high is None:
        return None
    return low <= value <= high
