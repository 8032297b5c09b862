"""No params value can make DVC delete data outside the download stage's own output.

DVC removes a stage's outputs before it runs its command, so the stage cannot protect itself: the
layout data/raw/<source>/<category>.dataset keeps every category value inside one path component
with a fixed suffix, and the stage then rejects the bad name with one line.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.common import PipelineError
from stages.download import check_category_name
from tests.conftest import REPO, error_line, run_stage, write_params
from tests.test_pipeline import DVC, dvc, tiny_params

BAD_NAMES = ["", ".", "..", "a/b", "../../x"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the workspace but DVC's and git's own bookkeeping, with its content hash."""
    skip = (".dvc", ".git", ".tmp")
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in skip
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A dvc project whose download stage has run, plus files beside, above and around its output."""
    root = tmp_path_factory.mktemp("paths")
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    write_params(root, tiny_params())
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "repro", "--single-item", "download")
    for keep in ("keep.txt", "data/keep.txt", "data/raw/keep.txt", "data/raw/synthetic/keep.txt", "data/x.txt"):
        (root / keep).write_text("precious\n")
    return root


@pytest.mark.parametrize("category", BAD_NAMES)
def test_bad_category_deletes_nothing(repo, category):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["category"] = category
    write_params(repo, params)
    before = snapshot(repo)
    assert any(f.startswith("data/raw/synthetic/carpet") and f.endswith("good/000.png") for f in before)
    try:
        env = dict(os.environ, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1")
        result = subprocess.run([*DVC, "repro", "--single-item", "download"], cwd=repo, env=env, capture_output=True)
        assert result.returncode != 0
        assert snapshot(repo) == before
    finally:
        params["data"]["category"] = "carpet"
        write_params(repo, params)


def test_download_rejects_bad_category_with_one_line(tmp_path):
    params = tiny_params()
    params["data"]["category"] = ".."
    write_params(tmp_path, params)
    line = error_line(run_stage("download", cwd=tmp_path))
    assert line.startswith("error: data.category: invalid category name '..'")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("category", BAD_NAMES + ["../..", "a/../..", "/", ".hidden", "a\\b", " carpet", None, 3])
def test_category_name_rule(category):
    with pytest.raises(PipelineError, match=r"^data\.category: invalid category name"):
        check_category_name(category)
    check_category_name("metal_nut")


def broken_folder(root: Path) -> Path:
    """A user's MVTec-layout folder with one truncated test image."""
    from stages.data.synthetic import generate_category
    from tests.test_errors import TINY

    generate_category(root, defect_types=("color", "hole"), **TINY)
    victim = root / "test" / "hole" / "000.png"
    victim.write_bytes(victim.read_bytes()[:200])
    return victim


def test_folder_source_errors_name_the_users_file(tmp_path):
    victim = broken_folder(tmp_path / "my folder")
    params = tiny_params()
    params["data"].update(source="folder", folder=str(tmp_path / "my folder"))
    write_params(tmp_path, params)
    line = error_line(run_stage("download", cwd=tmp_path))
    assert line.startswith(f"error: {victim}: unreadable or truncated image")
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").rglob("*.png"))


def test_fixed_folder_source_is_picked_up_without_force(repo, tmp_path):
    """The broken folder is never copied, so the failed download reruns by itself once the folder is fixed."""
    victim = broken_folder(tmp_path / "source")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="folder", folder=str(tmp_path / "source"))
    write_params(repo, params)
    env = dict(os.environ, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1")
    failed = subprocess.run([*DVC, "repro", "--single-item", "download"], cwd=repo, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and str(victim) in failed.stdout + failed.stderr
    shutil.copy(tmp_path / "source" / "test" / "color" / "000.png", victim)  # the user fixes the file
    assert "Running stage 'download'" in dvc(repo, "repro", "--single-item", "download")
    assert (repo / "data/raw/folder/carpet.dataset/test/hole/000.png").read_bytes() == victim.read_bytes()
