"""Bad input: one clear line naming the file or param, exit code 1, and no output DVC could cache."""
from __future__ import annotations

import hashlib
import re
import tarfile
from pathlib import Path

import pytest

from stages.core.errors import PipelineError
from stages.core.paths import TMP_ROOT
from stages.data.synthetic import generate_category
from stages.methods import REGISTRY
from tests.conftest import call_stage, error_line, run_stage, write_params

# one worker runs this file: its module-scoped projects are built once, not once per worker
pytestmark = pytest.mark.xdist_group("errors")


def assert_no_output(project: Path, path: Path) -> None:
    """Neither the output nor a temporary of the failed stage is left behind: not in the project's
    .tmp/ (stages/core/outputs.py TMP_ROOT, where every stage writes its temporaries), nor an old-style
    `.NAME.tmp<pid>` sibling."""
    assert path.is_relative_to(project)
    assert not path.exists()
    tmp = project / TMP_ROOT
    left = sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []
    assert left == [], f"{tmp}: the failed stage left {left}"
    if path.parent.exists():
        assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp")]


TINY = dict(image_size=64, n_train=8, n_test_good=2, n_test_per_cell=1, seed=0)


def raw_category(project: Path, category: str = "carpet") -> Path:
    root = project / "data" / "raw" / f"{category}.dataset"
    generate_category(root, defect_types=("color", "hole"), **TINY)
    return root


def tiny_params(project: Path, **models) -> dict:
    from tests.conftest import default_params

    params = default_params()
    params["data"]["synthetic"].update(TINY)
    params["preprocess"].update(resize=64, crop_size=64, val_fraction=0.25)
    params["models"] = models or params["models"]
    write_params(project, params)
    return params


def test_unknown_source(project):
    params = tiny_params(project)
    params["data"]["source"] = "ftp"
    write_params(project, params)
    line = error_line(run_stage("download", "carpet", cwd=project))
    assert "data.source" in line and "'ftp'" in line
    assert not (project / "data").exists()


def test_checksum_mismatch_leaves_no_dataset(project):
    root = raw_category(project, category="staging")
    archive = project / "carpet.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(root, arcname="carpet")
    params = tiny_params(project)
    params["data"]["source"] = "mvtec"
    params["data"]["mvtec"].update(url=archive.as_uri(), sha256="0" * 64)
    write_params(project, params)
    line = error_line(run_stage("download", "carpet", cwd=project))
    assert "checksum mismatch" in line and archive.as_uri() in line
    assert hashlib.sha256(archive.read_bytes()).hexdigest() in line
    assert_no_output(project, project / "data" / "raw" / "carpet.dataset")
    assert not (project / "data" / "downloads").exists()  # a file:// archive is read in place, never copied
    # the right checksum downloads and extracts
    params["data"]["mvtec"]["sha256"] = hashlib.sha256(archive.read_bytes()).hexdigest()
    write_params(project, params)
    run_stage("download", "carpet", cwd=project, check=True)
    assert len(list((project / "data/raw/carpet.dataset/train/good").iterdir())) == TINY["n_train"]


def test_missing_category_folder(project):
    tiny_params(project)
    line = error_line(run_stage("preprocess", "carpet", cwd=project))
    assert "data/raw/carpet.dataset: category folder not found" in line
    assert_no_output(project, project / "data" / "features" / "carpet.category" / "pixels.features")


def test_missing_folder_source(project):
    params = tiny_params(project)
    params["data"].update(source="folder", folder=str(project / "nowhere"))
    write_params(project, params)
    line = error_line(run_stage("download", "carpet", cwd=project))
    assert str(project / "nowhere") in line
    assert not (project / "data" / "raw").exists() or not any((project / "data" / "raw").rglob("*.png"))


def test_empty_train_good(project):
    root = raw_category(project)
    for image in (root / "train" / "good").iterdir():
        image.unlink()
    tiny_params(project)
    line = error_line(run_stage("preprocess", "carpet", cwd=project))
    assert "train/good: no training images" in line
    assert_no_output(project, project / "data" / "features" / "carpet.category" / "pixels.features")


def test_truncated_image(project):
    root = raw_category(project)
    victim = root / "test" / "hole" / "000.png"
    victim.write_bytes(victim.read_bytes()[:200])
    tiny_params(project)
    line = error_line(run_stage("preprocess", "carpet", cwd=project))
    assert str(Path("test") / "hole" / "000.png") in line and "unreadable or truncated" in line
    assert_no_output(project, project / "data" / "features" / "carpet.category" / "pixels.features")


def test_mask_size_mismatch(project):
    from PIL import Image

    root = raw_category(project)
    Image.new("L", (32, 32)).save(root / "ground_truth" / "color" / "000_mask.png")
    tiny_params(project)
    line = error_line(run_stage("preprocess", "carpet", cwd=project))
    assert "000_mask.png: mask size 32x32 differs from its image" in line
    assert_no_output(project, project / "data" / "features" / "carpet.category" / "pixels.features")


@pytest.fixture
def prepared(project):
    raw_category(project)
    tiny_params(project)
    call_stage("preprocess", "carpet", cwd=project)
    return project


def test_unknown_backbone(prepared):
    params = tiny_params(prepared)
    params["backbones"]["resnet9000"] = {"batch_size": 4}
    write_params(prepared, params)
    line = error_line(run_stage("extract", "carpet", "resnet9000", cwd=prepared))
    assert "unknown backbone 'resnet9000'" in line
    assert_no_output(prepared, prepared / "data" / "features" / "carpet.category" / "resnet9000.features")


@pytest.mark.parametrize(
    "model, expected",
    [
        (
            {"method": "magic", "backbone": "efficientnet_lite0"},
            "error: models.m.method: unknown method 'magic' (known: " + ", ".join(sorted(REGISTRY)) + ")",
        ),
        (
            {"method": "patchcore", "backbone": "efficientnet_lite0", "fit": {"coreset_ratio": 1.5}},
            "error: models.m.fit.coreset_ratio: must be a finite number in (0, 1], got 1.5",
        ),
    ],
)
def test_bad_model_entry_stops_the_fit_stage(project, model, expected):
    """The stage script's side of a params error: exit 1, one line, nothing written (the many
    other params errors are checked in-process in test_params.py)."""
    tiny_params(project, m=model)
    assert error_line(run_stage("fit", "carpet", "m", cwd=project)) == expected
    assert_no_output(project, project / "models" / "carpet.category" / "m.model")


def test_nan_loss_stops_training_and_leaves_no_checkpoint(prepared):
    model = {"method": "autoencoder", "backbone": "pixels", "fit": {"image_size": 32, "epochs": 3, "lr": 1e30}}
    tiny_params(prepared, ae=model)
    line = error_line(run_stage("fit", "carpet", "ae", cwd=prepared))
    assert re.search(r"models\.ae \(carpet, seed 0\): loss became (NaN|infinite) at epoch \d+", line), line
    assert_no_output(prepared, prepared / "models" / "carpet.category" / "ae.model")
    assert_no_output(prepared, prepared / "plots" / "carpet.category" / "ae.model" / "train")


def test_stage_refuses_a_category_that_is_not_listed(project):
    tiny_params(project)
    line = error_line(run_stage("download", "bottle", cwd=project))
    assert line == "error: data.categories: 'bottle' is not listed (listed: carpet)"
    assert not (project / "data").exists()


def test_usage_line_names_the_arguments(project):
    tiny_params(project)
    assert (
        error_line(run_stage("fit", "carpet", cwd=project)) == "error: usage: python -m stages.fit <category> <model>"
    )


def test_synthetic_data_under_an_mvtec_name_is_flagged(project):
    """A synthetic 'bottle' is a carpet-like texture: the download says so rather than let the tables mislead."""
    params = tiny_params(project)
    params["data"]["categories"] = ["bottle"]
    write_params(project, params)
    result = run_stage("download", "bottle", cwd=project, check=True)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "'bottle' is generated by the synthetic source" in warnings[0]
    assert "data.sources.bottle" in warnings[0]


@pytest.fixture(scope="module")
def stale_features(tmp_path_factory):
    """A tiny project whose features were extracted (and a kNN fitted on them), then the images
    prepared again with another split seed: the cached features now name other training and validation images."""
    from stages.data.prepared import load_split
    from stages.features.cache import load_features

    project = tmp_path_factory.mktemp("stale")
    raw_category(project)
    params = tiny_params(project, knn={"method": "global_knn", "backbone": "efficientnet_lite0", "score": {"k": 3}})
    params["device"] = "cpu"
    write_params(project, params)
    for stage, args in [("preprocess", ()), ("extract", ("efficientnet_lite0",)), ("fit", ("knn",))]:
        call_stage(stage, "carpet", *args, cwd=project)
    params["preprocess"]["seed"] = 1
    write_params(project, params)
    call_stage("preprocess", "carpet", cwd=project)
    category = project / "data" / "features" / "carpet.category"
    for split in ("train", "val"):  # the same number of images, other ones: only the names tell
        cached = load_features(category / "efficientnet_lite0.features" / f"{split}.pt").names
        prepared = load_split(category / "pixels.features" / f"{split}.npz").names
        assert len(cached) == len(prepared) and cached != prepared
    return project


def test_evaluate_refuses_stale_features(stale_features):
    """In-process (run_main turns the PipelineError into the one `error:` line, tests/test_runtime.py)."""
    with pytest.raises(PipelineError) as excinfo:
        call_stage("evaluate", "carpet", "knn", cwd=stale_features)
    assert str(excinfo.value) == (
        "data/features/carpet.category/efficientnet_lite0.features: val features do not match "
        "the prepared images; rerun extract"
    )
    assert_no_output(stale_features, stale_features / "metrics" / "models" / "carpet.category" / "knn.metrics.json")
    assert_no_output(stale_features, stale_features / "models" / "carpet.category" / "knn.scoring.json")
    for curve in ("scores", "roc", "pr", "pixel_roc", "pro", "confusion"):
        assert_no_output(stale_features, stale_features / "plots" / "carpet.category" / "knn.model" / f"{curve}.csv")


def test_tsne_refuses_stale_features(stale_features):
    with pytest.raises(PipelineError) as excinfo:
        call_stage("tsne", "carpet", "efficientnet_lite0", cwd=stale_features)
    assert str(excinfo.value) == (
        "data/features/carpet.category/efficientnet_lite0.features: train features do not match "
        "the prepared images; rerun extract"
    )
    assert_no_output(stale_features, stale_features / "plots" / "carpet.category" / "efficientnet_lite0.tsne.csv")
