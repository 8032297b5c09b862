"""Check params.yaml as every stage would, without running anything:

    python -m stages.check            # -> "params.yaml: ok (...)" or one `error:` line naming the key

DVC reads params.yaml before any stage script runs, and a value of the wrong shape where dvc.yaml
expands a matrix (`data.categories: carpet`, a string instead of a list) stops DVC itself with
"unexpected error - 'Value' object is not iterable", which names no key. This command names it.

It also warns, one line per category, when `preprocess.mode` is crop and the category's training
images are not square (the share of each image the model never sees): their sizes are read from the
headers of at most stages/data/raw.py MAX_HEADERS images of train/good, in the downloaded copy or, for
`source: folder`, the user's folder (a category not downloaded yet from an archive is not looked at).
"""
from __future__ import annotations

from pathlib import Path

from stages.core.cli import run_main
from stages.core.errors import warn
from stages.core.params import category_source, load_params
from stages.core.paths import raw_category_dir
from stages.data.raw import crop_warning, header_sizes, list_images
from stages.methods.entries import model_config


def training_folder(params: dict, category: str) -> Path | None:
    """Where the category's good training images are now, if anywhere."""
    for root in (raw_category_dir(category),
                 Path(params["data"]["folder"]).expanduser() / category
                 if category_source(params, category) == "folder" and params["data"]["folder"] else None):
        if root is not None and (root / "train" / "good").is_dir():
            return root / "train" / "good"
    return None


def main() -> None:
    params = load_params()
    for category in params["data"]["categories"]:
        for name in params["models"]:
            model_config(params, category, name)
    for category in params["data"]["categories"]:
        folder = training_folder(params, category)
        if folder is not None:
            line = crop_warning(str(folder), header_sizes(list_images(folder)), params["preprocess"])
            if line:
                warn(line)
    print(f"params.yaml: ok ({len(params['data']['categories'])} categories, {len(params['models'])} models, "
          f"{len(params['backbones'])} backbones, numerics: {params['numerics']})")


if __name__ == "__main__":
    run_main(main)
