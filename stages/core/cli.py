"""How a stage script starts and ends: its names (category, model or backbone) and its exit codes.

dvc.yaml runs every stage as `python -m stages.<stage>` with no name on the command line: DVC runs
`cmd` through a shell, and a category such as `x;touch MARK;#` (or one with a quote in it) would
run as a command before any check could refuse it. The stage reads its names from DVC_STAGE, the
stage name DVC exports to every command (`fit@carpet-patchcore_effnet`), by matching it against
the matrix items of params.yaml. By hand, the names are arguments:
`python -m stages.fit carpet patchcore_effnet`.
"""
from __future__ import annotations

import itertools
import os
import sys
import traceback
from typing import Callable

from stages.core.errors import PipelineError
from stages.core.outputs import clean_stale_temps
from stages.core.params import check_listed, load_params

# <placeholder in a usage line> -> the params.yaml list a DVC matrix draws it from
MATRIX_SOURCES = {
    "<category>": lambda params: params["data"]["categories"],
    "<model>": lambda params: list(params["models"]),
    "<backbone>": lambda params: list(params["backbones"]),
}


def names_from_dvc_stage(stage: str, usage: str, params: dict, addressing: str) -> list[str]:
    """DVC's matrix name `<stage>@<item>-<item>` -> the items, found among params.yaml's own lists
    (a name may itself contain '-', so the name is matched, never split)."""
    lists = [MATRIX_SOURCES[placeholder](params) for placeholder in usage.split()]
    for items in itertools.product(*lists):
        name = f"{stage}@{'-'.join(items)}"
        if addressing == name or addressing.endswith(f":{name}"):  # `dvc.yaml:<name>` outside the root
            return list(items)
    raise PipelineError(f"DVC_STAGE={addressing!r}: not a {stage}@{'-'.join(usage.split())} stage of "
                        f"params.yaml (run `dvc repro`, or python -m stages.{stage} {usage})")


def stage_args(stage: str, usage: str) -> tuple[dict, list[str]]:
    """`python -m stages.<stage> <category> [<name>]`, or no arguments under DVC -> (params, names).

    The category must be one of data.categories (a hand-typed one is checked too)."""
    params = load_params()
    args = sys.argv[1:]
    if not args and os.environ.get("DVC_STAGE"):
        args = names_from_dvc_stage(stage, usage, params, os.environ["DVC_STAGE"])
    if len(args) != len(usage.split()):
        raise PipelineError(f"usage: python -m stages.{stage} {usage}")
    check_listed(params, args[0])
    return params, args


def run_main(main: Callable[[], None]) -> None:
    """Run a stage: PipelineError -> 'error: ...' on stderr and exit 1; Ctrl-C -> exit 130; other
    crashes keep their traceback and exit 2."""
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
