"""docs/how-to/mvtec-paper.md and share-and-sweep.md against what they describe: the budget each page shows is
the configuration's own block, and every `-S key=value` it suggests (also in ```text blocks and inline, which
tests/test_docs.py does not read) is accepted by the params file it is meant for."""
from __future__ import annotations

import copy
import re

import pytest
import yaml

from stages.core.params import validate
from stages.methods.entries import model_config
from tests.conftest import REPO
from tests.docs import fenced_blocks, section

PAPER = "docs/how-to/mvtec-paper.md"
SHARE = "docs/how-to/share-and-sweep.md"
BUDGETS = {  # the page's heading -> the configuration whose budget block it shows
    "PatchCore: configs/patchcore_paper.yaml": "configs/patchcore_paper.yaml",
    "PaDiM: configs/padim_paper.yaml": "configs/padim_paper.yaml",
}


def budget_block(config: str) -> str:
    """The lines between `# budget:start` and `# budget:end` of a configuration, without their '# '."""
    text = (REPO / config).read_text()
    match = re.search(r"^# budget:start[^\n]*\n(.*?)^# budget:end", text, re.S | re.M)
    assert match, f"{config}: no '# budget:start' ... '# budget:end' block"
    lines = match.group(1).splitlines()
    assert all(line.startswith("# ") for line in lines), f"{config}: a budget line is not a '# ' comment"
    return "\n".join(line[2:] for line in lines)


@pytest.mark.parametrize("heading, config", BUDGETS.items())
def test_the_page_shows_each_configs_own_budget(heading, config):
    """The budget is measured into the config (bench/stand_in.py budget --write); the page repeats it as is.
    When this fails, paste the expected text into the page's ```text block under the heading."""
    blocks = fenced_blocks(section(PAPER, heading), "text")
    assert blocks, f"{PAPER}: no ```text block under '{heading}'"
    shown = blocks[0][1].rstrip("\n")
    expected = budget_block(config)
    assert shown == expected, f"{PAPER} '{heading}' differs from {config}'s budget block; it should read:\n{expected}"


SETTING = re.compile(r"-S '?(\+{0,2})([\w.]+)=([^'\s`;]+)'?")


def suggested(page: str) -> list[tuple[str, str, str]]:
    """(prefix, key, value) of every -S on the page: bash, text and inline code alike."""
    text = (REPO / page).read_text()
    return sorted(set(SETTING.findall(text)))


def check_settings(page: str, params_file: str, settings: list[tuple[str, str, str]]) -> None:
    """Each -S as DVC applies it to `params_file` (a plain key must exist; '+' adds one that does not), then
    the result through the schemas: a key or value the pipeline would refuse fails here."""
    params = copy.deepcopy(yaml.safe_load((REPO / params_file).read_text()))
    for prefix, dotted, value in settings:
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            assert isinstance(node, dict) and key in node, f"{page}: -S {dotted}: {params_file} has no '{key}' there"
            node = node[key]
        if prefix == "+":
            assert last not in node, f"{page}: -S +{dotted}: {params_file} has it already (drop the '+')"
        elif not prefix:
            assert last in node, f"{page}: -S {dotted}: {params_file} has no '{last}' (DVC refuses it; '+' adds it)"
        node[last] = yaml.safe_load(value)
    checked = validate(params, REPO / params_file)
    for name in checked["models"]:
        model_config(checked, checked["data"]["categories"][0], name)


def test_the_paper_pages_settings_apply_to_both_paper_configs():
    settings = suggested(PAPER)
    keys = {key for _, key, _ in settings}
    assert {"data.mvtec.url", "data.categories", "numerics", "device", "backbones.wide_resnet50_2.weights"} <= keys
    for config in BUDGETS.values():
        check_settings(PAPER, config, [s for s in settings if "efficientnet_lite0" not in s[1]])
    # the rehearsal on the default project
    check_settings(PAPER, "params.yaml", [s for s in settings if "efficientnet_lite0" in s[1]])


def test_the_sweep_pages_settings_apply_to_params_yaml():
    settings = suggested(SHARE)
    assert {"preprocess.max_train", "models.patchcore_effnet.fit.coreset_ratio"} <= {key for _, key, _ in settings}
    check_settings(SHARE, "params.yaml", [(p, k, v) for p, k, v in settings if "$" not in v])  # $r, $n: loop values


def test_a_setting_the_config_lacks_is_caught():
    with pytest.raises(AssertionError, match="has no 'weights'"):
        check_settings(PAPER, "configs/patchcore_paper.yaml", [("", "backbones.wide_resnet50_2.weights", "w.pth")])


def test_the_branch_commands_are_the_configs_own():
    """The page's branch command is the one the config's header gives (one source of truth for the route)."""
    for config in BUDGETS.values():
        name = config.removeprefix("configs/").removesuffix(".yaml").replace("_", "-")
        line = f"git checkout -b {name} && cp {config} params.yaml && dvc repro"
        assert line in (REPO / config).read_text(), f"{config}: its header no longer says {line!r}"
    assert "git checkout -b patchcore-paper && cp configs/patchcore_paper.yaml params.yaml && dvc repro" in (
        REPO / PAPER).read_text()


def test_the_strict_and_fast_table_is_the_recorded_runs():
    """mvtec-paper.md's strict-against-fast table, row by row, against the two stand-in result files it names."""
    import json

    runs = {numerics: json.loads((REPO / f"bench/results/stand_in_patchcore_paper_hazelnut_seed0_{numerics}_cpu.json")
                                 .read_text()) for numerics in ("strict", "fast")}
    seconds = {}
    for numerics, run in runs.items():
        assert run["numerics"] == numerics and run["fit_seeds"] == [0] and run["device"] == "cpu"
        ((category),) = run["measured"]
        assert category["counts"] == {"train": 391, "good": 40, "defective": 70} and category["image_size"] == 1024
        seconds[numerics] = {s["kind"]: s["seconds"] for s in category["stages"]}
    table = section(PAPER, "Strict or fast numerics, CPU or GPU")
    rows = {line.split("|")[1].strip().split()[0]: [float(c) for c in line.strip("|").split("|")[1:]]
            for line in table.splitlines() if line.startswith(("| extract", "| fit", "| evaluate"))}
    kinds = ("extract", "fit", "evaluate")
    assert rows == {kind: [round(seconds[numerics][kind], 1) for numerics in ("strict", "fast")] for kind in kinds}
