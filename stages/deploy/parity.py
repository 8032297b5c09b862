"""onnxruntime against torch on the same images: the export stage's check, and the benchmark's."""
from __future__ import annotations

import numpy as np

from stages.deploy.onnx_model import OnnxModel
from stages.deploy.torch_model import FittedModel

# onnxruntime vs torch: image scores within 1e-4 relative; anomaly maps within 1e-3 absolute plus 1e-5 of
# the value (numpy's allclose rule): a feature autoencoder's maps reach the hundreds, where float32
# arithmetic in two libraries' kernels alone differs by more than 1e-3.
SCORE_RTOL = 1e-4
MAP_ATOL, MAP_RTOL = 1e-3, 1e-5


def parity(torch_model: FittedModel, onnx_model: OnnxModel, images: np.ndarray, names: list[str]) -> dict:
    """Largest relative score difference and absolute map difference over `images`."""
    reference, exported = torch_model.score(images, names), onnx_model.score(images, names)
    scale = np.maximum(np.abs(reference.image_scores), 1e-12)
    result = {
        "images": len(images),
        "score_rel": float(np.max(np.abs(exported.image_scores - reference.image_scores) / scale)),
    }
    if reference.anomaly_maps is not None:
        difference = np.abs(exported.anomaly_maps - reference.anomaly_maps)
        result["map_abs"] = float(difference.max())
        result["map_excess"] = float(np.max(difference - MAP_RTOL * np.abs(reference.anomaly_maps)))  # vs MAP_ATOL
        result["map_max"] = float(np.abs(reference.anomaly_maps).max())
    return result
