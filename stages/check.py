"""Check params.yaml as every stage would, without running anything:

    python -m stages.check            # -> "params.yaml: ok (...)" or one `error:` line naming the key

DVC reads params.yaml before any stage script runs, and a value of the wrong shape where dvc.yaml
expands a matrix (`data.categories: carpet`, a string instead of a list) stops DVC itself with
"unexpected error - 'Value' object is not iterable", which names no key. This command names it.
"""
from __future__ import annotations

from stages.core.cli import run_main
from stages.core.params import load_params
from stages.methods.entries import model_config


def main() -> None:
    params = load_params()
    for category in params["data"]["categories"]:
        for name in params["models"]:
            model_config(params, category, name)
    print(f"params.yaml: ok ({len(params['data']['categories'])} categories, {len(params['models'])} models, "
          f"{len(params['backbones'])} backbones, numerics: {params['numerics']})")


if __name__ == "__main__":
    run_main(main)
