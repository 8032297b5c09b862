"""onnxruntime against torch on the same images: the export stage's check, and the benchmark's."""
from __future__ import annotations

import numpy as np

from stages.core.progress import progress_bar
from stages.deploy.onnx_model import OnnxModel
from stages.deploy.torch_model import FittedModel

# onnxruntime vs torch: image scores within 1e-3 relative; anomaly maps within 1e-3 absolute plus 1e-3 of
# the value (numpy's allclose rule). Two libraries' float32 kernels sum long products in different orders:
# PatchCore on WideResNet50 at 224 px (1,536-wide features, a 1024-image-size stand-in) differs by 2.3e-4
# relative in its scores and 2.4e-4 of the value in its maps (bench/stand_in.py), a feature autoencoder's
# maps reach the hundreds; a graph that computes something else differs by orders of magnitude more.
SCORE_RTOL = 1e-3
MAP_ATOL, MAP_RTOL = 1e-3, 1e-3
CHUNK = 32  # images scored by both runtimes at a time: bounds the maps held


def parity(torch_model: FittedModel, onnx_model: OnnxModel, images: np.ndarray, names: list[str]) -> dict:
    """Largest relative score difference and absolute map difference over `images`, scored CHUNK images at
    a time by both runtimes under one bar (the models' own loops draw none)."""
    score_rel, maps = 0.0, {"map_abs": 0.0, "map_excess": -np.inf, "map_max": 0.0}
    with progress_bar(total=len(images), desc="parity: onnxruntime vs torch", unit="img") as bar:
        for start in range(0, len(images), CHUNK):
            chunk, chunk_names = images[start : start + CHUNK], names[start : start + CHUNK]
            reference, exported = torch_model.score(chunk, chunk_names), onnx_model.score(chunk, chunk_names)
            scale = np.maximum(np.abs(reference.image_scores), 1e-12)
            score_rel = max(score_rel, float(np.max(np.abs(exported.image_scores - reference.image_scores) / scale)))
            if reference.anomaly_maps is not None:
                difference = np.abs(exported.anomaly_maps - reference.anomaly_maps)
                maps["map_abs"] = max(maps["map_abs"], float(difference.max()))
                excess = float(np.max(difference - MAP_RTOL * np.abs(reference.anomaly_maps)))  # vs MAP_ATOL
                maps["map_excess"] = max(maps["map_excess"], excess)
                maps["map_max"] = max(maps["map_max"], float(np.abs(reference.anomaly_maps).max()))
            bar.update(len(chunk))
    has_maps = maps["map_excess"] > -np.inf
    return {"images": len(images), "score_rel": score_rel, **(maps if has_maps else {})}
