"""preprocess.mode (crop | resize | pad): what the model sees of a frame, applied by one function in
preprocess and in both runtimes, held to torchvision; padding in no pixel metric; the elongated-frame
measurement (tests/elongated.py): crop misses the defects near the ends that pad and resize find."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.metrics import roc_auc_score

from stages.core.errors import PipelineError
from stages.data.raw import Placement, prepare_image, prepare_mask, recipe
from stages.evaluation.statistics import PixelStats
from tests.conftest import MODELS_FITTED, call_stage, default_params, error_line, run_stage, write_params
from tests.elongated import PATCHCORE, mode_project, write_elongated

# one worker runs this file: its module-scoped projects are built once, not once per worker
pytestmark = pytest.mark.xdist_group("modes")

FILL = (124, 116, 104)
# (width, height): square, the review's 1342 x 1000 (long side 343 in torchvision, 344 when rounded), odd
# margins, portrait, camera frames, 1 : 2.4, and an odd one out
SIZES = [(256, 256), (1342, 1000), (1000, 1342), (301, 200), (201, 100), (480, 160), (161, 480), (1024, 768),
         (1920, 1080), (97, 233)]
RECIPES = [(256, 224), (64, 56), (57, 33)]


def frame(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def mask_frame(width: int, height: int) -> Image.Image:
    values = np.random.default_rng(1).random((height, width)) > 0.7
    return Image.fromarray(values.astype(np.uint8) * 255, mode="L")


def padding(resized: Image.Image, side: int) -> list[int]:
    """torchvision's centre-crop padding of a smaller image: left, top, right, bottom."""
    w, h = resized.size
    return [(side - w) // 2, (side - h) // 2, (side - w + 1) // 2, (side - h + 1) // 2]


@pytest.mark.parametrize("size", SIZES)
def test_crop_is_torchvision_resize_then_centre_crop(size):
    """The claim of raw.py (code review F6): Resize(int) + CenterCrop(int) of torchvision, to the byte,
    images (bilinear) and masks (nearest) alike."""
    image, mask = frame(*size), mask_frame(*size)
    for resize, crop in RECIPES:
        r = {"resize": resize, "crop_size": crop, "mode": "crop"}
        expected = TF.center_crop(TF.resize(image, [resize]), [crop])
        assert np.array_equal(prepare_image(image, r), np.asarray(expected)), (size, resize, crop)
        expected_mask = TF.center_crop(TF.resize(mask, [resize], interpolation=TF.InterpolationMode.NEAREST), [crop])
        assert np.array_equal(prepare_mask(mask, r), np.asarray(expected_mask) > 127)
        assert Placement.of(*size, r).valid().all()


@pytest.mark.parametrize("size", SIZES)
def test_resize_is_torchvision_resize_to_the_square(size):
    image = frame(*size)
    for resize, crop in RECIPES:
        r = {"resize": resize, "crop_size": crop, "mode": "resize"}
        assert np.array_equal(prepare_image(image, r), np.asarray(TF.resize(image, [crop, crop])))
        assert Placement.of(*size, r).valid().all() and Placement.of(*size, r).seen() == 1.0


@pytest.mark.parametrize("size", SIZES)
def test_pad_is_torchvision_resize_of_the_longer_side_then_padded(size):
    """Longer side to crop_size (Resize(size=None, max_size=crop_size)), centred on a square of the fill;
    the valid mask is exactly the image's pixels, and a mask's padding is never defect."""
    image, mask = frame(*size), mask_frame(*size)
    for resize, crop in RECIPES:
        r = {"resize": resize, "crop_size": crop, "mode": "pad", "pad_fill": list(FILL)}
        resized = TF.resize(image, size=None, max_size=crop)
        expected = TF.pad(resized, padding(resized, crop), fill=FILL)
        assert np.array_equal(prepare_image(image, r), np.asarray(expected)), (size, resize, crop)
        placement = Placement.of(*size, r)
        shows_image = TF.pad(Image.new("L", resized.size, 255), padding(resized, crop), fill=0)
        assert np.array_equal(placement.valid(), np.asarray(shows_image) > 0)
        assert not prepare_mask(mask, r)[~placement.valid()].any()
        assert placement.view_box() == (0.0, 0.0, size[0], size[1])


def test_square_images_are_cropped_as_before():
    """MVTec AD's images and the synthetic carpet are square: their crop is the one the old rounding gave
    (with params.yaml's even margin, 256 - 224), so no committed result moves."""

    def old(image, resize, crop):  # stages/data/raw.py resize_and_crop before this change
        width, height = image.size
        scale = resize / min(width, height)
        new_size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
        image = image.resize(new_size, resample=Image.BILINEAR)
        left, top = (new_size[0] - crop) // 2, (new_size[1] - crop) // 2
        return np.asarray(image.crop((left, top, left + crop, top + crop)))

    for side in (256, 700, 1024):
        image = frame(side, side)
        for resize, crop in ((256, 224), (56, 48), (64, 64), (224, 224)):
            r = {"resize": resize, "crop_size": crop, "mode": "crop"}
            assert np.array_equal(prepare_image(image, r), old(image, resize, crop))
    oblong = frame(1342, 1000)  # ... and a non-square image is where they differ (one pixel of scale)
    assert not np.array_equal(prepare_image(oblong, {"resize": 256, "crop_size": 224}), old(oblong, 256, 224))


def test_a_recipe_without_a_mode_is_crop_and_a_bad_one_is_refused():
    """A model fitted before modes existed recorded {resize, crop_size}: it was cropped, and still is."""
    assert recipe({"resize": 64, "crop_size": 56}) == {"resize": 64, "crop_size": 56, "mode": "crop",
                                                       "pad_fill": list(FILL)}
    image = frame(300, 200)
    assert np.array_equal(prepare_image(image, {"resize": 64, "crop_size": 56}),
                          prepare_image(image, {"resize": 64, "crop_size": 56, "mode": "crop"}))
    with pytest.raises(ValueError, match="unknown preprocess mode 'squash'"):
        recipe({"resize": 64, "crop_size": 56, "mode": "squash"})
    with pytest.raises(ValueError, match="not a valid recipe"):
        recipe({"resize": 64, "crop_size": 56, "mode": "pad", "pad_fill": [0, 300, 0]})


def test_params_declare_mode_and_fill(tmp_path):
    from stages.core.params import load_params

    params = default_params()
    params["preprocess"].update(mode="squash")
    write_params(tmp_path, params)
    with pytest.raises(PipelineError, match=r"^preprocess.mode: must be one of crop, resize, pad, got 'squash'"):
        load_params(tmp_path / "params.yaml")
    params["preprocess"].update(mode="pad", pad_fill=[0, 0])
    write_params(tmp_path, params)
    with pytest.raises(PipelineError, match=r"^preprocess.pad_fill: must be three integers in \[0, 255\]"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(("width", "height", "crop_seen"),
                         [(1000, 1000, 0.7656), (1333, 1000, 0.5745), (1778, 1000, 0.4307), (2400, 1000, 0.3190)])
def test_share_of_the_frame_the_model_sees(width, height, crop_seen):
    """At 256 -> 224: (224 / 256)^2 / aspect under crop (57 % of a 4:3 frame, issue 26); all of it otherwise."""
    for mode in ("crop", "resize", "pad"):
        seen = Placement.of(width, height, {"resize": 256, "crop_size": 224, "mode": mode}).seen()
        assert seen == pytest.approx(crop_seen if mode == "crop" else 1.0, abs=5e-4), mode
    placement = Placement.of(width, height, {"resize": 256, "crop_size": 224, "mode": "crop"})
    assert placement.view_mask().mean() == pytest.approx(crop_seen, abs=2e-3)


def test_padding_counts_in_no_pixel_metric():
    """Pixel AUROC and AUPRO over the valid pixels equal the exact values on those pixels alone, whatever the
    padding scores (they would be false positives, or good pixels, if they counted)."""
    from tests.test_statistics import exact_aupro, realistic_maps

    masks, maps = realistic_maps(0, n=16, size=48)
    valid = np.zeros(masks.shape, dtype=bool)
    valid[:, 8:40, :] = True  # a landscape frame padded above and below
    masks = masks & valid
    for padding_scores in (0.0, 1e6, -1e6):
        padded = np.where(valid, maps, padding_scores)
        stats = PixelStats.from_maps(masks, padded, bins=8192, valid=valid)
        assert stats.good.sum() == (valid & ~masks).sum() and stats.defect.sum() == masks.sum()
        assert stats.auroc()[0] == pytest.approx(roc_auc_score(masks[valid], maps[valid]), abs=1e-4)
        inside = (masks[:, 8:40], maps[:, 8:40])
        assert stats.aupro(0.3)[0] == pytest.approx(exact_aupro(*inside, 0.3), abs=1e-4)
    counted = PixelStats.from_maps(masks, np.where(valid, maps, 1e6), bins=8192)  # padding as good pixels
    assert counted.auroc()[0] < stats.auroc()[0] - 0.1
    unequal = valid.copy()
    unequal[::2] = True  # frames of different shapes: any valid mask
    stats = PixelStats.from_maps(masks, maps, bins=8192, valid=unequal)
    assert stats.auroc()[0] == pytest.approx(roc_auc_score(masks[unequal], maps[unequal]), abs=1e-4)
    with pytest.raises(PipelineError, match="valid-pixel mask must be"):
        PixelStats.from_maps(masks, maps, bins=64, valid=valid[:, :10])


# ---------------------------------------------------------------------------------- stages, bad input


def folder_project(tmp_path: Path, mode: str, name: str = "project") -> Path:
    """A project reading tmp_path/src/long (the folder source) at 64 -> 56 px."""
    params = default_params()
    params["data"].update(source="folder", folder=str(tmp_path / "src"), categories=["long"])
    params["preprocess"].update(resize=64, crop_size=56, mode=mode, val_fraction=0.25)
    project = tmp_path / name
    project.mkdir(exist_ok=True)
    write_params(project, params)
    return project


def prepared(project: Path) -> Path:
    return project / "data" / "features" / "long.category" / "pixels.features"


def test_preprocess_pad_writes_the_valid_mask_and_the_recipe(tmp_path):
    write_elongated(tmp_path / "src" / "long", n_train=4, n_test_good=1, n_test_defect=2)
    project = folder_project(tmp_path, "pad")
    for stage in ("download", "preprocess"):
        call_stage(stage, "long", cwd=project)
    from stages.data.prepared import load_split, read_inputs

    assert read_inputs(prepared(project))["preprocess"] == {"resize": 64, "crop_size": 56, "mode": "pad",
                                                            "pad_fill": list(FILL)}
    test = load_split(prepared(project) / "test.npz")
    expected = Placement.of(480, 160, {"resize": 64, "crop_size": 56, "mode": "pad"}).valid()
    assert test.valid.shape == (3, 56, 56) and all(np.array_equal(v, expected) for v in test.valid)
    assert expected.sum() == 56 * 18  # 480 x 160 -> 56 x int(56 / 3) = 18 rows, 19 + 19 rows of padding
    assert (test.images[:, ~expected] == FILL).all()
    assert test.masks[1:].any(axis=(1, 2)).all()  # both defects in view


def test_a_folder_without_good_images_is_one_line_and_writes_nothing(tmp_path):
    write_elongated(tmp_path / "src" / "long", n_train=2, n_test_good=1, n_test_defect=1)
    for path in (tmp_path / "src" / "long" / "train" / "good").iterdir():
        path.unlink()
    project = folder_project(tmp_path, "pad")
    line = error_line(run_stage("download", "long", cwd=project))
    assert line == f"error: {tmp_path}/src/long/train/good: no training images"
    assert not (project / "data").exists() or not any((project / "data").rglob("*.npz"))


def test_a_mask_of_the_wrong_size_is_named_and_nothing_is_written(tmp_path):
    """Caught where the folder is read (download), and by preprocess for a copy changed after it."""
    write_elongated(tmp_path / "src" / "long", n_train=4, n_test_good=1, n_test_defect=2)
    mask = tmp_path / "src" / "long" / "ground_truth" / "spot" / "001_mask.png"
    project = folder_project(tmp_path, "pad")
    call_stage("download", "long", cwd=project)
    raw_mask = project / "data" / "raw" / "long.dataset" / "ground_truth" / "spot" / "001_mask.png"
    Image.open(mask).resize((240, 80)).save(raw_mask)
    line = error_line(run_stage("preprocess", "long", cwd=project))
    assert line.startswith(f"error: {raw_mask.relative_to(project)}: mask size 240x80 differs from its image")
    assert "(480x160)" in line and not prepared(project).exists()
    Image.open(mask).resize((240, 80)).save(mask)
    line = error_line(run_stage("download", "long", cwd=folder_project(tmp_path, "pad", "again")))
    assert line.startswith(f"error: {mask}: mask size 240x80")


def test_a_soft_mask_is_a_one_line_warning(tmp_path):
    """Refusing would reject anti-aliased masks, which the 'any nonzero pixel is defect' rule reads well;
    the warning names the number of such masks and one file (a JPEG-saved mask's noise becomes defect)."""
    write_elongated(tmp_path / "src" / "long", n_train=4, n_test_good=1, n_test_defect=2)
    mask = tmp_path / "src" / "long" / "ground_truth" / "spot" / "001_mask.png"
    values = np.asarray(Image.open(mask)).copy()
    values[0, :5] = [1, 2, 3, 4, 5]  # JPEG-like noise in the background
    Image.fromarray(values).save(mask)
    project = folder_project(tmp_path, "crop")
    download = run_stage("download", "long", cwd=project, check=True)
    preprocess = run_stage("preprocess", "long", cwd=project, check=True)
    for result, shown in ((download, mask), (preprocess, "data/raw/long.dataset/ground_truth/spot/001_mask.png")):
        soft = [line for line in result.stderr.splitlines() if "not binary" in line]
        assert soft == [f"warning: 1 of 2 ground-truth masks are not binary (e.g. {shown}: 6 distinct nonzero values); "
                        "every nonzero pixel counts as defect, so re-save soft or JPEG masks as 0/255 PNGs"]
    # 480 x 160 at 64 -> 192 x 64, the 56 square of it: 1 - 56^2 / (64^2 * 3) = 74 % unseen
    assert "long/train/good: 4 of 4 training images are not square (480x160) and preprocess.mode is crop: " \
           "the model never sees 74% of each of them" in preprocess.stderr


def test_check_warns_when_crop_drops_the_sides_of_oblong_images(tmp_path):
    source = tmp_path / "src" / "long" / "train" / "good"
    source.mkdir(parents=True)
    for i, size in enumerate([(400, 300), (300, 300), (480, 160)]):
        frame(*size).save(source / f"{i}.png")
    from tests.test_docs_own_images import page_lines, stage_arguments

    # the command docs/how-to/own-images.md gives, as written
    [check] = page_lines("3. Run the pipeline on your folder", "python -m stages.check")
    tool, args = stage_arguments(check)
    project = folder_project(tmp_path, "crop")
    result = run_stage(tool, *args, cwd=project, check=True)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    # 400 x 300 at 64 -> 85 x 64 (truncated), the 56 square: 263.5 x 262.5 of the frame's pixels seen, 42 % not
    assert warnings == [f"warning: {source}: 2 of 3 training images are not square (400x300 to 480x160) and "
                        "preprocess.mode is crop: the model never sees 42% to 74% of each of them; "
                        "preprocess.mode: pad or resize shows it the whole image"]
    assert result.stdout.startswith("params.yaml: ok")
    for mode in ("pad", "resize"):
        assert "warning" not in run_stage(tool, *args, cwd=folder_project(tmp_path, mode, mode), check=True).stderr


# ----------------------------------------------------------------- the elongated set, end to end


@pytest.fixture(scope="session")
def elongated(tmp_path_factory) -> dict[str, Path]:
    """One project per mode on the same generated 480 x 160 frames (defects near the ends): params.yaml's
    PatchCore on Lite0 at its paper defaults, and a small pixel autoencoder; both fitted, evaluated, exported."""
    root = tmp_path_factory.mktemp("modes")
    source = write_elongated(root / "src" / "long", n_train=30, n_test_good=16, n_test_defect=16)
    models = {PATCHCORE: default_params()["models"][PATCHCORE], "ae": MODELS_FITTED["ae"]}
    return {mode: mode_project(root / mode, source, mode, models, export=True) for mode in ("crop", "pad", "resize")}


def read_metrics(project: Path, model: str) -> dict:
    return json.loads((project / "metrics/models/long.category" / f"{model}.metrics.json").read_text())


def test_crop_misses_the_defects_at_the_ends_that_pad_and_resize_find(elongated):
    """Issue 26 item 6. Under crop no defect pixel is in the model's view, and PatchCore ranks the defective
    frames like a coin; under pad and resize every defect is in view and found."""
    from stages.data.prepared import load_split
    from stages.data.raw import list_category, read_mask

    _, raw_test, _ = list_category(elongated["crop"] / "data/raw/long.dataset")
    defect_pixels = [np.asarray(read_mask(item.mask_path)) > 0 for item in raw_test if item.mask_path]
    for mode, project in elongated.items():
        placement = Placement.of(480, 160, {"resize": 128, "crop_size": 112, "mode": mode})
        seen = sum((mask & placement.view_mask()).sum() for mask in defect_pixels)
        inside = seen / sum(mask.sum() for mask in defect_pixels)
        test = load_split(project / "data/features/long.category/pixels.features/test.npz")
        shown = test.masks[test.labels == 1].any(axis=(1, 2))
        metrics = read_metrics(project, PATCHCORE)
        if mode == "crop":
            assert inside == 0.0 and not shown.any()
            assert abs(metrics["image_auroc"] - 0.5) < 0.25 and metrics["pixel_auroc"] is None  # no defect pixel
        else:
            assert inside == 1.0 and shown.all()
            assert metrics["image_auroc"] >= 0.95 and metrics["pixel_auroc"] >= 0.95, mode
    assert (read_metrics(elongated["pad"], PATCHCORE)["image_auroc"]
            > read_metrics(elongated["crop"], PATCHCORE)["image_auroc"] + 0.3)


def scores_csv(project: Path, model: str) -> dict[str, float]:
    import csv

    rows = csv.DictReader(open(project / "plots/long.category" / f"{model}.model" / "scores.csv"))
    return {row["image"]: float(row["score"]) for row in rows}


@pytest.mark.parametrize("model", [PATCHCORE, "ae"])
@pytest.mark.parametrize("mode", ["crop", "pad", "resize"])
def test_each_runtime_applies_the_mode_as_evaluate_did(elongated, mode, model, tmp_path):
    """predict (torch) on the raw files gives evaluate's scores; the ONNX file, with its metadata's recipe
    alone, gives torch's; and the recipe each carries is the mode the model was fitted with."""
    from tests.test_predict import TOLERANCE, predict

    project = elongated[mode]
    raw = project / "data/raw/long.dataset"
    expected = scores_csv(project, model)
    files = [str(raw / name) for name in expected]
    by_runtime = {}
    for runtime in ("torch", "onnx"):
        code, rows = predict(project, model, *files, "--out", str(tmp_path / runtime), "--runtime", runtime)
        assert code == 0 and [r["image"] for r in rows] == files
        by_runtime[runtime] = np.array([float(r["score"]) for r in rows])
    np.testing.assert_allclose(by_runtime["torch"], list(expected.values()), rtol=TOLERANCE["torch"])
    np.testing.assert_allclose(by_runtime["onnx"], by_runtime["torch"], rtol=TOLERANCE["onnx"])
    import onnx

    path = project / "models/long.category" / f"{model}.export" / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False)
    exported = json.loads({p.key: p.value for p in graph.metadata_props}["preprocess"])
    assert exported["mode"] == mode and exported["crop_size"] == 112 and exported["pad_fill"] == list(FILL)
    assert exported["steps"].startswith({"crop": "Resize(resize) + CenterCrop", "resize": "Resize((crop_size",
                                         "pad": "Resize(size=None, max_size=crop_size)"}[mode])


def test_the_overview_outlines_what_the_model_sees(elongated):
    """A training row above the test rows; each raw panel carries a box of the model's view (the centre under
    crop, the whole frame under pad)."""
    from tests.test_pipeline import png_panels

    for mode in ("crop", "pad"):
        project = elongated[mode]
        call_stage("overview", "long", cwd=project)
        assert png_panels(project / "plots/long.category/overview.png") == (3, 4)  # train, spot, good x 2 images
    from stages.data.prepared import load_split
    from stages.data.raw import list_category
    from stages.overview import panel_item

    train = load_split(elongated["crop"] / "data/features/long.category/pixels.features/train.npz")
    raw_train, _, _ = list_category(elongated["crop"] / "data/raw/long.dataset")
    item = next(i for i in raw_train if i.name == train.names[0])
    preprocess = {"resize": 128, "crop_size": 112}
    crop = panel_item(train, 0, item, {**preprocess, "mode": "crop"})
    # 480 x 160 at 128 -> 384 x 128, the 112 square at (136, 8): frame pixels 170..310 x 10..150, shown at 2/3
    assert crop["view"] == pytest.approx(tuple(v * 2 / 3 for v in (170, 10, 310, 150)))
    pad = panel_item(train, 0, item, {**preprocess, "mode": "pad"})
    assert pad["view"] == pytest.approx((0, 0, 320, 320 / 3)) and pad["valid"] == (0, 37, 112, 74)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_the_demo_scores_an_uploaded_frame_with_the_mode(elongated, runtime, monkeypatch):
    """The demo's scoring of an upload (stages/demo.py score_bytes, what /api/predict and the camera call)
    prepares the bytes by the model's own recipe: a padded frame's model input, evaluate's score."""
    from stages.demo import score_bytes
    from stages.deploy.runtimes import load_model
    from tests.test_demo import decoded
    from tests.test_predict import TOLERANCE

    project = elongated["pad"]
    monkeypatch.chdir(project)
    model = load_model("long", PATCHCORE, runtime)
    name, score = next((n, s) for n, s in scores_csv(project, PATCHCORE).items() if n.startswith("test/spot"))
    answer = score_bytes(model, f"long/{PATCHCORE}", (project / "data/raw/long.dataset" / name).read_bytes(), name,
                         "PNG")
    assert answer["score"] == pytest.approx(score, rel=TOLERANCE[runtime])
    shown = decoded(answer["input"])
    assert shown.shape == (112, 112, 3) and (shown[:37] == FILL).all() and (shown[74:] == FILL).all()
