"""End to end with real `dvc` commands on a tiny configuration, in a temporary copy of the repo.

Proves: every configured model gets metrics; `dvc repro --force` is deterministic; changing one
model's hyper-parameter reruns only its fit/evaluate and the report; changing a preprocess param
reruns everything downstream of preprocess and nothing upstream.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DVC = [sys.executable, "-m", "dvc"]


def dvc(repo: Path, *args: str) -> str:
    env = dict(os.environ, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1")
    result = subprocess.run([*DVC, *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


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
    params["data"]["synthetic"].update(image_size=64, n_train=16, n_test_good=4, n_test_per_defect=2)
    params["preprocess"].update(resize=64, crop_size=64, val_fraction=0.25)
    params["device"] = "cpu"
    for name, model in params["models"].items():
        if model["method"] == "global_knn":
            model["k"] = 5
        if model["method"] == "patchcore":
            model.update(coreset_ratio=0.25, pretrain_embed_dimension=64, target_embed_dimension=64)
        if "epochs" in model:  # trained models: a couple of epochs on small images
            model.update(epochs=2, image_size=32) if "image_size" in model else model.update(epochs=2)
    return params


def read_metrics(repo: Path) -> dict:
    files = sorted((repo / "metrics").rglob("*.json"))
    return {str(f.relative_to(repo)): json.loads(f.read_text()) for f in files}


def output_hashes(repo: Path) -> dict:
    """md5 of every stage output recorded in dvc.lock: fitted models, features, plots, metrics."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    # a repo with a commit, as a clone is (dvclive reads the current revision)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    git_user = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", *git_user, "commit", "-qm", "tiny pipeline"], cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def first_run(repo) -> dict:
    output = dvc(repo, "repro")
    models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
    assert ran(output) >= {f"fit@{m}" for m in models} | {f"evaluate@{m}" for m in models} | {"report"}
    return read_metrics(repo)


def test_repro_writes_metrics_for_every_model(repo, first_run):
    models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
    summary = first_run["metrics/summary.json"]
    assert set(summary) == set(models)
    for name in models:
        metrics = first_run[f"metrics/models/{name}.json"]
        assert 0.0 <= metrics["image_auroc"] <= 1.0
        assert summary[name]["image_auroc"] == metrics["image_auroc"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, model in models.items():
        has_maps = model["method"] != "global_knn"  # every method but the global kNN gives anomaly maps
        assert (summary[name]["pixel_auroc"] is not None) == has_maps, name
        assert (summary[name]["aupro"] is not None) == has_maps, name
    trained = [name for name, model in models.items() if "epochs" in model]
    assert trained, "the configuration should include trained models"
    plots = json.loads(dvc(repo, "plots", "show", "--json"))["data"]
    for name in trained:
        curve = f"plots/{name}/train/plots/metrics/train_loss.tsv"
        assert any(curve in key for key in plots), f"no learning curve for {name} in dvc plots show"
        rows = (repo / curve).read_text().splitlines()
        assert rows[0] == "step\ttrain_loss" and len(rows) == 1 + params["models"][name]["epochs"]
    assert any("plots/patchcore_effnet/roc.csv" in key for key in plots)
    assert "Data and pipelines are up to date" in dvc(repo, "status")
    shown = dvc(repo, "metrics", "show")
    for name in models:
        assert f"metrics/models/{name}.json" in shown


def test_forced_repro_is_deterministic(repo, first_run):
    hashes = output_hashes(repo)  # checkpoints, features and plots, byte for byte
    for _ in range(2):
        dvc(repo, "repro", "--force")
        assert read_metrics(repo) == first_run
        assert output_hashes(repo) == hashes


@pytest.mark.parametrize("model, key, value", [("knn_effnet", "k", 4), ("skipae_ssim", "epochs", 3)])
def test_model_hyperparameter_reruns_only_that_model(repo, first_run, model, key, value):
    before = read_metrics(repo)
    set_param(repo, f"models.{model}.{key}", value)
    expected = {f"fit@{model}", f"evaluate@{model}", "report"}
    assert set(json.loads(dvc(repo, "status", "--json"))) == expected
    assert ran(dvc(repo, "repro")) == expected
    after = read_metrics(repo)
    others = [f for f in before if f.startswith("metrics/models/") and f != f"metrics/models/{model}.json"]
    assert others and all(after[f] == before[f] for f in others)


def test_preprocess_param_reruns_everything_downstream_only(repo, first_run):
    set_param(repo, "preprocess.seed", 1)  # another validation split
    status = json.loads(dvc(repo, "status", "--json"))
    assert set(status) == {"preprocess"}
    models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
    backbones = yaml.safe_load((repo / "params.yaml").read_text())["backbones"]
    expected = (
        {"preprocess", "report"}
        | {f"extract@{b}" for b in backbones}
        | {f"fit@{m}" for m in models}
        | {f"evaluate@{m}" for m in models}
    )
    assert ran(dvc(repo, "repro")) == expected


def test_fresh_clone_and_pull_recomputes_nothing(repo, first_run, tmp_path):
    """The shared-remote promise: push, clone, pull -> `dvc status` clean and `dvc repro` runs nothing."""
    git_user = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    dvc(repo, "remote", "add", "-f", "-d", "shared", str(tmp_path / "remote"))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *git_user, "commit", "-qm", "results"], cwd=repo, check=True)
    dvc(repo, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    dvc(clone, "pull")
    assert "Data and pipelines are up to date" in dvc(clone, "status")
    assert ran(dvc(clone, "repro")) == set()
