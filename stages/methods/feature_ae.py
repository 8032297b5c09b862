"""Deep Feature Reconstruction style autoencoder on cached CNN features (Shi et al. 2021).

Every cached feature map (FeatureSet.maps(), e.g. layer2 + layer3) is optionally averaged over a
`neighbourhood` x `neighbourhood` window (stride 1), upsampled bilinearly to the finest map's grid
and concatenated along channels; each channel is standardised with the training mean / std (kept
in the saved state). A 1x1-convolution autoencoder C -> (C + latent) // 2 -> latent -> (C +
latent) // 2 -> C (BatchNorm + ReLU between layers, linear output) is trained with MSE. The anomaly
map is the per-location squared reconstruction error summed over channels, upsampled bilinearly to
FeatureSet.image_size and Gaussian-smoothed; the image score is its max (or mean). Features are never
recomputed here: the extract stage's cache is the only input.
"""
from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from stages.core.schema import option
from stages.methods.training import FeatureFit, FeatureReconstructionDetector, conv1x1_block


class FeatureAutoencoder(nn.Module):
    def __init__(self, channels: int, latent: int):
        super().__init__()
        hidden = (channels + latent) // 2
        self.net = nn.Sequential(
            *conv1x1_block(channels, hidden), *conv1x1_block(hidden, latent),
            *conv1x1_block(latent, hidden), nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclasses.dataclass(frozen=True)
class Fit(FeatureFit):
    latent: int = option(32, "bottleneck channels of the 1x1-conv autoencoder", ge=1)


class FeatureAE(FeatureReconstructionDetector):
    method = "feature_ae"
    Fit = Fit

    def build_net(self) -> nn.Module:
        return FeatureAutoencoder(self.mean.shape[1], self.fit_params.latent)
