"""Stage outputs written atomically: a temporary path moved into place only when complete.

A crash or an error leaves no half-written output that DVC could cache as valid. Temporaries live in
the project's TMP_ROOT (.tmp/, ignored by git and DVC), never inside a folder another stage depends
on; a run killed with -9 leaves them there until the next stage starts (clean_stale_temps).
"""
from __future__ import annotations

import contextlib
import csv
import glob
import itertools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from stages.core.errors import PipelineError
from stages.core.paths import TMP_ROOT


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
    try:
        _move_into_place(tmp, final)
    finally:
        remove_path(slot)


def _kind(path: Path) -> str:
    return "folder" if path.is_dir() and not path.is_symlink() else "file"


def _move_into_place(tmp: Path, final: Path) -> None:
    """A file replaces a file atomically; a folder replaces a folder. Never one by the other: a
    folder where a file is to go (or the reverse) is someone else's, so it is refused, not deleted."""
    if final.exists() or final.is_symlink():
        if _kind(final) != _kind(tmp):
            raise PipelineError(f"{final}: exists and is a {_kind(final)}, not the {_kind(tmp)} this would write; "
                                "left as it is (move it away or choose another path)")
        if _kind(final) == "folder":
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
