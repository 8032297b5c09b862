"""Temporary files: never inside a folder another stage depends on; a killed run's are removed by the next stage."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core.outputs import atomic_path, write_json
from stages.data import archives
from tests.conftest import run_stage
from tests.test_errors import TINY, tiny_params


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stage_removes_temporaries_of_killed_runs_only(project):
    """What kill -9 leaves (in .tmp/, or beside an output as older versions did) goes at the next stage start."""
    tiny_params(project)
    dead = dead_pid()
    stale = [
        project / ".tmp" / f"{dead}-0-efficientnet_lite0",
        project / "data" / "raw" / f".carpet.dataset.tmp{dead}",
    ]
    live = project / ".tmp" / f"{os.getppid()}-0-pixels"  # a concurrent run that is still going
    for folder in stale + [live]:
        folder.mkdir(parents=True)
        (folder / "train.pt").write_bytes(b"x" * 100)
    run_stage("download", "carpet", cwd=project, check=True)
    assert not [p for p in stale if p.exists()]
    assert (live / "train.pt").is_file()
    assert (project / "data/raw/carpet.dataset/train/good").is_dir()
    assert len(list((project / "data/raw/carpet.dataset/train/good").iterdir())) == TINY["n_train"]
    assert sorted(p.name for p in (project / ".tmp").iterdir()) == [live.name]


@pytest.mark.parametrize(
    "output",
    [
        "metrics/models/c.category/m.metrics.json",
        "data/features/c.category/pixels.features",
        "models/c.category/m.model",
        "plots/c.category/m.model/train",
    ],
)
def test_temporaries_live_in_the_project_tmp_folder(project, monkeypatch, output):
    monkeypatch.chdir(project)
    (project / Path(output).parent).mkdir(parents=True)
    with atomic_path(output) as tmp:
        assert tmp.parent.parent.resolve() == (project / ".tmp").resolve()
        assert tmp.parent.name.startswith(f"{os.getpid()}-") and tmp.name == Path(output).name
        tmp.write_text("{}")
    assert (project / output).is_file() and not list((project / ".tmp").iterdir())
    assert [p.name for p in (project / Path(output).parent).iterdir()] == [Path(output).name]
    write_json(output, {"a": 1})
    assert [p.name for p in (project / Path(output).parent).iterdir()] == [Path(output).name]


def test_output_removes_its_stale_sibling_of_an_older_version(project, monkeypatch):
    monkeypatch.chdir(project)
    dead = dead_pid()
    stale = project / "data" / "features" / "c.category" / f".efficientnet_lite0.features.tmp{dead}"
    live = project / "data" / "features" / "c.category" / f".efficientnet_lite0.features.tmp{os.getppid()}"
    for folder in (stale, live):
        folder.mkdir(parents=True)
    with atomic_path("data/features/c.category/efficientnet_lite0.features") as tmp:
        tmp.mkdir()
    assert not stale.exists() and live.exists()


def test_download_staging_lives_in_the_project_tmp_folder(project, monkeypatch):
    monkeypatch.chdir(project)
    dest = Path("data/raw/carpet.dataset")
    made = archives._sibling_tmpdir(dest, "tmp")
    assert made.parent.resolve() == (project / ".tmp").resolve() and made.name.startswith(f"{os.getpid()}-")
    assert list(dest.parent.iterdir()) == []
