"""Reading the torch files that travel (fitted models, cached features): tensors and plain data only.

A torch file is a pickle, and a pickle can run any code while it loads. A model.pt pulled from a
DVC remote passes DVC's hash check whatever it holds (dvc.lock carries the hash of what was pushed),
so every file is loaded with `weights_only=True`: tensors, dicts, lists, strings and numbers come
back, anything else (a crafted `__reduce__`) is refused with one line naming the file, before it runs.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

from stages.core.errors import PipelineError

_BLOCKED = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")  # the object the pickle would build


def load_tensors(path: str | Path, what: str, remedy: str) -> dict:
    """The dict a torch.save wrote, refusing code; `what` names the file's role, `remedy` the fix."""
    import torch

    path = Path(path)
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
