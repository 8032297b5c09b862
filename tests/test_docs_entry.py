"""The entry pages' commands, run as written: the README's quick start and the tutorial's first steps on the
tiny DVC project, the tutorial's demo command, CONTRIBUTING's commands on a copy of the repository; and
what tests/test_docs.py does not check on them (the README's length, its results block's headings, .ci/run
doing what CONTRIBUTING says)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.conftest import REPO
from tests.docs import FENCE, commands, section

README, TUTORIAL, CONTRIBUTING = "README.md", "docs/tutorial.md", "CONTRIBUTING.md"


def shell_env(**extra: str) -> dict:
    """The environment a reader's shell has: this interpreter's `python` and `dvc` first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return dict(os.environ, PATH=path, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1", **extra)


def run(command: str, cwd: Path, env: dict) -> str:
    result = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_the_quick_start_and_the_tutorials_first_run(workspace):
    """README "Quick start" and the tutorial's "Run the pipeline" and "See every chart", each line as written
    (a line both pages show runs once), on the tiny project already reproduced: `dvc status` says what the
    tutorial quotes, and the page `dvc plots show` writes has every group the tutorial lists."""
    lines = [*commands(README, "Quick start"), *commands(TUTORIAL, "Run the pipeline"),
             *commands(TUTORIAL, "See every chart")]
    assert {"dvc repro", "dvc plots show"} <= set(lines)
    outputs = {line: run(line, workspace, shell_env()) for line in dict.fromkeys(lines)}

    quoted = re.search(r"`dvc status` then prints `([^`]+)`", section(TUTORIAL, "Run the pipeline"))
    assert quoted and quoted.group(1) in outputs["dvc status"], outputs["dvc status"]
    page = (workspace / "dvc_plots" / "index.html").read_text()
    groups = re.findall(r"^- \*\*(.+?)\*\*", section(TUTORIAL, "See every chart"), re.M)
    assert len(groups) >= 4 and all(group in page for group in groups), (groups, "not all on the page")

    # the report's tables nest under a page's `##` section (the README copies them): below the file's `#`
    # title every heading is `###` or deeper, the per-level tables of the ladder included
    headings = re.findall(r"^(#+) (.*)$", (workspace / "metrics" / "summary.md").read_text(), re.M)
    assert headings[0][0] == "#" and "per difficulty level" in " ".join(h for _, h in headings)
    assert all(len(marks) >= 3 for marks, _ in headings[1:]), headings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_command_serves_its_page(workspace):
    """The tutorial's "Open the demo" lines as written: `--help` lists the flags the page names, and the
    server line (with a free port added: argparse takes the last --port, so runs never collide on the
    documented 8000) serves the page and lists every model the project fitted, per category."""
    lines = commands(TUTORIAL, "Open the demo")
    text = section(TUTORIAL, "Open the demo")
    assert "http://127.0.0.1:8000" in text
    env = shell_env(PYTHONPATH=str(workspace))
    served = 0
    for line in lines:
        if line.endswith("--help"):
            usage = run(line, workspace, env)
            named = set(re.findall(r"`(--[a-z-]+)`", text))
            assert named and all(flag in usage for flag in named), (named, usage)
            continue
        port = free_port()
        process = subprocess.Popen([*shlex.split(line), "--port", str(port)], cwd=workspace, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            page = None
            for _ in range(600):  # torch and onnxruntime import first: up to 60 s on a loaded machine
                if process.poll() is not None:
                    break
                try:
                    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                    break
                except OSError:
                    time.sleep(0.1)
            if page is None:
                process.kill()
                raise AssertionError(f"{line} never served its page:\n{process.communicate()[0]}")
            models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=5).read())
        finally:
            process.terminate()
            process.wait(timeout=30)
        params = yaml.safe_load((workspace / "params.yaml").read_text())
        expected = {f"{c}/{m}" for c in params["data"]["categories"] for m in params["models"]}
        assert "<html" in page.lower() and set(models) == expected, models
        picked = re.search(r"pick `([^`]+)`", text)
        assert picked and picked.group(1) in expected, "the page must name a model the demo lists"
        served += 1
    assert served == 1, lines


def test_the_contributing_commands_run(tmp_path):
    """Every bash line of CONTRIBUTING.md as written, on a copy of the repository's files (a targeted pytest
    run, the linter, the reference generator): each succeeds, and none changes a file, so the committed
    parameter reference is what `python -m stages.docs` writes."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    copy = tmp_path / "repository"
    for name in listed:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    lines = commands(CONTRIBUTING)
    assert any(line.startswith("python -m pytest -n 0 ") for line in lines) and "python -m stages.docs" in lines
    # the inner pytest keeps its temporary folders here, outside the shared /tmp/pytest-of-<user>, and is not
    # a worker of this run
    env = {k: v for k, v in shell_env(PYTHONPATH=str(copy)).items() if not k.startswith("PYTEST_")}
    env["PYTEST_DEBUG_TEMPROOT"] = str(tmp_path / "inner-tmp")
    (tmp_path / "inner-tmp").mkdir()
    for line in lines:
        output = run(line, copy, env)
        if line.startswith("python -m pytest"):
            assert re.search(r"\b[1-9]\d* passed\b", output) and "failed" not in output, output
    changed = [name for name in listed if (REPO / name).is_file()
               and (copy / name).read_bytes() != (REPO / name).read_bytes()]
    assert not changed, f"CONTRIBUTING's commands changed {changed}: regenerate and commit them"


def text_blocks(page: str, heading: str | None = None) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(section(page, heading)) if m.group(1) == "text"]


def test_ci_installs_what_contributing_says_and_runs_the_suite():
    """.ci/run builds the environment from requirements.txt, installs Chromium when missing, runs the linter
    and the full suite: the commands CONTRIBUTING shows in text blocks (no test can run an install)."""
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install --quiet -r requirements.txt" in ci and re.search(r"^python -m pytest$", ci, re.M)
    assert re.search(r"^ruff check \.", ci, re.M)
    setup = "".join(text_blocks(CONTRIBUTING, "Set up"))
    suite = [line.strip() for block in text_blocks(CONTRIBUTING, "Run the tests") for line in block.splitlines()]
    assert "pip install -r requirements.txt" in setup and "python -m pytest" in suite
    # and the README's quick start shows the same two checks CI runs
    assert "ruff check . && python -m pytest" in [line.strip() for block in text_blocks(README, "Quick start")
                                                  for line in block.splitlines()]
    packages = re.search(r"apt-get install (.+)", setup).group(1).split()
    assert packages and all(re.search(rf"apt-get install [^\n]*\b{re.escape(p)}\b", ci) for p in packages), packages


def test_the_readme_is_short_and_its_results_block_nests_under_its_section():
    """At most 200 lines; the copied results tables bring no heading of the README's own outline level."""
    text = (REPO / README).read_text()
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines"
    match = re.search(r"<!-- results:start \([^)]+\) -->\n(.*?)<!-- results:end -->", text, re.S)
    assert match, "README.md has no results block"
    above = re.findall(r"^(#+) ", text[: match.start()], re.M)
    inside = re.findall(r"^(#+) ", match.group(1), re.M)
    assert above and inside and all(len(marks) > len(above[-1]) for marks in inside), (above[-1], inside)
