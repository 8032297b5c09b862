"""The `folder` source: a local copy of a category in MVTec AD layout, copied into the project.

Only what preprocess reads is copied: the images of train/good and test/<type>, and the masks of
ground_truth/<type>/<stem>_mask.png, each decoded first through the bounded reader of every image
(stages/data/raw.py). Nothing else in the folder is opened: a `notes.txt` linked to /dev/zero, a
linked folder of unrelated files, a README. A link is followed only when it stays inside the category
folder (a test image linked to a training one, say); one that leaves it is refused with one line,
before anything it points at is read.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from stages.core.errors import PipelineError
from stages.core.outputs import remove_path as _remove
from stages.data.archives import CHUNK, _reason, _sibling_tmpdir, install_dir
from stages.data.raw import check_layout, list_category, verify_category


def category_files(source: Path) -> list[Path]:
    """The image and mask files of the category at `source` (relative paths), each checked to be a regular
    file inside the category folder once its links are resolved."""
    train, test, _ = list_category(source)
    inside = source.resolve()
    files = []
    for item in train + test:
        for path in (item.path, item.mask_path):
            if path is None:
                continue
            real = path.resolve()
            if not real.is_relative_to(inside):
                raise PipelineError(f"{path}: a link to a file outside the category folder {source}; copy the file "
                                    "into the folder instead (the folder source reads nothing outside it)")
            files.append(path.relative_to(source))
    return files


def _copy_regular(source: Path, target: Path) -> None:
    """Copy a regular file's bytes as they are when it is opened: no more than its size then (a file that
    grows meanwhile is cut there), and never a FIFO or device."""
    with open(source, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as src:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PipelineError(f"{source}: not a regular file (a folder, FIFO or device)")
        left = info.st_size
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            while left > 0:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)


def copy_folder(source: Path, dest: Path) -> Path:
    """The `folder` source: check, decode and copy an MVTec-layout category folder's images and masks to
    `dest` (source untouched, nothing else of it read)."""
    source, dest = Path(source), Path(dest)
    check_layout(source)
    src_real, dest_real = source.resolve(), dest.resolve()
    if dest_real == src_real or src_real in dest_real.parents or dest_real in src_real.parents:
        raise PipelineError(f"{source}: source folder and destination {dest} overlap")
    files = category_files(source)  # links that leave the folder: refused before anything is decoded
    verify_category(source)  # every image and mask decoded, bounded, masks against their images
    staging = _sibling_tmpdir(dest, "tmp")
    try:
        target = staging / "copy"
        target.mkdir()
        for relative in files:
            try:
                _copy_regular(source / relative, target / relative)
            except OSError as exc:
                raise PipelineError(f"{source / relative}: could not copy to {dest} ({_reason(exc)[:200]})") from exc
        install_dir(target, dest)
    finally:
        _remove(staging)
    return dest

