"""docs/how-to/add-a-method.md, followed as written: its method file, registry entry and params block go into a
copy of the repository's stages/ (the repository's own registry is untouched), and the page's commands run
there on a tiny synthetic carpet: the unit tests pick the new method up, and it fits, scores and exports with
the parity check. Breaking the page's skeleton, entry or block fails here."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, default_params, write_params
from tests.docs import commands, fenced_blocks, section

# one worker runs this file: its module-scoped projects are built once, not once per worker
pytestmark = pytest.mark.xdist_group("docs_add_a_method")

PAGE = "docs/how-to/add-a-method.md"
REGISTRY_ENTRY = re.compile(r'^    "(\w+)": "stages\.methods\.(\w+):(\w+)",\n$')

# One interpreter runs every `python -m` line as `python -m` would (runpy, sys.argv set, exit code kept):
# torch, onnx and the backbone load once instead of once per command. Then the Mahalanobis distance computed
# apart, by scikit-learn's own estimator (its precision matrix), for the scores evaluate wrote.
DRIVER = r'''
import json, runpy, shlex, sys
import stages  # first: numerics of ./params.yaml

def python_m(line):
    argv = shlex.split(line)
    assert argv[:2] == ["python", "-m"], line
    sys.argv = [argv[2], *argv[3:]]
    try:
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        return exit.code or 0
    return 0

lines, shrinkage, module, broken = json.loads(sys.argv[1])
for line in lines:
    print(f"$ {line}", flush=True)
    code = python_m(line)
    print(f"exit {code}", flush=True)
    if code:
        sys.exit(f"failed: {line}")

import numpy as np
from sklearn.covariance import LedoitWolf, ShrunkCovariance
from stages.features.cache import load_features
folder = "data/features/carpet.category/efficientnet_lite0.features"
train, test = load_features(f"{folder}/train.pt"), load_features(f"{folder}/test.pt")
estimator = LedoitWolf() if shrinkage is None else ShrunkCovariance(shrinkage=shrinkage)
squared = estimator.fit(train.global_embeddings.double().numpy()).mahalanobis(test.global_embeddings.double().numpy())
json.dump(dict(zip(test.names, np.sqrt(squared).tolist())), open("expected.json", "w"))

# The page's forward that breaks rule 1, in place of the skeleton's: the export must refuse it.
import importlib

open(f"stages/methods/{module}.py", "w").write(broken)
importlib.reload(sys.modules[f"stages.methods.{module}"])
export = [line for line in lines if line.startswith("python -m stages.export ")][-1]
print(f"$ {export}  # rule 1 broken", file=sys.stderr, flush=True)
print(f"exit {python_m(export)}", file=sys.stderr, flush=True)
'''


def page_parts() -> dict:
    """The page's method file, registry entry, params block and chart lines, as a reader copies them."""
    [(_, skeleton)] = fenced_blocks(section(PAGE, "The method file"), "python")
    [(_, entry)] = fenced_blocks(section(PAGE, "The registry entry"), "python")
    params_block, chart_lines = (body for _, body in fenced_blocks(section(PAGE, "The params block"), "yaml"))
    match = REGISTRY_ENTRY.match(entry)
    assert match, f"{PAGE}: the registry entry is not one `\"<method>\": \"stages.methods.<method>:<Class>\",` line"
    models = yaml.safe_load(params_block)["models"]
    assert len(models) == 1, f"{PAGE}: the params block holds one model"
    [(model, block)] = models.items()
    rule_1 = section(PAGE, "Rule 1: the forward is traced and checked")
    [(_, forward)] = fenced_blocks(rule_1, "python")
    [(_, error)] = fenced_blocks(rule_1, "text")
    return {"skeleton": skeleton, "entry": entry, "method": match.group(1), "module": match.group(2),
            "model": model, "block": block, "charts": chart_lines, "broken": broken_skeleton(skeleton, forward),
            "error": error.strip()}


def broken_skeleton(skeleton: str, forward: str) -> str:
    """The skeleton with the page's rule-breaking forward in place of its own, and NumPy imported."""
    start = skeleton.index("    def forward(")
    end = skeleton.index("\n\n\nclass ", start)
    assert "import numpy as np" not in skeleton
    return skeleton[:start].replace("import torch\n", "import numpy as np\nimport torch\n") + forward.rstrip() + \
        skeleton[end:]


def test_the_pages_entries_match_each_other_and_the_repository():
    """The entry names the file and class the skeleton defines, the params block names the method and writes out
    both blocks (DVC refuses a stage whose declared param is absent), and each chart line is an existing
    model's line of dvc.yaml with the new model's name."""
    parts = page_parts()
    assert parts["method"] == parts["module"], "a method's file is named after its registry key"
    class_name = REGISTRY_ENTRY.match(parts["entry"]).group(3)
    assert re.search(rf"^class {class_name}\(AnomalyDetector\):", parts["skeleton"], re.M)
    assert re.search(rf'^    method = "{parts["method"]}"', parts["skeleton"], re.M)
    assert parts["block"]["method"] == parts["method"]
    assert set(parts["block"]) == {"method", "backbone", "fit", "score"}
    dvc_yaml = (REPO / "dvc.yaml").read_text()
    charts = parts["charts"].strip().splitlines()
    assert len(charts) == 4
    for line in charts:
        assert line.replace(f"/{parts['model']}.model/", "/knn_effnet.model/") + "\n" in dvc_yaml, line


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of stages/ and the tests with the page's three additions, on the tiny synthetic carpet of
    tests/conftest.py's `fitted` (8 training images of 64 px, 4 test images)."""
    parts = page_parts()
    root = tmp_path_factory.mktemp("add-a-method")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "stages", root / "stages", ignore=ignore)
    shutil.copytree(REPO / "tests", root / "tests", ignore=ignore)
    for name in ("pytest.ini", "ruff.toml"):
        shutil.copy(REPO / name, root / name)
    (root / "stages" / "methods" / f"{parts['module']}.py").write_text(parts["skeleton"])
    registry = root / "stages" / "methods" / "__init__.py"
    text = registry.read_text()
    start = text.index("REGISTRY = {\n")
    end = text.index("\n}\n", start) + 1
    registry.write_text(text[:end] + parts["entry"] + text[end:])
    params = default_params()
    params["data"]["synthetic"].update(image_size=64, n_train=8, n_test_good=2, n_test_per_cell=1,
                                       defect_types=["color", "hole"])
    params["data"]["synthetic"]["levels"] = [{"delta_e": 24, "area": 1536, "width": 8}]
    params["preprocess"].update(resize=56, crop_size=48, val_fraction=0.25)
    params.update(device="cpu", fit_seeds=[0])
    params["evaluate"]["bootstrap"]["resamples"] = 20
    # every shipped model stays (the tests want one of each registered method); only the new one is run
    params["models"][parts["model"]] = parts["block"]
    write_params(root, params)
    return root


def test_the_skeleton_passes_ruff(project):
    """The page's method file meets the repository's lint rules (ruff.toml) where it will live."""
    module = page_parts()["module"]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", f"stages/methods/{module}.py"],
                            cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_page_adds_a_method_that_fits_scores_and_exports(project):
    """The page's dev loop on the copy: its pytest line selects and passes the registry-wide test of the new
    method; fit, evaluate and export run, the export's parity check included; evaluate's scores are the
    Mahalanobis distances scikit-learn computes with its own precision matrix. Then the page's forward that
    breaks rule 1 fails the export with the error the page shows."""
    parts = page_parts()
    loop = commands(PAGE, "The dev loop")
    assert all(line.startswith("python -m ") for line in loop), loop
    assert [line.split()[2] for line in loop] == ["pytest", "stages.fit", "stages.evaluate", "stages.export"]
    setup = ["python -m stages.download carpet", "python -m stages.preprocess carpet",
             "python -m stages.extract carpet efficientnet_lite0"]
    (project / "driver.py").write_text(DRIVER)
    arguments = [setup + loop, parts["block"]["fit"].get("shrinkage"), parts["module"], parts["broken"]]
    result = subprocess.run([sys.executable, "driver.py", json.dumps(arguments)], cwd=project, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(project), "TQDM_DISABLE": "1"})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log

    # -k <method> selects the registry-wide test of tests/test_methods.py, parametrised by the new key
    assert re.search(r"\b1 passed, \d+ deselected\b", result.stdout), log
    model = parts["model"]
    assert f"export@carpet-{model}: models/carpet.category/{model}.export/model.onnx" in result.stdout
    assert "onnxruntime equals torch on 4 test images" in result.stdout
    assert (project / "models" / "carpet.category" / f"{model}.export" / "model.onnx").is_file()
    expected = json.loads((project / "expected.json").read_text())
    with open(project / "plots" / "carpet.category" / f"{model}.model" / "scores.csv", newline="") as rows:
        scores = {row["image"]: float(row["score"]) for row in csv.DictReader(rows)}
    assert sorted(scores) == sorted(expected) and len(scores) == 4
    for name, score in scores.items():
        assert score == pytest.approx(expected[name], rel=1e-4), name

    assert "# rule 1 broken" in result.stderr, log
    broken = result.stderr.split("# rule 1 broken")[1].splitlines()
    assert broken[-1] == "exit 1" and broken[-2] == parts["error"], log
