"""Backbones load real weights offline: the packaged EfficientNet-Lite0 and torchvision's hub cache."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data

from stages.core.errors import PipelineError
from stages.features.backbones import BACKBONES, FeatureExtractor, load_backbone


def _classify(model: torch.nn.Module, image: np.ndarray, arch: str = "efficientnet_lite0") -> torch.Tensor:
    """Normalised as the extract stage does it (the backbone's own mean/std)."""
    spec = BACKBONES[arch]
    resized = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC)) / 255.0
    x = torch.tensor(resized, dtype=torch.float32).permute(2, 0, 1)[None]
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)[0].softmax(0)


def test_efficientnet_lite0_mapping_classifies_real_photos():
    model = load_backbone("efficientnet_lite0")
    coffee = _classify(model, data.coffee())
    assert int(coffee.argmax()) == 967  # espresso
    # TF padding + TF-Lite normalisation give 0.90; symmetric padding or ImageNet mean/std, <= 0.86
    assert float(coffee[967]) > 0.88
    cat = _classify(model, data.chelsea())
    assert 281 <= int(cat.argmax()) <= 285  # tabby / tiger cat / Persian / Siamese / Egyptian cat


def test_efficientnet_lite0_features_have_expected_shapes():
    extractor = FeatureExtractor("efficientnet_lite0", load_backbone("efficientnet_lite0"))
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    out = extractor(images, batch_size=2)
    assert out.global_embeddings.shape == (3, 1280)
    assert out.global_embeddings.dtype == torch.float32
    assert [tuple(m.shape) for m in out.feature_maps.values()] == [(3, 40, 8, 8), (3, 112, 4, 4)]
    # batching must not change the result
    again = extractor(images, batch_size=3)
    assert torch.allclose(out.global_embeddings, again.global_embeddings, atol=1e-5)


def _cached_weights(tmp_path, monkeypatch, arch: str, weights_name: str):
    """Write a checkpoint (random init) where torchvision's cache looks, under a temporary TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_weight(weights_name)
    torch.manual_seed(0)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    target = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return state


def _no_network(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_resnet50_loads_from_torch_hub_cache_without_network(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    state = _cached_weights(tmp_path, monkeypatch, "resnet50", "ResNet50_Weights.IMAGENET1K_V2")
    model = load_backbone("resnet50")
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
    assert torch.equal(model.state_dict()["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"])
    out = FeatureExtractor("resnet50", model)(np.zeros((2, 224, 224, 3), dtype=np.uint8))
    assert out.global_embeddings.shape == (2, 2048)
    assert [tuple(m.shape) for m in out.feature_maps.values()] == [(2, 512, 28, 28), (2, 1024, 14, 14)]


def test_vit_b_16_cls_token_and_patch_maps(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    _cached_weights(tmp_path, monkeypatch, "vit_b_16", "ViT_B_16_Weights.IMAGENET1K_V1")
    extractor = FeatureExtractor("vit_b_16", load_backbone("vit_b_16"))
    out = extractor(np.zeros((1, 224, 224, 3), dtype=np.uint8))
    assert out.global_embeddings.shape == (1, 768)
    assert [tuple(m.shape) for m in out.feature_maps.values()] == [(1, 768, 14, 14), (1, 768, 14, 14)]
    with pytest.raises(PipelineError, match="needs 224x224 inputs"):
        extractor(np.zeros((1, 64, 64, 3), dtype=np.uint8))


def test_missing_weights_without_network_says_which_file_to_put_where(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PipelineError) as excinfo:
        load_backbone("wide_resnet50_2")
    message = str(excinfo.value)
    assert "\n" not in message
    url = torchvision.models.get_weight("Wide_ResNet50_2_Weights.IMAGENET1K_V1").url
    assert url.rsplit("/", 1)[-1] in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "backbones.wide_resnet50_2.weights" in message


def test_weights_path_param(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.get_model("resnet50", weights=None).state_dict()
    path = tmp_path / "my_resnet.pth"
    torch.save(state, path)
    model = load_backbone("resnet50", weights=str(path))
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])
    with pytest.raises(PipelineError, match="backbones.resnet50.weights: file not found"):
        load_backbone("resnet50", weights=str(tmp_path / "missing.pth"))


def test_unknown_backbone_and_layer():
    with pytest.raises(PipelineError, match="unknown backbone 'resnet9000'"):
        load_backbone("resnet9000")
    with pytest.raises(PipelineError, match="'blocks.99' is not a module"):
        FeatureExtractor("efficientnet_lite0", load_backbone("efficientnet_lite0"), layers=["blocks.99"])


TORCHVISION_WEIGHTS = {  # what the shipped configs name, as torchvision knows them
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "vit_b_16": "ViT_B_16_Weights.IMAGENET1K_V1",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights.IMAGENET1K_V1",
}


# (channels, h, w) of each layer a config may cache, per architecture, at the configs' 224 x 224
# inputs, and the global embedding size: a config's backbone entry (its own name, `arch`, `layers`)
# is checked against these without a line here
LAYER_SHAPES = {
    "resnet50": {"layer1": (256, 56, 56), "layer2": (512, 28, 28), "layer3": (1024, 14, 14)},
    "wide_resnet50_2": {"layer1": (256, 56, 56), "layer2": (512, 28, 28), "layer3": (1024, 14, 14)},
    "vit_b_16": {"encoder.layers.encoder_layer_5": (768, 14, 14), "encoder.layers.encoder_layer_8": (768, 14, 14)},
}
GLOBAL_SIZE = {"resnet50": (2048,), "wide_resnet50_2": (2048,), "vit_b_16": (768,)}


@pytest.mark.parametrize("config", ["study_carpet", "patchcore_paper", "padim_paper"])
def test_shipped_configs_run_end_to_end_with_cached_torchvision_weights(tmp_path, monkeypatch, config):
    """configs/<config>.yaml through the stage scripts (download -> preprocess -> extract -> fit ->
    evaluate), offline: its backbones, layers, resolutions and models as shipped, with checkpoints of
    the right architectures (random weights) in a temporary TORCH_HOME and a tiny local folder in
    place of MVTec AD. Only the data source, the number of epochs and PaDiM's dimensions (550 would
    make a 3.8 GB model) differ from the file, and the pixel autoencoders (no backbone; their code
    path is the default run's) are left out."""
    import json
    import shutil

    import yaml

    from tests.conftest import REPO, call_stage, write_params
    from tests.test_preprocess import make_category

    _no_network(monkeypatch)
    params = yaml.safe_load((REPO / "configs" / f"{config}.yaml").read_text())
    for arch in {entry.get("arch") or name for name, entry in params["backbones"].items()}:
        _cached_weights(tmp_path / "torch", monkeypatch, arch, TORCHVISION_WEIGHTS[arch])
    make_category(tmp_path / "mine" / "carpet", grayscale=False, with_masks=True)
    params["data"] = {"source": "folder", "folder": str(tmp_path / "mine"), "categories": ["carpet"]}
    params["device"] = "cpu"
    params["fit_seeds"] = [0]  # one fit per model: the seeds' code path is the default run's
    params["evaluate"]["bootstrap"]["resamples"] = 20
    params["models"] = {name: m for name, m in params["models"].items() if m["backbone"] != "pixels"}
    for model in params["models"].values():
        if "epochs" in model["fit"]:
            model["fit"]["epochs"] = 1
        if model["method"] == "padim":  # 550 of 1792 channels: a 3.8 GB model of the same code path
            model["fit"]["dimensions"] = 20
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(REPO / "references", project / "references")  # the published tables the configs name
    write_params(project, params)
    call_stage("download", "carpet", cwd=project)
    call_stage("preprocess", "carpet", cwd=project)
    from stages.features.cache import load_features

    for backbone in params["backbones"]:
        call_stage("extract", "carpet", backbone, cwd=project)
        cached = load_features(project / f"data/features/carpet.category/{backbone}.features/test.pt")
        arch = params["backbones"][backbone].get("arch") or backbone
        shapes = {layer: tuple(maps.shape[1:]) for layer, maps in cached.feature_maps.items()}
        expected = {layer: LAYER_SHAPES[arch][layer] for layer in params["backbones"][backbone]["layers"]}
        assert shapes == expected, backbone  # the configured layers, at the configured 224 px
        assert tuple(cached.global_embeddings.shape[1:]) == GLOBAL_SIZE[arch], backbone
    for name in params["models"]:
        call_stage("fit", "carpet", name, cwd=project)
        call_stage("evaluate", "carpet", name, cwd=project)
        metrics = json.loads((project / f"metrics/models/carpet.category/{name}.metrics.json").read_text())
        assert metrics["backbone"] == params["models"][name]["backbone"]
        assert (metrics.get("pixel_auroc") is not None) == (params["models"][name]["method"] != "global_knn"), name
    recipe = json.loads((project / "data/features/carpet.category" / f"{next(iter(params['backbones']))}.features"
                         / "inputs.json").read_text())
    from stages.core.params import load_params

    expected = load_params(project / "params.yaml")["preprocess"]  # a config without a mode: crop, the default
    assert recipe["preprocess"] == {key: expected[key] for key in ("resize", "crop_size", "mode", "pad_fill")}
    assert recipe["preprocess"]["mode"] == "crop"


def test_weights_file_must_lie_under_weights(tmp_path, monkeypatch):
    """extract's weights_file(): a checkpoint outside weights/ (which every extract stage depends on)
    is refused with one line naming the param and the file; one inside is returned as given."""
    from stages.extract import weights_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mine.pth").write_bytes(b"x")
    (tmp_path / "elsewhere.pth").write_bytes(b"x")
    assert weights_file("resnet50", None) is None
    assert weights_file("resnet50", "weights/mine.pth") == "weights/mine.pth"
    for outside in (str(tmp_path / "elsewhere.pth"), "elsewhere.pth", "weights/../elsewhere.pth"):
        with pytest.raises(PipelineError) as excinfo:
            weights_file("resnet50", outside)
        assert str(excinfo.value) == (f"backbones.resnet50.weights: {outside} is not under weights/ "
                                      "(copy it there so DVC tracks it)")
    with pytest.raises(PipelineError, match=r"^backbones\.resnet50\.weights: file not found: weights/gone\.pth$"):
        weights_file("resnet50", "weights/gone.pth")


def test_extract_stage_refuses_weights_outside_weights(tmp_path):
    from tests.conftest import default_params, error_line, run_stage, write_params

    checkpoint = tmp_path / "lite0.pth"
    checkpoint.write_bytes(b"not read")
    params = default_params()
    params["backbones"]["efficientnet_lite0"]["weights"] = str(checkpoint)
    write_params(tmp_path, params)
    line = error_line(run_stage("extract", "carpet", "efficientnet_lite0", cwd=tmp_path))
    assert line == (f"error: backbones.efficientnet_lite0.weights: {checkpoint} is not under weights/ "
                    "(copy it there so DVC tracks it)")
    assert not (tmp_path / "data").exists()
