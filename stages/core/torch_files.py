"""Reading the torch files that travel (fitted models, cached features): tensors and plain data only.

A torch file is a pickle, and a pickle can run any code while it loads. A model.pt pulled from a
DVC remote passes DVC's hash check whatever it holds (dvc.lock carries the hash of what was pushed),
so every file is loaded with `weights_only=True`: tensors, dicts, lists, strings and numbers come
back, anything else (a crafted `__reduce__`) is refused with one line naming the file, before it runs.

A torch file is also a zip archive, and torch.load inflates whatever its members declare: a model.pt
re-zipped with deflate holds 1.5 GB of tensor in 4.8 MB. torch.save never compresses, so every member
must be stored as it is (ZIP_STORED, its size in the archive equal to its size) and all of them
together no larger than the file: what loading allocates is then bounded by the file's own size.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

from stages.core.errors import PipelineError

_BLOCKED = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")  # the object the pickle would build


def check_stored(path: Path, what: str, remedy: str) -> None:
    """Refuse a torch file (or an .npz: np.savez stores too) whose zip members are compressed, or declare
    more bytes than the file holds."""
    if not path.is_file():  # a FIFO would block the read; a folder or device is no torch file either
        what_is = "not found" if not path.exists() else "not a regular file (a folder, FIFO or device)"
        raise PipelineError(f"{path}: {what} {what_is} ({remedy})")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise PipelineError(
            f"{path}: not a readable {what} (corrupt or not a zip archive: {reason}; {remedy})"
        ) from None
    size = path.stat().st_size
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED or member.file_size != member.compress_size:
            raise PipelineError(
                f"{path}: refused to load this {what}: its member {member.filename[:80]!r} is compressed "
                f"({member.compress_size:,} bytes that inflate to {member.file_size:,}), which torch.save never "
                f"writes ({remedy})"
            )
    declared = sum(member.file_size for member in members)
    if declared > size:
        raise PipelineError(f"{path}: refused to load this {what}: its members declare {declared:,} bytes, more than "
                            f"the file's {size:,} ({remedy})")


def load_tensors(path: str | Path, what: str, remedy: str) -> dict:
    """The dict a torch.save wrote, refusing code; `what` names the file's role, `remedy` the fix."""
    import torch

    path = Path(path)
    check_stored(path, what, remedy)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = _BLOCKED.search(str(exc))
        if blocked:
            raise PipelineError(f"{path}: refused to load this {what}: it holds {blocked.group(1)}, not only tensors "
                                f"and plain data, and loading it could run code ({remedy})") from None
        raise PipelineError(f"{path}: not a readable {what} (corrupt or not a torch file; {remedy})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise PipelineError(f"{path}: not a readable {what} ({reason}; {remedy})") from None
    if not isinstance(blob, dict):
        raise PipelineError(f"{path}: not a {what} of this pipeline (holds a {type(blob).__name__}; {remedy})")
    return blob
