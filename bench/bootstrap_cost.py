"""What the bootstrap adds to evaluate: the evaluate stage of one model with 1000 resamples against 10
(the fewest the schema allows).

    .venv/bin/python bench/bootstrap_cost.py --model patchcore_effnet --repeats 3

Run after `dvc repro`. Each run is `python -m stages.evaluate <category> <model>` in its own process, in a
scratch copy of what the stage reads (params.yaml with evaluate.bootstrap.resamples changed, the
category's features, the model), so nothing of the project changes. Prints the median wall seconds
of each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def timed_evaluate(category: str, model: str, resamples: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bootstrap-cost-") as scratch:
        scratch = Path(scratch)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["evaluate"]["bootstrap"]["resamples"] = resamples
        (scratch / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for folder in (f"data/features/{category}.category", f"models/{category}.category/{model}.model"):
            shutil.copytree(REPO / folder, scratch / folder)
        env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "stages.evaluate", category, model],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(result.stderr[-2000:])
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="patchcore_effnet")
    parser.add_argument("--category", default="carpet")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = {}
    for resamples in (10, 1000):
        times[resamples] = statistics.median(
            timed_evaluate(args.category, args.model, resamples) for _ in range(args.repeats)
        )
    print(
        f"evaluate@{args.category}-{args.model}: {times[10]:.1f} s with 10 resamples, {times[1000]:.1f} s with 1000 "
        f"(median of {args.repeats}): the bootstrap adds {100 * (times[1000] / times[10] - 1):.0f} %"
    )


if __name__ == "__main__":
    main()
