"""Seeded t-SNE of a backbone's cached global embeddings (train, validation and test images)."""
from __future__ import annotations

import numpy as np

from stages.core.errors import PipelineError


def embed_2d(
    embeddings: np.ndarray, perplexity: float, seed: int, iterations: int = 1000, pca_dims: int = 50
) -> np.ndarray:
    """(N, D) -> (N, 2): standardise, PCA to at most `pca_dims` (speed, less noise), then t-SNE.

    Perplexity is capped at (N - 1) / 3 so tiny runs still work; same inputs and seed -> same points.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    if n < 5:
        raise PipelineError(f"figures.tsne: need at least 5 images, got {n}")
    if not (isinstance(perplexity, (int, float)) and not isinstance(perplexity, bool) and perplexity > 0):
        raise PipelineError(f"figures.tsne.perplexity must be a positive number, got {perplexity!r}")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 250:
        raise PipelineError(f"figures.tsne.iterations must be an integer >= 250, got {iterations!r}")
    x = (x - x.mean(0)) / np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    dims = min(pca_dims, n - 1, x.shape[1])
    if x.shape[1] > dims:
        x = PCA(n_components=dims, random_state=seed, svd_solver="full").fit_transform(x)
    tsne = TSNE(
        n_components=2,
        perplexity=min(float(perplexity), (n - 1) / 3.0),
        init="pca",
        learning_rate="auto",
        random_state=int(seed),
        max_iter=iterations,
        n_jobs=1,
    )
    return tsne.fit_transform(x)


def tsne_rows(points: np.ndarray, splits: list[str], names: list[str], defect_types: list[str]) -> list[dict]:
    """One CSV row per image; `group` (e.g. 'train good', 'test cut') is what the chart colours by."""
    return [
        {
            "x": round(float(p[0]), 4),
            "y": round(float(p[1]), 4),
            "split": s,
            "defect_type": d,
            "group": f"{s} {d}",
            "image": n,
        }
        for p, s, n, d in zip(points, splits, names, defect_types)
    ]
