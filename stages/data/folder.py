"""The `folder` source: a local copy of a category in MVTec AD layout, copied into the project."""
from __future__ import annotations

import shutil
from pathlib import Path

from stages.core.errors import PipelineError
from stages.core.outputs import remove_path as _remove
from stages.data.archives import _reason, _sibling_tmpdir, install_dir
from stages.data.raw import check_layout


def copy_folder(source: Path, dest: Path) -> Path:
    """The `folder` source: copy an existing MVTec-layout category folder to `dest` (source untouched)."""
    source, dest = Path(source), Path(dest)
    check_layout(source)
    src_real, dest_real = source.resolve(), dest.resolve()
    if dest_real == src_real or src_real in dest_real.parents or dest_real in src_real.parents:
        raise PipelineError(f"{source}: source folder and destination {dest} overlap")
    staging = _sibling_tmpdir(dest, "tmp")
    try:
        target = staging / "copy"
        try:
            shutil.copytree(source, target, symlinks=False)
        except (shutil.Error, OSError) as exc:
            raise PipelineError(f"{source}: could not copy to {dest} ({_reason(exc)[:300]})") from exc
        install_dir(target, dest)
    finally:
        _remove(staging)
    return dest
