"""Reading back what the evaluate and compare stages wrote (metrics/models/*.metrics.json,
data/evaluations/*.resamples.npz, metrics/comparison.json), checked before report and compare use it.

These are DVC outputs: they travel (a remote, a colleague's push) and can be edited by hand. A file
that is not what the stage writes is one line naming it, never a traceback; JSON is read strictly (no
NaN or Infinity, no number that overflows to inf, bounded depth and size), so nothing non-finite reaches
metrics/summary.json, and a .npz must be stored as np.savez stores it (no compressed members, no more
bytes declared than the file holds) before numpy reads a member.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from stages.core.errors import PipelineError
from stages.core.torch_files import check_stored

MAX_JSON_BYTES = 64 * 2**20  # a category's metrics are a few kB; comparison.json grows as models^2 x categories


class _NotFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"{text[:40]} is not a finite number")
    return value


def _constant(text: str):
    raise _NotFinite(f"{text} is not a number JSON allows")


def read_json(path: Path, what: str, remedy: str):
    """The JSON at `path`, strictly: one line naming the file if it is unreadable or not finite."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise PipelineError(f"{path}: {path.stat().st_size:,} bytes, more than any {what} ({MAX_JSON_BYTES:,}; "
                                f"{remedy})")
        return json.loads(path.read_text(), parse_float=_finite_float, parse_constant=_constant)
    except _NotFinite as exc:
        raise PipelineError(f"{path}: not a {what} ({exc}; {remedy})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:100] or type(exc).__name__
        raise PipelineError(f"{path}: not readable JSON ({type(exc).__name__}: {reason}; {remedy})") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_numbers(mapping) -> bool:
    return isinstance(mapping, dict) and all(v is None or _number(v) for v in mapping.values())


def read_metrics(path: Path, remedy: str, numbers: tuple[str, ...] = ()) -> dict:
    """A model's metrics file as evaluate writes it; `numbers` are the keys the caller reads as numbers
    (each a number or null)."""
    record = read_json(path, "metrics file of the evaluate stage", remedy)

    def bad(reason: str) -> PipelineError:
        return PipelineError(f"{path}: not a metrics file of the evaluate stage ({reason}; {remedy})")

    if not isinstance(record, dict):
        raise bad(f"holds a {type(record).__name__}, not a mapping")
    for key in ("method", "backbone"):
        if not isinstance(record.get(key), str):
            raise bad(f"{key} is not a string")
    seeds, per_seed = record.get("seeds"), record.get("per_seed")
    if not isinstance(seeds, list) or not seeds:
        raise bad("seeds is not a non-empty list")
    if not isinstance(per_seed, dict) or not per_seed or not all(isinstance(v, dict) for v in per_seed.values()):
        raise bad("per_seed is not a mapping of each seed's metrics")
    for values in per_seed.values():
        for key in numbers:
            if values.get(key) is not None and not _number(values[key]):
                raise bad(f"per_seed's {key} is not a number")
    for key in numbers:
        if record.get(key) is not None and not _number(record[key]):
            raise bad(f"{key} is not a number or null")
    for key in ("seed_std", "per_defect_auroc"):
        if key in record and not _optional_numbers(record[key]):
            raise bad(f"{key} is not a mapping of numbers")
    interval = record.get("interval", {})
    if not isinstance(interval, dict):
        raise bad("interval is not a mapping")
    for key in numbers:
        bounds = interval.get(key)
        if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2 and all(map(_number, bounds))):
            raise bad(f"interval's {key} is not [low, high]")
    return record


def read_resamples(path: Path, remedy: str) -> dict[str, np.ndarray]:
    """Each metric's values over the bootstrap resamples: 1-D numeric arrays, read without pickle."""
    path = Path(path)
    check_stored(path, "resamples file of the evaluate stage", remedy)  # an .npz is a zip: no inflating bombs
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        reason = " ".join(str(exc).split())[:100] or type(exc).__name__
        raise PipelineError(f"{path}: not a readable resamples file ({reason}; {remedy})") from None
    for name, values in arrays.items():
        if values.ndim != 1 or values.dtype.kind not in "fiu":
            raise PipelineError(f"{path}: its {name[:40]!r} is not a list of numbers ({remedy})")
    return arrays


def read_comparison(path: Path, remedy: str) -> dict:
    """compare's comparison.json, as report reads it: per metric, intervals of (category, model, low, high)."""
    record = read_json(path, "comparison of the compare stage", remedy)
    metrics = record.get("metrics") if isinstance(record, dict) else None
    good = isinstance(metrics, dict) and all(
        isinstance(result, dict) and isinstance(result.get("intervals"), list)
        and all(isinstance(r, dict) and isinstance(r.get("category"), str) and isinstance(r.get("model"), str)
                and _number(r.get("low")) and _number(r.get("high")) for r in result["intervals"])
        for result in metrics.values()
    )
    if not good:
        raise PipelineError(f"{path}: not a comparison of the compare stage (metrics with intervals; {remedy})")
    return record
