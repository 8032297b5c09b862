"""The two ways a stage reports a problem to the user: a one-line error, or a one-line warning.

A leaf module (nothing of stages/ imported), so every other module, the schemas included, can raise
PipelineError without an import circle.
"""
from __future__ import annotations

import sys


class PipelineError(Exception):
    """A problem the user can fix (bad param, missing file). Printed as one line, exit code 1."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise PipelineError(message)


def warn(message: str) -> None:
    """A problem that does not stop the stage but may make a result misleading: one stderr line."""
    print(f"warning: {message}", file=sys.stderr)
