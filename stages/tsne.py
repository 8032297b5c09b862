"""DVC stage `tsne@<category>-<backbone>`: seeded t-SNE of the backbone's cached global embeddings.

Writes plots/<category>.category/<backbone>.tsne.csv (x, y, split, defect type per train / validation / test image),
drawn by `dvc plots show` as an interactive scatter coloured by split and defect type.
"""
from __future__ import annotations

import numpy as np

from stages.core.cli import run_main, stage_args
from stages.core.errors import PipelineError
from stages.core.outputs import write_csv
from stages.core.params import param
from stages.core.paths import features_dir, pixels_dir, tsne_file
from stages.data.prepared import SPLITS, load_split
from stages.features.cache import load_features


def main() -> None:
    from stages.plotting.embedding import embed_2d, tsne_rows

    params, (category, backbone) = stage_args("tsne", "<category> <backbone>")
    perplexity = param(params, "figures.tsne.perplexity")
    seed = param(params, "figures.tsne.seed")
    iterations = param(params, "figures.tsne.iterations")

    embeddings, splits, names, types = [], [], [], []
    for split in SPLITS:
        features = load_features(features_dir(category, backbone) / f"{split}.pt")
        prepared = load_split(pixels_dir(category) / f"{split}.npz")
        if list(features.names) != prepared.names:
            raise PipelineError(
                f"{features_dir(category, backbone)}: {split} features do not match the prepared images; rerun extract"
            )
        embeddings.append(features.global_embeddings.float().numpy())
        splits += [split] * len(prepared)
        names += prepared.names
        types += prepared.defect_types
    points = embed_2d(np.concatenate(embeddings), perplexity, seed, iterations)
    out = tsne_file(category, backbone)
    write_csv(out, tsne_rows(points, splits, names, types))
    print(f"tsne@{category}-{backbone}: {len(names)} images -> {out}")


if __name__ == "__main__":
    run_main(main)
