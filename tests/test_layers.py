"""The layout of stages/: entry points on top, the library in packages, each layer importing only
downwards (core -> data -> features -> methods -> evaluation -> deploy -> plotting -> entry points)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS = ("core", "data", "features", "methods", "evaluation", "deploy", "plotting")
STAGES = REPO / "stages"


def stages_imports(path: Path) -> list[str]:
    """Every `stages.*` module a file imports, at any level (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("stages")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("stages"):
            found += [node.module] if node.module != "stages" else [f"stages.{alias.name}" for alias in node.names]
    return found


def target(module: str) -> str:
    """'stages.core.params' -> 'core'; 'stages.fit' -> 'fit' (an entry point)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "stages"


LIBRARY = sorted(p for layer in LAYERS for p in (STAGES / layer).rglob("*.py"))


def test_the_top_of_stages_holds_only_entry_points_and_the_library_packages():
    entries = sorted(p.name for p in STAGES.iterdir() if not p.name.startswith(("__", ".")))
    assert {p for p in entries if not p.endswith(".py")} == set(LAYERS)
    for name in entries:
        if name.endswith(".py"):
            assert 'if __name__ == "__main__":' in (STAGES / name).read_text(), f"stages/{name} is not an entry point"


@pytest.mark.parametrize("path", LIBRARY, ids=[str(p.relative_to(STAGES)) for p in LIBRARY])
def test_a_library_module_imports_only_its_own_layer_and_those_below(path):
    own = path.relative_to(STAGES).parts[0]
    for module in stages_imports(path):
        layer = target(module)
        assert layer in LAYERS, f"{path.relative_to(REPO)} imports the entry point {module}"
        assert LAYERS.index(layer) <= LAYERS.index(own), f"{path.relative_to(REPO)} ({own}) imports {module} ({layer})"


def test_core_imports_no_other_package():
    for path in (STAGES / "core").rglob("*.py"):
        assert {target(m) for m in stages_imports(path)} <= {"core"}, path
