"""Reading the documentation's commands, for the tests that run them (tests/test_docs.py checks the rules).

Every ```bash block of README.md, CONTRIBUTING.md and docs/**/*.md is preceded by a comment naming the
test(s) that run its commands, e.g.

    <!-- tested by: tests/test_docs_own_images.py::test_calibrate_then_predict -->
    ```bash
    python -m stages.calibrate patchcore_effnet line/good
    ```

and that test reads the block through `commands(page, heading)` and runs its lines as written.
"""
from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

TESTED_BY = re.compile(r"<!--\s*tested by:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)


def pages() -> list[Path]:
    """Every documentation page, relative to the repository."""
    found = [Path("README.md"), Path("CONTRIBUTING.md"), *sorted((REPO / "docs").rglob("*.md"))]
    return [Path(p).relative_to(REPO) if Path(p).is_absolute() else Path(p) for p in found if (REPO / p).is_file()]


def section(page: str | Path, heading: str | None = None) -> str:
    """A page's text, or one section of it: from the heading (any level) to the next heading of the same
    or a higher level."""
    text = (REPO / page).read_text()
    if heading is None:
        return text
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.M)
    assert match, f"{page} has no section '{heading}'"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def fenced_blocks(text: str, language: str = "bash") -> list[tuple[int, str]]:
    """(offset, body) of each fenced block of `language` in `text`."""
    return [(m.start(), m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def commands(page: str | Path, heading: str | None = None) -> list[str]:
    """Each command line of the page's (or section's) bash blocks, comments and blank lines dropped;
    a line ending in a backslash is joined with the next."""
    found = []
    for _, body in fenced_blocks(section(page, heading)):
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def named_tests(page: str | Path) -> list[tuple[str, list[str]]]:
    """(block, the tests named in the comment right above it) for each bash block of the page."""
    text = (REPO / page).read_text()
    out = []
    for offset, body in fenced_blocks(text):
        before = text[:offset].rstrip().splitlines()
        names = TESTED_BY.fullmatch(before[-1].strip()) if before else None
        out.append((body, [n.strip() for n in names.group(1).split(",")] if names else []))
    return out
