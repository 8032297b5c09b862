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
    # fewer stages: skipae_mse differs from skipae_ssim in fit.loss only, feature_vae runs the feature_ae code path
    del params["models"]["skipae_mse"], params["models"]["feature_vae"]
    for name, model in params["models"].items():
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


def output_hashes(repo: Path) -> dict:
    """md5 of every stage output recorded in dvc.lock: fitted models, features, plots, metrics."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "weights", root / "weights")
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
        assert summary[name]["image_auroc"] == metrics["image_auroc"]
        assert summary[name]["image_auroc"] is not None
    # the synthetic defects are easy at any size: the feature methods separate them (not a random 0.5)
    assert summary["patchcore_effnet"]["image_auroc"] >= 0.9 and summary["patchcore_effnet"]["pixel_auroc"] >= 0.9
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, model in models.items():
        has_maps = model["method"] != "global_knn"  # every method but the global kNN gives anomaly maps
        assert (summary[name]["pixel_auroc"] is not None) == has_maps, name
        assert (summary[name]["aupro"] is not None) == has_maps, name
    trained = [name for name, model in models.items() if "epochs" in model["fit"]]
    assert trained, "the configuration should include trained models"
    plots = json.loads(dvc(repo, "plots", "show", "--json"))["data"]
    for name in trained:
        curve = f"plots/{name}/train/plots/metrics/train_loss.tsv"
        assert any(curve in key for key in plots), f"no learning curve for {name} in dvc plots show"
        rows = (repo / curve).read_text().splitlines()
        assert rows[0] == "step\ttrain_loss" and len(rows) == 1 + params["models"][name]["fit"]["epochs"]
    assert any("plots/patchcore_effnet/roc.csv" in key for key in plots)
    assert "Data and pipelines are up to date" in dvc(repo, "status")
    # each number once: the per-model files are the metrics, the summary is a plain output
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))
    files = next(iter(shown.values()))["data"]
    assert {f for f in files if f.startswith("metrics/")} == {f"metrics/models/{name}.json" for name in models}


def test_forced_repro_is_deterministic(repo, first_run):
    """Every kind of stage, run again from scratch, writes byte-identical outputs: data generation,
    preprocessing, feature extraction, a trained and an untrained fit, their evaluations."""
    hashes = output_hashes(repo)  # as dvc.lock recorded them in the first run
    stages = ["download", "preprocess", "extract@efficientnet_lite0", "fit@skipae_ssim", "fit@patchcore_effnet",
              "evaluate@skipae_ssim", "evaluate@patchcore_effnet", "report"]
    assert ran(dvc(repo, "repro", "--force", "--single-item", *stages)) == set(stages)
    assert read_metrics(repo) == first_run
    assert output_hashes(repo) == hashes
    assert "Data and pipelines are up to date" in dvc(repo, "status")


def assert_reruns_only(repo: Path, model: str, changed: set[str], expected: set[str]) -> None:
    """`dvc status` lists the stages that read the change; `dvc repro` runs those and what is downstream."""
    before = read_metrics(repo)
    assert set(json.loads(dvc(repo, "status", "--json"))) == changed
    assert ran(dvc(repo, "repro")) == expected
    after = read_metrics(repo)
    assert after[f"metrics/models/{model}.json"] != before[f"metrics/models/{model}.json"]
    others = [f for f in before if f.startswith("metrics/models/") and f != f"metrics/models/{model}.json"]
    assert others and all(after[f] == before[f] for f in others)


@pytest.mark.parametrize(
    "model, key, value, stages",
    [
        ("knn_effnet", "fit.top_variance_dims", 100, {"fit", "evaluate"}),  # a fitting param refits
        ("skipae_ssim", "fit.lr", 0.003, {"fit", "evaluate"}),
        ("knn_effnet", "score.k", 4, {"evaluate"}),  # a scoring param only re-scores
        ("patchcore_effnet", "score.smoothing_sigma", 2, {"evaluate"}),
    ],
)
def test_model_param_reruns_only_what_reads_it(repo, first_run, model, key, value, stages):
    set_param(repo, f"models.{model}.{key}", value)
    # the report reads the list of models, so it sees any models.* change (and reruns anyway)
    first = {f"{min(stages, key=['fit', 'evaluate'].index)}@{model}", "report"}
    assert_reruns_only(repo, model, first, {f"{stage}@{model}" for stage in stages} | {"report"})


def test_editing_one_method_file_refits_only_its_models(repo, first_run):
    path = repo / "stages" / "methods" / "global_knn.py"
    # a real change of behaviour: scores doubled, so the metrics file must change too
    text = path.read_text()
    path.write_text(text.replace("distances.mean(dim=1)", "2 * distances.mean(dim=1)"))
    assert text != path.read_text()
    both = {"fit@knn_effnet", "evaluate@knn_effnet"}
    assert_reruns_only(repo, "knn_effnet", both, both | {"report"})


def test_preprocess_param_makes_every_reader_of_the_prepared_images_stale_never_the_download(repo, first_run):
    set_param(repo, "preprocess.seed", 1)  # another validation split
    assert set(json.loads(dvc(repo, "status", "--json"))) == {"preprocess"}
    assert ran(dvc(repo, "repro", "--single-item", "preprocess")) == {"preprocess"}
    # Every stage that reads the prepared images is now stale (DVC reruns them and, through their
    # outputs, everything after them); the download is not. Running the whole cascade here would
    # only time DVC's own propagation, which the model-param tests above already exercise.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    readers = (
        {f"extract@{b}" for b in params["backbones"]}
        | {f"fit@{m}" for m, entry in params["models"].items() if entry["backbone"] == "pixels"}
        | {f"evaluate@{m}" for m in params["models"]}
    )
    assert set(json.loads(dvc(repo, "status", "--json"))) == readers
