"""The README's commands and checkable facts: every command it shows is run by a test, every
`-S key=value` it suggests names a real parameter."""
from __future__ import annotations

import re

import pytest
import yaml

from stages.models import model_config
from stages.params import validate
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
