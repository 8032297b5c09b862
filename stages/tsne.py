"""DVC stage `tsne@<backbone>`: seeded t-SNE of the backbone's cached global embeddings.

Writes plots/tsne/<backbone>.csv (x, y, split, defect type per train / validation / test image),
drawn by `dvc plots show` as an interactive scatter coloured by split and defect type.
"""
from __future__ import annotations

import sys

import numpy as np

from stages.common import PipelineError, load_params, param, run_main, write_csv
from stages.data.prepared import SPLITS, load_split
from stages.features import load_features
from stages.paths import FEATURES_ROOT, PIXELS_DIR, PLOTS_ROOT


def main() -> None:
    from stages.plotting.tsne import embed_2d, tsne_rows

    if len(sys.argv) != 2:
        raise PipelineError("usage: python -m stages.tsne <backbone name from params.yaml backbones>")
    backbone = sys.argv[1]
    params = load_params()
    perplexity = param(params, "figures.tsne.perplexity")
    seed = param(params, "figures.tsne.seed")
    iterations = param(params, "figures.tsne.iterations")

    embeddings, splits, names, types = [], [], [], []
    for split in SPLITS:
        features = load_features(FEATURES_ROOT / backbone / f"{split}.pt")
        prepared = load_split(PIXELS_DIR / f"{split}.npz")
        if list(features.names) != prepared.names:
            raise PipelineError(f"{FEATURES_ROOT / backbone}: {split} features do not match the prepared images; rerun extract")
        embeddings.append(features.global_embeddings.float().numpy())
        splits += [split] * len(prepared)
        names += prepared.names
        types += prepared.defect_types
    points = embed_2d(np.concatenate(embeddings), perplexity, seed, iterations)
    out = PLOTS_ROOT / "tsne" / f"{backbone}.csv"
    write_csv(out, tsne_rows(points, splits, names, types))
    print(f"tsne@{backbone}: {len(names)} images -> {out}")


if __name__ == "__main__":
    run_main(main)
