"""The colour scale of anomaly maps and the heatmap overlay: one definition for the figures, predict
and the demo, so a map looks the same wherever it is shown.

The scale is the model's, fixed by evaluate (models/<category>.category/<model>.scoring.json): the
median of the validation (good) maps' pixels is the palest colour and transparent, the image
threshold the strongest, so a pale map means "as normal as the good images", never rescaled noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HEATMAP_CMAP = "YlOrRd"  # sequential, pale = low: a pale map reads as "normal"
OVERLAY_ALPHA = 0.75  # opacity of the colour at the top of the scale


@dataclass(frozen=True)
class ColourScale:
    low: float  # median of the validation maps' pixels -> palest colour, transparent in the overlay
    high: float  # the image threshold -> strongest colour

    @classmethod
    def from_validation(cls, val_maps: np.ndarray | None, threshold: float) -> "ColourScale":
        low = float(np.median(val_maps)) if val_maps is not None and val_maps.size else 0.0
        high = float(threshold)
        if not high > low:  # a threshold below the typical pixel (e.g. score: mean): keep a usable range
            high = float(np.max(val_maps)) if val_maps is not None and val_maps.size else low + 1.0
            high = high if high > low else low + 1.0
        return cls(low, high)

    def normalise(self, values: np.ndarray) -> np.ndarray:
        return np.clip((values - self.low) / (self.high - self.low), 0.0, 1.0)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, scale: ColourScale) -> np.ndarray:
    """(H, W, 3) uint8 image with the map's colour blended in, opacity growing with the map's level."""
    from matplotlib import colormaps

    level = scale.normalise(anomaly_map)
    colour = colormaps[HEATMAP_CMAP](level)[..., :3] * 255.0
    alpha = OVERLAY_ALPHA * level[..., None]
    return (image * (1 - alpha) + colour * alpha).round().astype(np.uint8)
