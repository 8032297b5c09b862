"""Shared by bench/embed_dim_sweep.py and bench/compare_anomalib.py: generated images and Lite0 features.

`prepare(workdir, ...)` writes a synthetic carpet category (stages.data.synthetic, MVTec layout)
under workdir/raw and preprocesses it with the pipeline's own code (stages.preprocess.load_images:
resize + centre crop) into workdir/train.npz and workdir/test.npz; it is reused when it exists
with the same settings. `extract(split)` runs the real EfficientNet-Lite0 backbone (blocks.2 +
blocks.4, strides 8 and 16) through stages.features.backbones.FeatureExtractor, as the extract stage does.
Not a benchmark by itself.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCH = "efficientnet_lite0"
LAYERS = ["blocks.2", "blocks.4"]


def prepare(workdir: str | Path, n_train: int, n_test_good: int, n_test_per_cell: int,
            image_size: int = 256, resize: int = 256, crop: int = 256, seed: int = 0) -> Path:
    """Generate + preprocess once; returns workdir. Settings are recorded in workdir/settings.json."""
    from stages.data.prepared import save_split
    from stages.data.raw import list_category
    from stages.data.synthetic import generate_category
    from stages.preprocess import load_images

    workdir = Path(workdir)
    settings = dict(n_train=n_train, n_test_good=n_test_good, n_test_per_cell=n_test_per_cell,
                    image_size=image_size, resize=resize, crop=crop, seed=seed)
    record = workdir / "settings.json"
    if record.is_file() and json.loads(record.read_text()) == settings:
        return workdir
    if workdir.exists():
        shutil.rmtree(workdir)
    raw = workdir / "raw"
    generate_category(raw, image_size=image_size, n_train=n_train, n_test_good=n_test_good,
                      n_test_per_cell=n_test_per_cell, seed=seed)  # every type at every default level
    train_items, test_items, has_masks = list_category(raw)
    recipe = {"resize": resize, "crop_size": crop, "mode": "crop"}
    save_split(workdir / "train.npz", load_images(train_items, recipe, False, "train"))
    save_split(workdir / "test.npz", load_images(test_items, recipe, has_masks, "test"))
    record.write_text(json.dumps(settings))
    return workdir


def load(workdir: str | Path, split: str):
    from stages.data.prepared import load_split

    return load_split(Path(workdir) / f"{split}.npz")


def lite0_model():
    """EfficientNet-Lite0 (timm tf_efficientnet_lite0) with the packaged ImageNet weights, eval mode."""
    from stages.features.backbones import load_backbone

    return load_backbone(ARCH)


def extract(split, model=None, batch_size: int = 16, with_global: bool = True):
    """A prepared Split -> FeatureSet of Lite0 blocks.2 + blocks.4 maps, as the extract stage writes them
    (with_global=False: as predict computes them for PatchCore, the network cut after blocks.4)."""
    from stages.features.backbones import FeatureExtractor
    from stages.features.cache import FeatureSet

    extractor = FeatureExtractor(
        ARCH, model if model is not None else lite0_model(), LAYERS, "cpu", with_global=with_global
    )
    out = extractor(split.images, batch_size=batch_size, desc=f"extract {len(split)}")
    return FeatureSet(out.global_embeddings, out.feature_maps, split.image_size, split.names)


def metrics(split, image_scores, maps, fpr_limit: float = 0.3) -> dict:
    """Image AUROC, pixel AUROC and AUPRO (stages.evaluation.metrics) of one scoring."""
    from stages.evaluation.metrics import aupro, image_auroc, pixel_auroc

    return {
        "image_auroc": image_auroc(split.labels, image_scores),
        "pixel_auroc": pixel_auroc(split.masks, maps),
        "aupro": aupro(split.masks, maps, fpr_limit),
    }


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
