"""params.yaml is read as DVC reads it and every section is a schema: one-line errors naming the key.

In-process: each case is a call to load_params + model_config, no stage subprocess.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from stages.core.errors import PipelineError
from stages.core.params import load_params, read_yaml
from stages.methods.entries import model_config
from tests.conftest import REPO

DEFAULT_TEXT = (REPO / "params.yaml").read_text()


def load_all(tmp_path: Path, text: str) -> dict:
    """Everything a stage would check: the file, then every model's method blocks."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    params = load_params(path)
    for name in params["models"]:
        model_config(params, "carpet", name)
    return params


def edited(old: str, new: str) -> str:
    assert DEFAULT_TEXT.count(old) >= 1, old
    return DEFAULT_TEXT.replace(old, new, 1)


def test_params_yaml_is_read_exactly_as_dvc_reads_it(tmp_path):
    from dvc.utils.serialize import parse_yaml

    text = DEFAULT_TEXT + "extra_for_this_test:\n  lr: 1e-4\n  flag: yes\n  octal: 010\n"
    path = tmp_path / "p.yaml"
    path.write_text(text)
    ours = read_yaml(path)
    assert ours == parse_yaml(text, str(path))
    # YAML 1.2: scientific notation without a dot is a float, `yes` is a string
    assert ours["extra_for_this_test"] == {"lr": 1e-4, "flag": "yes", "octal": 10}
    # a version directive: ruamel's pure-Python parser honours `%YAML 1.1` (yes -> True, 010 -> 8), its C parser
    # (ruamel.yaml.clib, in requirements.txt) ignores it; whichever DVC uses, the stages use the same
    path.write_text("%YAML 1.1\n---\n" + text)
    assert read_yaml(path) == parse_yaml(path.read_text(), str(path))


@pytest.mark.parametrize(
    "old, new, model, block, key, value",
    [
        ("coreset_ratio: 0.1", "coreset_ratio: 2e-2", "patchcore_effnet", "fit", "coreset_ratio", 0.02),
        ("smoothing_sigma: 4\n", "smoothing_sigma: 4e0\n", "patchcore_effnet", "score", "smoothing_sigma", 4.0),
        ("lr: 0.001", "lr: 1e-4", "ae_l2", "fit", "lr", 1e-4),
    ],
)
def test_scientific_notation_is_a_float(tmp_path, old, new, model, block, key, value):
    params = load_all(tmp_path, edited(old, new))
    assert getattr(getattr(model_config(params, "carpet", model), block), key) == value


def test_scientific_notation_in_evaluate(tmp_path):
    params = load_all(tmp_path, edited("fpr_limit: 0.3", "fpr_limit: 3e-1"))
    assert params["evaluate"]["fpr_limit"] == 0.3


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(PipelineError) as info:
        load_all(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message and "params.yaml:" not in message  # one line, one prefix
    return message


@pytest.mark.parametrize(
    "old, new, expected",
    [
        # misspelled keys: never a silent default, and the closest known key is named
        (
            "    weights: null",
            "    weight: /my.pth",
            "backbones.efficientnet_lite0.weight: unknown parameter (did you mean 'weights'?",
        ),
        (
            "    layers: [blocks.2, blocks.4]",
            "    layer: [blocks.2]",
            "backbones.efficientnet_lite0.layer: unknown parameter (did you mean 'layers'?",
        ),
        (
            "      batch_size: 8\n      patience: 5",
            "      batchsize: 8\n      patience: 5",
            "models.ae_l2.fit.batchsize: unknown parameter (did you mean 'batch_size'?",
        ),
        ("    sha256: null", "    sha265: null", "data.mvtec.sha265: unknown parameter (did you mean 'sha256'?"),
        ("  fpr_limit: 0.3", "  fpr_limt: 0.3", "evaluate.fpr_limt: unknown parameter (did you mean 'fpr_limit'?"),
        ("  resize: 256", "  resise: 256", "preprocess.resise: unknown parameter (did you mean 'resize'?"),
        ("evaluate:\n", "evaluation:\n", "evaluation: unknown parameter (did you mean 'evaluate'?"),
        (
            "    n_train: 100",
            "    n_trains: 100",
            "data.synthetic.n_trains: unknown parameter (did you mean 'n_train'?",
        ),
        (
            "    score:\n      k: 50",
            "    scoring:\n      k: 50",
            "models.knn_effnet.scoring: unknown parameter (did you mean 'score'?",
        ),
        ("      k: 50", "      kk: 50", "models.knn_effnet.score.kk: unknown parameter (did you mean 'k'?"),
        # a fitting param in the scoring block is named as unknown there
        (
            "      num_neighbors: 9",
            "      coreset_ratio: 0.1",
            "models.patchcore_effnet.score.coreset_ratio: unknown parameter",
        ),
        # wrong types and ranges: the key, what was given and what is allowed
        (
            "      patch_size: 3",
            '      patch_size: "3"',
            "models.patchcore_effnet.fit.patch_size: must be an odd integer >= 1, got '3'",
        ),
        (
            "      patch_size: 3",
            "      patch_size: 4",
            "models.patchcore_effnet.fit.patch_size: must be an odd integer >= 1, got 4",
        ),
        (
            "      target_embed_dimension: 128\n      batch_size: 8",
            "      target_embed_dimension: 128\n      batch_size: 0",
            "models.patchcore_effnet.fit.batch_size: must be an integer >= 1, got 0",
        ),
        (
            "      pretrain_embed_dimension: 128",
            '      pretrain_embed_dimension: "128"',
            "models.patchcore_effnet.fit.pretrain_embed_dimension: must be an integer >= 1, got '128'",
        ),
        (
            "      coreset_ratio: 0.1",
            "      coreset_ratio: 1.5",
            "models.patchcore_effnet.fit.coreset_ratio: must be a finite number in (0, 1], got 1.5",
        ),
        (
            "      reweight: false",
            "      reweight: 1",
            "models.patchcore_effnet.score.reweight: must be true or false, got 1",
        ),
        (
            "      image_score: max",
            "      image_score: median",
            "models.ae_l2.score.image_score: must be one of max, mean, got 'median'",
        ),
        (
            "      image_size: 128",
            "      image_size: 100",
            "models.ae_l2.fit.image_size: must be a multiple of 16 (2 ** len(channels)), got 100",
        ),
        ("      loss: mse", "      loss: l1", "models.skipae_mse.fit.loss: must be one of mse, ssim, got 'l1'"),
        (
            "      channels: [32, 64, 128, 256]",
            "      channels: []",
            "models.ae_l2.fit.channels: must be a non-empty list of integers each >= 1, got []",
        ),
        ("device: auto", "device: gpu", "device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (
            "  threshold_n_std: 2",
            "  threshold_n_std: .nan",
            "evaluate.threshold_n_std: must be a finite number >= 0, got nan",
        ),
        (
            "  threshold_n_std: 2",
            "  threshold_n_std: .inf",
            "evaluate.threshold_n_std: must be a finite number >= 0, got inf",
        ),
        ("  fpr_limit: 0.3", "  fpr_limit: .inf", "evaluate.fpr_limit: must be a finite number in (0, 1], got inf"),
        (
            "  crop_size: 224",
            "  crop_size: 300",
            "preprocess.crop_size: must be at most preprocess.resize (256), got 300",
        ),
        (
            "  val_fraction: 0.1",
            "  val_fraction: 1",
            "preprocess.val_fraction: must be a finite number in (0, 1), got 1",
        ),
        ("  curve_points: 2000", "  curve_points: 5", "figures.curve_points: must be an integer >= 10, got 5"),
        (
            "  source: synthetic",
            "  source: ftp",
            "data.source: must be one of synthetic, mvtec, visa, folder, got 'ftp'",
        ),
        (
            "    sha256: null",
            "    sha256: abc",
            "data.mvtec.sha256: must be a SHA-256 hex digest (64 hex digits) or null, got 'abc'",
        ),
        # names become folders: nothing that could climb or hide
        (
            "  efficientnet_lite0:  #",
            "  ../x:  #",
            "backbones.../x: a backbone name must be letters, digits, '_' or '-'",
        ),
        ("  knn_effnet:  #", "  .hidden:  #", "models..hidden: a model name must be letters, digits, '_' or '-'"),
        # model entries
        ("    method: global_knn", "    method: magic", "models.knn_effnet.method: unknown method 'magic'"),
        (
            "    backbone: efficientnet_lite0\n    fit:\n      top",
            "    backbone: resnet50\n    fit:\n      top",
            "models.knn_effnet.backbone: 'resnet50' is not configured under `backbones:` "
            "(known: pixels, efficientnet_lite0)",
        ),
        (
            "    method: global_knn",
            "    method: autoencoder",
            "models.knn_effnet.backbone: method autoencoder reads images; set backbone: pixels",
        ),
    ],
)
def test_bad_params_name_the_key(tmp_path, old, new, expected):
    assert error_of(tmp_path, edited(old, new)).startswith(expected)


def test_old_flat_model_layout_is_refused_with_the_new_keys(tmp_path):
    text = edited("    fit:\n      top_variance_dims: null  # the study kept 500 for ResNet50\n", "    k: 5\n")
    message = error_of(tmp_path, text)
    assert message == "models.knn_effnet.k: unknown parameter (known: method, backbone, fit, score, reference)"


def test_defaults_fill_absent_keys(tmp_path):
    text = edited("    score:\n      k: 50\n", "")
    params = load_all(tmp_path, text)
    assert model_config(params, "carpet", "knn_effnet").score.k == 50


def test_parameter_reference_page_is_generated_from_the_schemas():
    from stages.docs import PARAMS_PAGE, params_page

    page = (REPO / PARAMS_PAGE).read_text()
    assert params_page() == page, f"run `python -m stages.docs` to regenerate {PARAMS_PAGE}"
    for key in ("coreset_ratio", "image_score", "top_variance_dims", "threshold_n_std", "fit_seeds", "numerics"):
        assert f"| `{key}` |" in page
    # every key of the shipped params.yaml is documented, in its section's table
    import yaml

    def keys(node, prefix=""):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else key
            yield dotted
            if isinstance(value, dict) and dotted not in ("backbones", "models", "data.sources"):
                yield from keys(value, dotted)

    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted in keys(shipped):
        assert f"| `{dotted.rsplit('.', 1)[-1]}` |" in page, f"{PARAMS_PAGE}: params.yaml's {dotted} is not documented"
    for entry in [*shipped["backbones"].values(), *shipped["models"].values()]:
        for key in keys(entry):
            assert f"| `{key.rsplit('.', 1)[-1]}` |" in page, f"{PARAMS_PAGE}: {key} is not documented"
    # numbers as params.yaml writes them: 4, not 4.0; 1048576, not 1.04858e+06
    assert not re.search(r"`-?\d+\.0`|\d\.\d+e\+\d\d", page), "a number printed as a float or in e-notation"
    assert "| `rotation` | a finite number in [0, 45] | `4` |" in page
    assert "[16, 1048576]" in page


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configurations_are_valid(tmp_path, config):
    params = load_all(tmp_path, config.read_text())
    assert params["data"]["source"] in ("mvtec", "visa", "folder") and params["models"]


SHIPPED = ["params.yaml", *sorted(f"configs/{p.name}" for p in REPO.glob("configs/*.yaml"))]


@pytest.mark.parametrize("params_file", SHIPPED)
def test_every_param_dvc_yaml_declares_exists_in_the_params_file(params_file):
    """DVC refuses to run a stage whose declared param is missing from params.yaml (MissingParamsError),
    whatever the schema's defaults: each shipped params file must spell out every declared key."""
    import yaml

    params = yaml.safe_load((REPO / params_file).read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        dims = {
            k: list(params[v.strip("${}").split(".")[0]]) for k, v in stage.get("matrix", {}).items() if k != "category"
        }
        items = [{dim: key} for dim, keys in dims.items() for key in keys] or [{}]
        for item in items:
            for declared in stage.get("params", []):
                dotted = declared
                for dim, key in item.items():
                    dotted = dotted.replace("${item.%s}" % dim, key)
                node = params
                for part in dotted.split("."):
                    if not isinstance(node, dict) or part not in node:
                        missing.append(f"{name}: {dotted}")
                        break
                    node = node[part]
    assert not missing, f"{params_file} lacks params that dvc.yaml declares: {missing}"


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda p: p["data"].update(sources={"carpt": "folder"}),
            "data.sources.carpt: not a category of data.categories (carpet)",
        ),
        (
            lambda p: p["data"].update(categories=["carpet", "mean"]),
            "data.categories: 'mean' is reserved (the report's row of means over categories)",
        ),
        (
            lambda p: p["backbones"].update(pixels={}),
            "backbones.pixels: reserved (models with backbone: pixels read the prepared images)",
        ),
    ],
)
def test_names_that_would_silently_mislead_are_refused(tmp_path, edit, message):
    import yaml

    params = yaml.safe_load(DEFAULT_TEXT)
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError) as info:
        load_params(tmp_path / "params.yaml")
    assert str(info.value) == message
