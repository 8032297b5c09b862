"""DVC stage `download@<category>`: materialise one category in MVTec layout under data/raw/<category>.dataset.

data.source: synthetic (the offline default), mvtec (the official archive) or folder (a local copy
holding one folder per category). Each category is its own stage, so one that cannot be fetched
fails alone and the others stay valid and cached.
"""
from __future__ import annotations

from pathlib import Path

from stages.common import PipelineError, atomic_path, param, run_main, stage_args
from stages.data import mvtec
from stages.data.synthetic import generate_category
from stages.data.raw import verify_category
from stages.params import category_source
from stages.paths import raw_category_dir


def main() -> None:
    params, (category,) = stage_args("download", "<category>")
    source = category_source(params, category)  # choices and category names: checked by load_params
    dest = raw_category_dir(category)

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
            raise PipelineError("data.folder: set it to a folder holding one MVTec-layout folder per category "
                                "when data.source is 'folder'")
        folder = Path(folder).expanduser() / category
        # Decode every image and mask of the user's folder first: errors name the user's files, and a
        # broken folder is never copied, so once it is fixed `dvc repro` reruns this (failed) stage.
        verify_category(folder)
        mvtec.copy_folder(folder, dest)
    print(f"{source}/{category} -> {dest}")


if __name__ == "__main__":
    run_main(main)
