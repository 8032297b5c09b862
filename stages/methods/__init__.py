"""Registry of anomaly-detection methods: params.yaml `models.<name>.method` -> class.

Adding a method (docs/how-to/add-a-method.md): one module with an AnomalyDetector subclass (its
`fitted_attributes` included), one entry here, one block under `models:` in params.yaml, and that
model's line in each of the four all-model charts of dvc.yaml's `plots:` (image_roc, image_pr,
pixel_roc, pro; DVC cannot loop there), then `python -m stages.docs`. The tests take every method
from this registry (tests/conftest.py): a new one needs no test edit.
"""
from __future__ import annotations

import importlib

from stages.core.errors import PipelineError

# method name -> "module:Class"; imported lazily so a broken optional method never blocks the others
REGISTRY = {
    "global_knn": "stages.methods.global_knn:GlobalKNN",
    "patchcore": "stages.methods.patchcore:PatchCore",
    "autoencoder": "stages.methods.autoencoder:Autoencoder",
    "skip_autoencoder": "stages.methods.skip_autoencoder:SkipAutoencoder",
    "feature_ae": "stages.methods.feature_ae:FeatureAE",
    "feature_vae": "stages.methods.feature_vae:FeatureVariationalAE",
    "padim": "stages.methods.padim:PaDiM",
}


def get_method(name: str):
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise PipelineError(f"unknown method '{name}' (known: {known})")
    module_name, class_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_fitted(directory, score=None, device: str = "cpu"):
    """The fitted model in `directory`, whatever its method (read from the file, loaded once)."""
    from pathlib import Path

    from stages.methods.base import STATE_FILE, read_state

    path = Path(directory) / STATE_FILE
    method = read_state(path)["method"]
    try:
        cls = get_method(method)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None
    return cls.load(directory, score=score, device=device)
