"""DVC stage `download`: materialise one category in MVTec layout under data/raw/<source>/<category>.dataset.

data.source: synthetic (the offline default), mvtec (the official archive) or folder (a local copy).
"""
from __future__ import annotations

from pathlib import Path

from stages.common import PipelineError, atomic_path, load_params, param, run_main
from stages.data import mvtec
from stages.data.synthetic import generate_category
from stages.data.raw import verify_category
from stages.paths import raw_category_dir

SOURCES = ("synthetic", "mvtec", "folder")


def check_category_name(category) -> None:
    """One plain folder name: not empty, no path separators, not hidden, not '.' or '..'."""
    if (
        not isinstance(category, str)
        or not category.strip()
        or category.startswith(".")
        or any(c in category for c in "/\\\0")
        or category != category.strip()
    ):
        raise PipelineError(
            f"data.category: invalid category name {category!r} (a plain folder name such as 'carpet': "
            "not empty, no '/', not starting with '.')"
        )


def main() -> None:
    params = load_params()
    source = param(params, "data.source")
    category = param(params, "data.category")
    if source not in SOURCES:
        raise PipelineError(f"data.source: unknown source '{source}' (known: {', '.join(SOURCES)})")
    check_category_name(category)
    dest = raw_category_dir(source, category)

    if source == "synthetic":
        keys = ("image_size", "n_train", "n_test_good", "n_test_per_defect", "seed", "defect_types")
        options = {key: param(params, f"data.synthetic.{key}") for key in keys}
        options["defect_types"] = tuple(options["defect_types"])
        with atomic_path(dest) as tmp:
            generate_category(tmp, **options)
    elif source == "mvtec":
        mvtec.download_category(
            category,
            dest,
            url=param(params, "data.mvtec.url", None),
            sha256=param(params, "data.mvtec.sha256", None),
            archive=param(params, "data.mvtec.archive", "category"),
        )
    else:
        folder = param(params, "data.folder")
        if not folder:
            raise PipelineError("data.folder: set it to an MVTec-layout category folder when data.source is 'folder'")
        folder = Path(folder).expanduser()
        # Decode every image and mask of the user's folder first: errors name the user's files, and a
        # broken folder is never copied, so once it is fixed `dvc repro` reruns this (failed) stage.
        verify_category(folder)
        mvtec.copy_folder(folder, dest)
    print(f"{source}/{category} -> {dest}")


if __name__ == "__main__":
    run_main(main)
