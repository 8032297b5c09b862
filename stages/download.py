"""DVC stage `download`: materialise one category in MVTec layout under data/raw/<source>/<category>.

data.source: synthetic (the offline default), mvtec (the official archive) or folder (a local copy).
"""
from __future__ import annotations

from pathlib import Path

from stages.common import PipelineError, atomic_path, load_params, param, run_main
from stages.data import mvtec
from stages.data.synthetic import generate_category
from stages.paths import RAW_ROOT

SOURCES = ("synthetic", "mvtec", "folder")


def main() -> None:
    params = load_params()
    source = param(params, "data.source")
    category = param(params, "data.category")
    if source not in SOURCES:
        raise PipelineError(f"data.source: unknown source '{source}' (known: {', '.join(SOURCES)})")
    if not isinstance(category, str) or not category or "/" in category or category.startswith("."):
        raise PipelineError(f"data.category: invalid category name {category!r}")
    dest = RAW_ROOT / source / category

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
        mvtec.copy_folder(Path(folder).expanduser(), dest)
    print(f"{source}/{category} -> {dest}")


if __name__ == "__main__":
    run_main(main)
