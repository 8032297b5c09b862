"""DVC stage `extract@<backbone>`: cache global embeddings and mid-level maps of every prepared image.

Run once per backbone in `backbones:` and shared by every model that names it.
"""
from __future__ import annotations

import sys

import torch

from stages.backbones import FeatureExtractor, get_spec, load_backbone
from stages.common import PipelineError, atomic_path, check, load_params, param, resolve_device, run_main
from stages.data.prepared import SPLITS, load_split
from stages.features import FeatureSet, save_features
from stages.paths import FEATURES_ROOT, PIXELS_DIR


def main() -> None:
    if len(sys.argv) != 2:
        raise PipelineError("usage: python -m stages.extract <backbone name from params.yaml backbones>")
    name = sys.argv[1]
    params = load_params()
    options = param(params, f"backbones.{name}")
    check(isinstance(options, dict), f"backbones.{name}: expected a mapping")
    arch = options.get("arch", name)
    get_spec(arch)  # unknown backbone -> clear error before any work
    batch_size = options.get("batch_size", 16)
    check(isinstance(batch_size, int) and batch_size > 0, f"backbones.{name}.batch_size must be a positive integer")
    device = resolve_device(param(params, "device", "auto"))
    torch.manual_seed(0)  # nothing random in inference; fixed anyway for any stochastic layer

    extractor = FeatureExtractor(arch, load_backbone(arch, options.get("weights")), options.get("layers"), device)
    with atomic_path(FEATURES_ROOT / name) as out:
        out.mkdir(parents=True)
        for split_name in SPLITS:
            split = load_split(PIXELS_DIR / f"{split_name}.npz")
            extracted = extractor(split.images, batch_size=batch_size, desc=f"{name} {split_name}")
            save_features(
                out / f"{split_name}.pt",
                FeatureSet(extracted.global_embeddings, extracted.feature_maps, split.image_size, split.names),
            )
    shapes = {k: tuple(v.shape[1:]) for k, v in extracted.feature_maps.items()}
    print(f"{name}: global {tuple(extracted.global_embeddings.shape[1:])}, maps {shapes}")


if __name__ == "__main__":
    run_main(main)
