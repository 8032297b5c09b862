"""The README's commands and checkable facts: every command it shows is run by a test, every
`-S key=value` it suggests names a real parameter."""
from __future__ import annotations

import re

import pytest
import yaml

from stages.core.params import validate
from stages.methods.entries import model_config
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def bash_blocks(heading: str | None = None) -> list[str]:
    """The ```bash blocks of the README, or of one section (## or ### heading) only."""
    text = README
    if heading is not None:
        match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^## )", README, re.S | re.M)
        assert match, f"README has no section '{heading}'"
        text = match.group(1)
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def readme_commands(heading: str | None = None) -> list[str]:
    """Each command line of those blocks, comments and blank lines dropped."""
    commands = []
    for block in bash_blocks(heading):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


SETTINGS = sorted({m.group(1) for c in readme_commands() for m in re.finditer(r"-S ([\w.]+)=", c)})


def test_the_readme_suggests_settings():
    assert "models.patchcore_effnet.fit.coreset_ratio" in SETTINGS and "preprocess.max_train" in SETTINGS


@pytest.mark.parametrize("dotted", SETTINGS)
def test_every_setting_the_readme_suggests_exists(dotted):
    """`dvc exp run -S key=value` fails on a key that is not in params.yaml ('Key ... is not in struct')."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    node = params
    for key in dotted.split("."):
        assert isinstance(node, dict) and key in node, f"README: -S {dotted}: params.yaml has no '{key}' there"
        node = node[key]
    checked = validate(params, REPO / "params.yaml")
    for name in checked["models"]:
        model_config(checked, "carpet", name)


# Every command line of the README's bash blocks, and where the suite runs it. "as written": the test
# runs the README's own lines; otherwise the same DVC commands on the tiny project, or (queue and
# sweep lines) their -S keys checked above and the flow by the named test.
RUN_BY = {
    r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install -r requirements\.txt && dvc repro":
        ".ci/run (the install) and tests/test_pipeline.py::test_repro_writes_metrics_for_every_model",
    r"\. \.venv/bin/activate && python -m pytest": ".ci/run",
    r"cp params\.yaml \.params\.keep && cp configs/study_carpet\.yaml params\.yaml .*":
        "tests/test_backbones.py::test_shipped_configs_run_end_to_end_with_cached_torchvision_weights",
    r"dvc queue (status|start.*)": "tests/test_readme.py::test_every_setting_the_readme_suggests_exists",
    r"for \w+ in [\d. ]+; do dvc exp run --queue -S [\w.]+=\$\w+; done":
        "tests/test_readme.py::test_every_setting_the_readme_suggests_exists",
    r"dvc exp show( --only-changed)?": "tests/test_pipeline.py::test_the_readme_comparing_runs_commands_run",
    r"dvc remote add -d shared \S+": "tests/test_pipeline.py::test_fresh_clone_and_pull_recomputes_nothing",
    r"dvc repro && git add -A && git commit -m results && dvc push --run-cache":
        "tests/test_pipeline.py::test_fresh_clone_and_pull_recomputes_nothing",
    r"git clone <repo> && cd <repo> && dvc pull && dvc status":
        "tests/test_pipeline.py::test_fresh_clone_and_pull_recomputes_nothing",
    r"dvc repro --glob '\*@\w+' '\*@\w+-\*' && dvc push --run-cache":
        "tests/test_pipeline.py::test_split_across_machines_restores_every_per_category_stage",
    r"dvc pull --run-cache --allow-missing && dvc repro --pull":
        "tests/test_pipeline.py::test_split_across_machines_restores_every_per_category_stage",
    r"dvc exp run -S \S+|dvc metrics diff|dvc plots (show|diff)":
        "tests/test_pipeline.py::test_the_readme_comparing_runs_commands_run",
    r"python -m stages\.predict .*": "tests/test_pipeline.py::test_the_readme_scoring_commands_and_the_benchmark_run",
    r"python -m stages\.demo": "tests/test_demo.py::test_demo_scores_an_upload_as_predict_does",
    r"python -m stages\.few_shot": "tests/test_hostile.py",
}


def test_every_readme_command_is_run_by_a_named_test():
    """A command added to the README without a test that runs it fails here; so does a named test that is gone."""
    import re as _re

    commands = readme_commands()
    unmatched = [c for c in commands if not any(_re.fullmatch(pattern, c) for pattern in RUN_BY)]
    assert not unmatched, f"README commands no test runs (add them to RUN_BY with their test): {unmatched}"
    for where in RUN_BY.values():
        for ref in _re.findall(r"(tests/\S+?\.py|\.ci/run)(?:::(\w+))?", where):
            path, name = ref
            assert (REPO / path).is_file(), where
            if name:
                assert _re.search(rf"^def {name}\(", (REPO / path).read_text(), _re.M), where
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install --quiet -r requirements.txt" in ci and "python -m pytest" in ci


def marked_block(name: str) -> str:
    match = re.search(rf"<!-- {name}:start \(([^)]+)\) -->\n(.*?)<!-- {name}:end -->", README, re.S)
    assert match, f"README has no {name} block"
    return match.group(1), match.group(2)


@pytest.mark.parametrize("name", ["results", "cost"])
def test_the_readme_shows_the_committed_numbers_word_for_word(name):
    """The README's results tables are metrics/summary.md's, its cost table bench/results/cost.md's:
    rerunning `dvc repro` (or the benchmark) without updating the README fails here."""
    source, block = marked_block(name)
    assert block.strip() and block.strip() in (REPO / source).read_text(), f"README {name} block differs from {source}"
