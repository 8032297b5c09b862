"""The reference pages (docs/reference/pipeline.md, outputs.md) against the code they describe: the
generated tables equal what `python -m stages.docs` prints from dvc.yaml, and every list the code can
give (exit codes, metrics keys, predict's columns, the ONNX metadata, the deployment record, the demo's
routes, replies and statuses, the plots page's sections) equals the page's. In-process, no stage run.
"""
from __future__ import annotations

import copy
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from stages import docs
from stages.core.errors import PipelineError
from tests.conftest import REPO
from tests.docs import section

PIPELINE, OUTPUTS = "docs/reference/pipeline.md", "docs/reference/outputs.md"


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of `text`: a list of rows (the header first), each a list of cells."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r"-+", c) for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def first_column(table: list[list[str]]) -> list[str]:
    """The names a table's first column documents: `a`, `b` -> [a, b] (backticks and notes dropped)."""
    names = []
    for row in table[1:]:
        names += re.findall(r"`([^`]+)`", row[0]) or [row[0]]
    return names


def table_headed(page: str, heading: str, first: str, index: int = 0) -> list[list[str]]:
    matching = [t for t in tables(section(page, heading)) if t[0][0] == first]
    assert len(matching) > index, f"{page}, '{heading}': no table with a '{first}' column"
    return matching[index]


# --- pipeline.md ------------------------------------------------------------------------------------


def test_the_stage_and_rerun_tables_are_generated_from_dvc_yaml():
    text = (REPO / PIPELINE).read_text()
    assert docs.pipeline_page(text) == text, f"run `python -m stages.docs` to regenerate {PIPELINE}"
    stages = docs.load_stages()
    listed = [re.sub(r"@.*", "", row[0].strip("`")) for row in tables(docs.stage_table(stages))[0][1:]]
    assert listed == list(stages) and len(listed) == 13


def test_reruns_follow_the_params_and_outputs_dvc_yaml_declares():
    stages = docs.load_stages()
    # a scoring param re-scores (evaluate, figures) and never refits; export follows through scoring.json
    direct, after = docs.reruns(stages, "models.<name>.score.smoothing_sigma")
    assert {"evaluate", "figures"} <= set(direct) and "fit" not in direct + after and "export" in after
    # a preprocess param never reruns the download; every reader of the prepared images is downstream
    direct, after = docs.reruns(stages, "preprocess.resize")
    assert direct == ["preprocess"] and "download" not in after and {"extract", "overview", "tsne"} <= set(after)
    # a backbone feeds its readers, not the overview (which reads pixels.features, never a backbone's)
    _, after = docs.reruns(stages, "backbones.<name>.layers")
    assert {"fit", "tsne"} <= set(after) and "overview" not in after
    assert docs.reruns(stages, "figures.tsne.seed") == (["tsne"], [])
    # DVC refuses a stage whose declared param is missing: only those keys are marked "must be set"
    assert docs.declared_exactly(stages, "evaluate.fpr_limit") and docs.declared_exactly(stages, "models.<name>.score")
    assert not docs.declared_exactly(stages, "data.download_dir")
    assert not docs.declared_exactly(stages, "models.<name>.score.k")


def test_a_param_no_stage_declares_stops_the_generator():
    stages = copy.deepcopy(docs.load_stages())
    stages["tsne"]["params"].remove("figures.tsne")
    with pytest.raises(PipelineError, match="figures.tsne.perplexity: no stage of dvc.yaml declares it"):
        docs.params_page(stages)


def exit_code(function) -> int:
    from stages.core.cli import run_main

    with pytest.raises(SystemExit) as info:
        run_main(function)
    return info.value.code


def raise_(exc: BaseException):
    def function():
        raise exc
    return function


def test_the_exit_codes_table_is_what_the_tools_return(monkeypatch, tmp_path):
    from stages import predict

    monkeypatch.chdir(tmp_path)  # run_main cleans .tmp/ of the working folder
    rows = {row[0].strip("`"): row[1] for row in table_headed(PIPELINE, "Exit codes and errors", "exit code")[1:]}
    observed = {
        exit_code(raise_(PipelineError("x: refused"))): "refused input",
        exit_code(raise_(KeyboardInterrupt())): "Ctrl-C",
        exit_code(raise_(RuntimeError("a bug"))): "traceback",
        exit_code(lambda: sys.exit(predict.main([]))): "usage",  # no model: argparse's usage error
    }
    for code, words in observed.items():
        assert str(code) in rows and words in rows[str(code)], f"{PIPELINE}: exit code {code} ({words}) differs"
    assert set(rows) == {*map(str, observed), "0", "128 + signal"}


# --- outputs.md -------------------------------------------------------------------------------------


def test_the_metrics_keys_are_the_ones_evaluate_writes():
    from stages.evaluation import metrics

    labels, scores = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    types = ["good", "good", "cut", "cut", "hole"]
    per_seed = {seed: metrics.evaluate(labels, scores + seed, types, np.array([0.1, 0.2, 0.3])) for seed in (0, 1)}
    for result in per_seed.values():  # a model with maps on a category with masks adds these two
        result.update(pixel_auroc=0.9, aupro=0.8)
    resampled = {name: np.linspace(0.5, 1, 20) for name in metrics.INTERVAL_METRICS}
    summary = metrics.summarise_seeds(per_seed, resampled, 0.95, 20)
    heading = "Per model: `metrics/models/<category>.category/<model>.metrics.json`"
    table = table_headed(OUTPUTS, heading, "key")
    evaluate_own = ["category", "model", "method", "backbone", "n_train", "levels"]  # stages/evaluate.py `result`
    assert sorted(first_column(table)) == sorted([*evaluate_own, *summary])
    per_seed_row = next(row for row in table if row[0] == "`per_seed`")
    assert sorted(re.findall(r"`(\w+)`", per_seed_row[1])) == sorted(per_seed[0])
    interval_row = next(row for row in table if row[0] == "`interval`")
    assert sorted(re.findall(r"`(\w+)`", interval_row[1])) == sorted([*summary["interval"]])


def test_predicts_columns_are_documented():
    from stages.predict import COLUMNS

    assert first_column(table_headed(OUTPUTS, "Predictions", "column of `scores.csv`")) == COLUMNS


def test_the_onnx_interface_is_documented():
    from stages.deploy import onnx_graph
    from stages.deploy.onnx_model import metadata
    from stages.deploy.overlay import ColourScale

    fitted = SimpleNamespace(
        extractor=None, category="carpet", name="m", seed=0, threshold=1.5, colour_scale=ColourScale(0.5, 1.5),
        detector=SimpleNamespace(method="patchcore", uses_global_embedding=False),
        preprocess={"resize": 256, "crop_size": 224, "mode": "crop", "pad_fill": [124, 116, 104]},
        backbone=None, input_size=(224, 224),
    )
    assert sorted(first_column(table_headed(OUTPUTS, "The ONNX export", "key"))) == sorted(metadata(fitted))
    interface = table_headed(OUTPUTS, "The ONNX export", "")
    assert [row[1].strip("`") for row in interface[1:]] == ["image", *onnx_graph.OUTPUTS[-1]]
    required = re.search(r"requires (.+?), checks", section(OUTPUTS, "The ONNX export"), re.S).group(1)
    assert sorted(re.findall(r"`(\w+)`", required)) == sorted(onnx_graph.METADATA_KEYS)


def test_the_deployment_record_is_documented(monkeypatch, tmp_path):
    from stages.deploy import deployment

    monkeypatch.chdir(tmp_path)  # no models/: the identity of each runtime is null
    model = SimpleNamespace(category="carpet", name="m", runtime="onnx")
    record = deployment.build(model, np.linspace(0, 1, 60), 0.1, 0.95, "good/", 0.9)
    documented = first_column(table_headed(OUTPUTS, "Deployment thresholds", "key"))
    assert sorted(documented) == sorted([*record, "previous"])


def test_the_demos_routes_replies_and_statuses_are_documented(monkeypatch, tmp_path):
    from stages import demo
    from stages.deploy.overlay import ColourScale
    from stages.methods.base import Prediction

    monkeypatch.chdir(tmp_path)  # no models/: the app starts with none
    app = demo.create_app()
    served = sorted((sorted(getattr(r, "methods", None) or ["WebSocket"])[0], r.path) for r in app.routes)
    routes = table_headed(OUTPUTS, "The demo's HTTP API", "method")
    documented = sorted((row[0], re.match(r"`([^`?\[]+)", row[1]).group(1)) for row in routes[1:])
    assert documented == served

    model = SimpleNamespace(
        prepare=lambda _: np.zeros((8, 8, 3), np.uint8), threshold=1.0, colour_scale=ColourScale(0.0, 1.0),
        score=lambda images, names: Prediction(np.array([2.0]), np.zeros((1, 8, 8), np.float32)), runtime="onnx",
    )
    reply = demo.score_bytes(model, "carpet/m", b"", "upload", "PNG")
    documented = first_column(table_headed(OUTPUTS, "The demo's HTTP API", "key"))
    assert sorted(documented) == sorted([*reply, "threshold_source"])  # Models.score adds the source

    source = (REPO / "stages/demo.py").read_text()
    codes = set(re.findall(r"HTTPException\((\d{3})|\"status\": (\d{3})|status_code=(\d{3})", source))
    codes = {c for group in codes for c in group if c}
    codes |= {f"close {c}" for c in re.findall(r"close\(code=(\d+)", source)}
    statuses = {row[0] for row in table_headed(OUTPUTS, "The demo's HTTP API", "status")[1:]}
    assert statuses == codes


def test_the_plots_page_sections_are_documented_in_order():
    from stages.plotting.page import GROUPS

    text = section(OUTPUTS, "Plots and figures")
    listed = re.findall(r"^\d+\. \*\*(.+?)\*\*", text, re.M)
    assert listed == [group.heading for group in GROUPS if group.level == 2]
