"""No params value can make DVC delete data outside a stage's own output.

DVC removes a stage's outputs before it runs its command, so the stage cannot protect itself: every
output path carries each category, backbone and model name in a component with a fixed suffix
(data/raw/<category>.dataset, data/features/<category>.category/<backbone>.features,
models/<category>.category/<model>.model, ...), and the stage then rejects the bad name with one
line. Real DVC runs on each bad value, for all three kinds of name at once.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.core.errors import PipelineError
from stages.core.params import check_categories
from tests.conftest import REPO, error_line, run_stage, write_params
from tests.tiny import DVC, dvc, tiny_params

# one worker runs this file: its tests share the module's DVC project (pytest.ini: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("paths")

BAD_NAMES = ["", ".", "..", "a/b", "../../x", "x/.."]


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the workspace but DVC's and git's own bookkeeping, with its content hash."""
    skip = (".dvc", ".git", ".tmp")
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in skip
    }


def small_params() -> dict:
    params = tiny_params()
    params["models"] = {"knn_effnet": params["models"]["knn_effnet"]}
    return params


@pytest.fixture(scope="module")
def repo(built, tmp_path_factory) -> Path:
    """A copy of the built tiny project (tests/tiny.py) with one model in params, plus files beside, above and
    around every output."""
    from tests.tiny import copy_of

    root = copy_of(built, tmp_path_factory.mktemp("paths"))
    write_params(root, small_params())
    # (not inside data/features/carpet.category/: every model of the category depends on that folder)
    for keep in (
        "keep.txt",
        "data/keep.txt",
        "data/raw/keep.txt",
        "data/features/keep.txt",
        "models/keep.txt",
        "models/carpet.category/keep.txt",
        "plots/keep.csv",
        "plots/carpet.category/keep.csv",
        "metrics/keep.json",
        "x/keep.txt",
        "train/keep.txt",
    ):
        (root / keep).parent.mkdir(parents=True, exist_ok=True)
        (root / keep).write_text("precious\n")
    return root


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_category_backbone_or_model_name_deletes_nothing(repo, bad):
    params = small_params()
    good = copy.deepcopy(params)
    params["data"]["categories"].append(bad)
    params["backbones"][bad] = params["backbones"]["efficientnet_lite0"]
    params["models"][bad] = params["models"]["knn_effnet"]
    write_params(repo, params)
    before = snapshot(repo)
    assert any(f.startswith("data/raw/carpet.dataset/") and f.endswith("good/000.png") for f in before)
    assert any(f.startswith("models/carpet.category/knn_effnet.model/") for f in before)
    try:
        env = dict(os.environ, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1")
        result = subprocess.run(
            [*DVC, "repro", "--single-item", "--keep-going", "--glob", "download@*", "extract@*", "fit@*"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0
        if bad and not bad.startswith("../"):  # (DVC refuses the whole pipeline for "" and for names climbing out)
            assert "invalid category name" in result.stderr, "the bad category's download stage never ran"
        assert snapshot(repo) == before
        assert "Running stage 'fit@carpet-knn_effnet'" not in result.stdout  # the good model was left alone
    finally:
        write_params(repo, good)


def test_stage_rejects_a_bad_category_with_one_line(tmp_path):
    params = tiny_params()
    params["data"]["categories"] = [".."]
    write_params(tmp_path, params)
    line = error_line(run_stage("download", "..", cwd=tmp_path))
    assert line.startswith("error: data.categories: invalid category name '..'")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("category", BAD_NAMES + ["../..", "a/../..", "/", ".hidden", "a\\b", " carpet", None, 3])
def test_category_name_rule(category):
    with pytest.raises(PipelineError, match=r"^data\.categories: invalid category name"):
        check_categories(["carpet", category])
    check_categories(["metal_nut", "carpet"])
    with pytest.raises(PipelineError, match=r"^data\.categories: carpet listed twice"):
        check_categories(["carpet", "grid", "carpet"])
    with pytest.raises(PipelineError, match=r"^data\.categories: empty"):
        check_categories([])


def broken_folder(root: Path) -> Path:
    """A user's MVTec-layout folder with one truncated test image."""
    from stages.data.synthetic import generate_category
    from tests.test_errors import TINY

    generate_category(root, defect_types=("color", "hole"), **TINY)
    victim = root / "test" / "hole" / "000.png"
    victim.write_bytes(victim.read_bytes()[:200])
    return victim


def test_folder_source_errors_name_the_users_file(tmp_path):
    victim = broken_folder(tmp_path / "my folder" / "carpet")
    params = tiny_params()
    params["data"].update(source="folder", folder=str(tmp_path / "my folder"))
    write_params(tmp_path, params)
    line = error_line(run_stage("download", "carpet", cwd=tmp_path))
    assert line.startswith(f"error: {victim}: unreadable or truncated image")
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").rglob("*.png"))


def test_fixed_folder_source_is_picked_up_without_force(repo, tmp_path):
    """The broken folder is never copied, so the failed download reruns by itself once the folder is fixed."""
    victim = broken_folder(tmp_path / "source" / "carpet")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="folder", folder=str(tmp_path / "source"))
    write_params(repo, params)
    env = dict(os.environ, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1")
    failed = subprocess.run(
        [*DVC, "repro", "--single-item", "download@carpet"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert failed.returncode != 0 and str(victim) in failed.stdout + failed.stderr
    shutil.copy(tmp_path / "source" / "carpet" / "test" / "color" / "000.png", victim)  # the user fixes the file
    assert "Running stage 'download@carpet'" in dvc(repo, "repro", "--single-item", "download@carpet")
    assert (repo / "data/raw/carpet.dataset/test/hole/000.png").read_bytes() == victim.read_bytes()


@pytest.mark.parametrize("name", ["x;touch MARK;#", "x';touch MARK;'", "$(touch MARK)", "`touch MARK`", "my cat"])
def test_a_name_never_reaches_a_shell(repo, name):
    """dvc.yaml's commands carry no name (stages read DVC_STAGE): a category that is shell code stays a
    string, and its stage refuses it with one line that names it."""
    params = small_params()
    good = copy.deepcopy(params)
    params["data"]["categories"].append(name)
    write_params(repo, params)
    try:
        env = dict(os.environ, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1")
        result = subprocess.run(
            [*DVC, "repro", "--single-item", f"download@{name}"], cwd=repo, env=env, capture_output=True, text=True
        )
        assert result.returncode != 0
        assert f"error: data.categories: invalid category name {name!r}" in result.stderr + result.stdout
        assert not list(repo.rglob("MARK")) and not (Path.cwd() / "MARK").exists()
    finally:
        write_params(repo, good)


def test_dvc_yaml_commands_carry_no_interpolation():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert "${" not in stage["cmd"], f"{name}: {stage['cmd']}"
