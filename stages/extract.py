"""DVC stage `extract@<category>-<backbone>`: cache global embeddings and mid-level maps of every
prepared image of one category.

Run once per category and backbone in `backbones:`, and shared by every model that names it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from stages.core.cli import run_main, stage_args
from stages.core.device import resolve_device
from stages.core.errors import check
from stages.core.outputs import atomic_path
from stages.core.params import param
from stages.core.paths import WEIGHTS_ROOT, features_dir, pixels_dir
from stages.data.prepared import SPLITS, load_split, read_inputs, write_inputs
from stages.features.backbones import FeatureExtractor, get_spec, load_backbone
from stages.features.cache import FeatureSet, save_features


def weights_file(name: str, weights: str | None) -> str | None:
    """A local checkpoint must lie under weights/, which every extract stage declares as a dependency,
    so replacing the file in place reruns the extraction instead of leaving stale features."""
    if weights is None:
        return None
    path = Path(weights)
    inside = Path(os.path.abspath(path)).is_relative_to(Path.cwd() / WEIGHTS_ROOT)  # a link in weights/ is fine
    check(inside, f"backbones.{name}.weights: {weights} is not under {WEIGHTS_ROOT}/ (copy it there so DVC tracks it)")
    check(path.is_file(), f"backbones.{name}.weights: file not found: {weights}")
    return str(path)


def main() -> None:
    params, (category, name) = stage_args("extract", "<category> <backbone>")
    backbones = param(params, "backbones")
    check(
        name in backbones,
        f"backbones.{name}: no such backbone in params.yaml (known: {', '.join(backbones) or 'none'})",
    )
    options = backbones[name]
    arch = options["arch"] or name
    get_spec(arch)  # unknown backbone -> clear error before any work
    weights = weights_file(name, options["weights"])
    device = resolve_device(param(params, "device"))
    torch.manual_seed(0)  # nothing random in inference; fixed anyway for any stochastic layer

    extractor = FeatureExtractor(arch, load_backbone(arch, weights), options["layers"], device)
    batch_size = options["batch_size"]
    prepared_dir = pixels_dir(category)
    with atomic_path(features_dir(category, name)) as out:
        out.mkdir(parents=True)
        recipe = {"name": name, "arch": arch, "layers": extractor.layers, "weights": weights}
        prepared = read_inputs(prepared_dir)
        write_inputs(out, prepared["preprocess"], recipe, prepared["n_train"])
        for split_name in SPLITS:
            split = load_split(prepared_dir / f"{split_name}.npz")
            extracted = extractor(split.images, batch_size=batch_size, desc=f"{category} {name} {split_name}")
            save_features(
                out / f"{split_name}.pt",
                FeatureSet(extracted.global_embeddings, extracted.feature_maps, split.image_size, split.names),
            )
    shapes = {k: tuple(v.shape[1:]) for k, v in extracted.feature_maps.items()}
    print(f"{category} {name}: global {tuple(extracted.global_embeddings.shape[1:])}, maps {shapes}")


if __name__ == "__main__":
    run_main(main)
