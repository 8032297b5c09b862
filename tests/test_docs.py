"""The documentation's own rules, on README.md, CONTRIBUTING.md and every page under docs/: every command
is run by a named test, every relative link and anchor resolves, no command points outside the
repository, every `-S key=value` names a real parameter, every marked block equals the file it copies."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import yaml

from stages.core.params import validate
from stages.methods.entries import model_config
from tests.conftest import REPO
from tests.docs import FENCE, commands, named_tests, pages

PAGES = pages()
IDS = [str(p) for p in PAGES]


def test_the_documentation_is_there():
    expected = {"README.md", "CONTRIBUTING.md", "docs/README.md", "docs/tutorial.md"}
    assert expected <= {str(p) for p in PAGES}


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_command_names_the_test_that_runs_it(page):
    """A ```bash block without its `<!-- tested by: tests/...::test_... -->` line, or naming a test that is
    gone, fails here (the named test reads the block with tests.docs.commands and runs it)."""
    for block, names in named_tests(page):
        assert names, f"{page}: no `<!-- tested by: ... -->` line above the block:\n{block}"
        for name in names:
            path, _, test = name.partition("::")
            assert (REPO / path).is_file(), f"{page}: {name}: no such file"
            if test:
                assert re.search(rf"^(async )?def {re.escape(test)}\(", (REPO / path).read_text(), re.M), (
                    f"{page}: {name}: no such test")


def prose(text: str) -> str:
    """The text without fenced blocks and inline code (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_{2}", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", FENCE.sub("", text), re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    found |= set(re.findall(r"<a (?:id|name)=\"([^\"]+)\"", text))
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\[[^\]]+\]:\s*(\S+)", re.M)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_relative_link_and_anchor_resolves(page):
    source = REPO / page
    for match in LINK.finditer(prose(source.read_text())):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (source.parent / file_part).resolve() if file_part else source
        assert resolved.exists(), f"{page}: link to {target}: {file_part} does not exist"
        assert REPO in resolved.parents or resolved == REPO, f"{page}: link to {target} leaves the repository"
        if anchor:
            assert resolved.suffix == ".md", f"{page}: link to {target}: an anchor into a file that is not Markdown"
            assert anchor in anchors(resolved), f"{page}: link to {target}: no such heading in {file_part or page}"


# Absolute paths of this or any machine (a virtualenv, a home, a scratch folder): a reader's copy has none
# of them. Placeholders (/path/to/...) and system programs (/usr/bin/...) are not paths of a machine.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|home|tmp|mnt|srv|var|opt|scratch)/[^\s`'\")]*")


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_no_absolute_path_outside_the_repository(page):
    text = (REPO / page).read_text()
    found = MACHINE_PATH.findall(text) + ([str(REPO)] if str(REPO) in text else [])
    assert not found, f"{page}: absolute paths of one machine: {found[:5]}"


def settings() -> list[tuple[str, str]]:
    return sorted({(str(page), m.group(1)) for page in PAGES for c in commands(page)
                   for m in re.finditer(r"-S '?([\w.]+)=", c)})


@pytest.mark.parametrize("page, dotted", settings())
def test_every_setting_the_docs_suggest_exists(page, dotted):
    """`dvc exp run -S key=value` fails on a key that is not in params.yaml ('Key ... is not in struct')."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    node = params
    for key in dotted.split("."):
        assert isinstance(node, dict) and key in node, f"{page}: -S {dotted}: params.yaml has no '{key}' there"
        node = node[key]
    checked = validate(params, REPO / "params.yaml")
    for name in checked["models"]:
        model_config(checked, checked["data"]["categories"][0], name)


MARKED = re.compile(r"<!-- (\w+):start \(([\w./-]+)\) -->\n(.*?)<!-- \1:end -->", re.S)  # (the file copied)


def marked_blocks() -> list[tuple[str, str, str, str]]:
    return [(str(page), name, source, body) for page in PAGES
            for name, source, body in MARKED.findall((REPO / page).read_text())]


@pytest.mark.parametrize("page, name, source, body", marked_blocks(),
                         ids=[f"{b[0]}:{b[1]}" for b in marked_blocks()])
def test_marked_blocks_equal_the_files_they_copy(page, name, source, body):
    """A results or cost table copied into a page is the generated file's own text: rerunning the pipeline
    (or the benchmark) without updating the page fails here."""
    assert body.strip(), f"{page}: the {name} block is empty"
    assert (REPO / source).is_file(), f"{page}: the {name} block copies {source}, which does not exist"
    assert body.strip() in (REPO / source).read_text(), f"{page}: the {name} block differs from {source}"
