"""Helpers every stage script shares: params, one-line errors, atomic outputs, seeds, devices."""
from __future__ import annotations

import contextlib
import csv
import glob
import itertools
import json
import os
import random
import re
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from stages.paths import TMP_ROOT


class PipelineError(Exception):
    """A problem the user can fix (bad param, missing file). Printed as one line, exit code 1."""


def load_params(path: str | Path = "params.yaml") -> dict:
    """params.yaml as DVC reads it, every section checked against its schema (stages/params.py)."""
    from stages.params import load_params as load_checked

    return load_checked(path)


def stage_args(stage: str, usage: str) -> tuple[dict, list[str]]:
    """`python -m stages.<stage> <category> [<name>]` -> (params, [category, name]); the category must be
    one of data.categories (dvc.yaml's matrix passes only those; a hand-typed one is checked)."""
    from stages.params import check_listed

    if len(sys.argv) - 1 != len(usage.split()):
        raise PipelineError(f"usage: python -m stages.{stage} {usage}")
    params = load_params()
    check_listed(params, sys.argv[1])
    return params, sys.argv[1:]


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
        clean_stale_temps()
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


_TEMP_NAME = re.compile(r"^(\d+)-")  # .tmp/<pid>-<n>-<name>
_temp_counter = itertools.count()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def temp_dir_for(final: Path) -> Path | None:
    """The project's TMP_ROOT when `final` is inside the project (the working directory) on the same
    filesystem, so a rename can move the result into place; None otherwise."""
    try:
        final.resolve().relative_to(Path.cwd().resolve())
        TMP_ROOT.mkdir(exist_ok=True)
        if os.stat(TMP_ROOT).st_dev == os.stat(final.parent).st_dev:
            return TMP_ROOT
    except (ValueError, OSError):
        pass
    return None


def clean_stale_temps() -> None:
    """Remove TMP_ROOT entries of runs that were killed (their PID is gone); a live run's stay."""
    if not TMP_ROOT.is_dir():
        return
    for entry in TMP_ROOT.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            remove_path(entry)


def _clean_stale_siblings(final: Path) -> None:
    """Older versions (and paths outside the project) put `.NAME.tmpPID` beside the output."""
    prefix = f".{final.name}.tmp"
    for entry in final.parent.glob(f"{glob.escape(prefix)}*"):
        pid = entry.name[len(prefix):]
        if pid.isdigit() and not _pid_alive(int(pid)):
            remove_path(entry)


def _temp_slot(final: Path) -> tuple[Path, Path]:
    """(what to remove afterwards, the temporary path to write) for `final`.

    In the project: a fresh folder TMP_ROOT/<pid>-<n>/ holding a path with `final`'s own name (file
    formats such as torch.save record the file name, so the bytes match a direct write). Outside
    the project (library use): the sibling `.NAME.tmpPID`.
    """
    folder = temp_dir_for(final)
    if folder is None:
        tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
        return tmp, tmp
    slot = folder / f"{os.getpid()}-{next(_temp_counter)}"
    remove_path(slot)
    slot.mkdir()
    return slot, slot / final.name


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path; move it onto `final` only if the block succeeds.

    A crash or an error leaves no half-written output that DVC could cache as valid. The temporary
    path lives in the project's TMP_ROOT (.tmp/, ignored by git and DVC), not beside `final`, so
    no temporary file ever appears in a folder that another stage declares as a dependency; a run
    killed with -9 leaves it there until the next stage starts (see clean_stale_temps).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_siblings(final)
    slot, tmp = _temp_slot(final)
    remove_path(tmp)
    try:
        yield tmp
    except BaseException:
        remove_path(slot)
        raise
    remove_path(final)
    os.replace(tmp, final)
    remove_path(slot)


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
