"""Each DVC stage declares exactly the modules of stages/ that its script imports (statically, function-level
imports included), so editing code reruns the stages that run it. fit@, evaluate@ and figures@ are
matrix stages whose items carry the model's name only, so they declare the whole stages/methods/
folder (a folder dep covers every file under it)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """Files of stages.* modules imported anywhere in `path` (package __init__ files included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] != "stages":
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                file = module_file(".".join(parts[:i]))
                if file is not None:
                    found.add(file)
    return found


def closure(*paths: Path) -> set[str]:
    todo, seen = list(paths), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imported_files(path))
    # an empty package __init__.py runs no code: nothing to declare
    return {str(p.relative_to(REPO)) for p in seen if p.name != "__init__.py" or p.read_text().strip()}


def declared(stage: dict) -> tuple[set[str], list[str]]:
    """(declared .py files, declared folders under stages/)."""
    deps = [d.split("#")[0].strip() for d in stage["deps"]]
    return {d for d in deps if d.endswith(".py")}, [
        d for d in deps if d.startswith("stages/") and not d.endswith(".py")
    ]


DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def cases():
    for name, stage in DVC_YAML.items():
        assert "foreach" not in stage, f"{name}: per-category stages are matrices"
        dims = {k: v for k, v in stage.get("matrix", {}).items() if k != "category"}
        if not dims:
            yield name, stage, None
            continue
        ((dim, ref),) = dims.items()
        for key, entry in PARAMS[ref.strip("${}")].items():
            yield f"{name}@<category>-{key}", stage, entry.get("method") if dim == "model" else None


@pytest.mark.parametrize("name, stage, method", list(cases()), ids=[c[0] for c in cases()])
def test_stage_declares_every_module_it_imports(name, stage, method):
    script = REPO / (stage["cmd"].split()[2].replace(".", "/") + ".py")
    roots = [script]
    if method is not None:  # the registry imports the method's module by name
        roots.append(REPO / "stages" / "methods" / f"{method}.py")
        assert roots[-1].is_file(), f"method {method} must live in stages/methods/{method}.py"
    files, folders = declared(stage)
    needed = closure(*roots)
    missing = {f for f in needed - files if not any(f.startswith(folder + "/") for folder in folders)}
    assert not missing, f"{name} imports but does not declare {sorted(missing)}"
    assert files <= needed, (
        f"{name} declares modules it never imports (they rerun it for nothing): {sorted(files - needed)}"
    )


def test_method_files_are_named_after_their_registry_key():
    from stages.methods import REGISTRY

    for method, target in REGISTRY.items():
        assert target.split(":")[0] == f"stages.methods.{method}"
