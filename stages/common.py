"""Helpers every stage script shares: params, one-line errors, atomic outputs, seeds, devices."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import yaml


class PipelineError(Exception):
    """A problem the user can fix (bad param, missing file). Printed as one line, exit code 1."""


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found (run from the project root)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(params, dict):
        raise PipelineError(f"{path}: expected a mapping at the top level")
    return params


def param(params: dict, dotted: str, default: Any = ...) -> Any:
    """Look up 'a.b.c' in params; a missing key without default names the param in the error."""
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            if default is ...:
                raise PipelineError(f"params.yaml: missing parameter '{dotted}'")
            return default
        node = node[key]
    return node


def check(condition: bool, message: str) -> None:
    if not condition:
        raise PipelineError(message)


def warn(message: str) -> None:
    """A problem that does not stop the stage but may make a result misleading: one stderr line."""
    print(f"warning: {message}", file=sys.stderr)


def run_main(main: Callable[[], None]) -> None:
    """Run a stage: PipelineError -> 'error: ...' on stderr and exit 1; other crashes keep their traceback."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:  # an unexpected crash: keep the traceback, still exit non-zero
        traceback.print_exc()
        sys.exit(2)


def remove_path(path: Path) -> None:
    """Delete a file, link or folder if it is there (cleanup must not fail on what is already gone)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; move it onto `final` only if the block succeeds.

    A crash or an error leaves no half-written output that DVC could cache as valid.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
    remove_path(tmp)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    remove_path(final)
    os.replace(tmp, final)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows of dicts as CSV (columns: the first row's keys unless given; missing cells stay empty)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns or list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    import torch

    torch.manual_seed(seed)


def resolve_device(name: str) -> str:
    """'auto' picks a GPU when one is present; anything else is passed to torch as is."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"params.yaml: device '{name}' requested but no CUDA GPU is available")
    return str(name)
