"""The tiny DVC project the end-to-end tests share: the repository's stages and dvc.yaml on small
synthetic data, as a git + DVC repository, built once per test run (tests/conftest.py `built`) and
copied for each test that changes it (`workspace`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

DVC = [sys.executable, "-m", "dvc"]


def dvc(repo: Path, *args: str) -> str:
    env = dict(os.environ, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1")
    result = subprocess.run([*DVC, *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dvc_json(repo: Path, *args: str):
    """`dvc <args> --json`, its stdout only (warnings about plot files not written yet go to stderr)."""
    env = dict(os.environ, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1")
    result = subprocess.run([*DVC, *args, "--json"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_param(repo: Path, dotted: str, value) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    node = params
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["synthetic"].update(image_size=64, n_train=16, n_test_good=4, n_test_per_cell=1)
    # Two levels: a clearly visible one and the just-noticeable difference. 64 px images cannot resolve the
    # default ladder's 16 x 16 px defects (4 x 4 px here: PatchCore scores 0.5 on them), so the tiny project
    # draws larger ones: 1536 px at 256 px is 96 px here, about the size of the generator's former defects.
    params["data"]["synthetic"]["levels"] = [{"delta_e": 24, "area": 1536, "width": 8},
                                             {"delta_e": 2, "area": 1536, "width": 8}]
    params["preprocess"].update(resize=64, crop_size=64, val_fraction=0.25)
    params["device"] = "cpu"
    # one seed: the per-seed fits, means and spreads run in tests/conftest.py's `fitted` (two seeds)
    params["fit_seeds"] = [0]
    params["evaluate"].update(bins=1024, bootstrap={**params["evaluate"]["bootstrap"], "resamples": 100})
    params["figures"]["overview"].update(per_defect=1)  # small figures: the stages rerun in every test below
    params["figures"]["heatmaps"].update(per_defect=1, good=1)
    params["figures"]["tsne"].update(iterations=250)
    # Three models, one per code path worth running end to end: image-level features (knn), patch
    # features with maps (patchcore), a trained pixel model with reconstructions (skipae_ssim). The
    # others differ in params or share these paths (the trained feature models run through the same
    # fit and evaluate stages), and every method has its own unit tests; each model here costs three
    # stages in every run below.
    params["models"] = {m: params["models"][m] for m in ("knn_effnet", "patchcore_effnet", "skipae_ssim")}
    for model in params["models"].values():
        if model["method"] == "global_knn":
            model["score"]["k"] = 5
        if model["method"] == "patchcore":
            model["fit"].update(coreset_ratio=0.25, pretrain_embed_dimension=64, target_embed_dimension=64)
        if "epochs" in model["fit"]:  # trained models: a couple of epochs on small images
            model["fit"].update(epochs=2)
            if "image_size" in model["fit"]:
                model["fit"]["image_size"] = 32
    return params


def read_metrics(repo: Path) -> dict:
    files = sorted((repo / "metrics").rglob("*.json"))
    return {str(f.relative_to(repo)): json.loads(f.read_text()) for f in files}


def dvc_config(repo: Path) -> dict:
    import configparser

    config = configparser.ConfigParser()
    config.read(repo / ".dvc" / "config")
    return {section.strip("'\" "): dict(config[section]) for section in config.sections()}


ALL_MODEL_PLOTS = ("image_roc", "image_pr", "pixel_roc", "pro")  # one `y` source per model


def top_level_plots(pipeline: dict) -> dict:
    return {plot_id: spec for entry in pipeline["plots"] for plot_id, spec in entry.items()}


def chart_model(path: str) -> str:
    """plots/${data.categories[0]}.category/<model>.model/roc.csv -> <model>"""
    return Path(path).parts[2].removesuffix(".model")


def with_plot_sources_of(models: dict) -> dict:
    """The repository's dvc.yaml with the all-model charts cut down to these models."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for entry in pipeline["plots"]:
        for plot_id, spec in entry.items():
            if plot_id in ALL_MODEL_PLOTS:
                spec["y"] = {path: column for path, column in spec["y"].items() if chart_model(path) in models}
    return pipeline


def make_project(root: Path) -> Path:
    """The tiny project as a git + DVC repository with one commit, nothing reproduced."""
    root.mkdir(parents=True)
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "weights", root / "weights")
    shutil.copytree(REPO / "references", root / "references")  # the report stage's published tables
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    params = tiny_params()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump(with_plot_sources_of(params["models"]), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    # the project's Vega-Lite templates and offline page template, as in the repository's .dvc/
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    template = dvc_config(REPO)["plots"]["html_template"]
    dvc(root, "config", "plots.html_template", template)
    # a repo with a commit, as a clone is (dvclive reads the current revision)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    git_user = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", *git_user, "commit", "-qm", "tiny pipeline"], cwd=root, check=True)
    return root


def build(root: Path) -> None:
    """The tiny project with its first `dvc repro` done."""
    output = dvc(make_project(root), "repro")
    models = yaml.safe_load((root / "params.yaml").read_text())["models"]
    assert ran(output) >= {f"fit@carpet-{m}" for m in models} | {f"evaluate@carpet-{m}" for m in models} | {"report"}


def copy_of(built: Path, tmp_path: Path) -> Path:
    """A copy of the built project for one test: a test that changes params or outputs changes only its
    own copy, so every test passes in any order (DVC's state database is per folder, left behind)."""
    copy = tmp_path / "workspace"
    shutil.copytree(
        built, copy, symlinks=True, ignore=lambda folder, names: ["tmp"] if folder.endswith("/.dvc") else []
    )
    return copy
