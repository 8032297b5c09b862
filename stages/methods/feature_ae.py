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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.common import PipelineError
from stages.features import finest_grid
from stages.methods.training import ReconstructionDetector, TrainingFit, fit_network
from stages.schema import option


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FeatureAutoencoder(nn.Module):
    def __init__(self, channels: int, latent: int):
        super().__init__()
        hidden = (channels + latent) // 2
        self.net = nn.Sequential(
            *_block(channels, hidden), *_block(hidden, latent), *_block(latent, hidden), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _mse(net: nn.Module, x: Tensor) -> Tensor:
    return F.mse_loss(net(x), x)


def _odd(value: int) -> bool:
    return value % 2 == 1


@dataclasses.dataclass(frozen=True)
class Fit(TrainingFit):
    latent: int = option(32, "bottleneck channels of the 1x1-conv autoencoder", ge=1)
    neighbourhood: int = option(3, "average each feature over this window first (1: off)", ge=1, check=_odd, allowed="an odd integer >= 1")


class FeatureAE(ReconstructionDetector):
    method = "feature_ae"
    uses = "features"
    Fit = Fit

    mean: Tensor | None = None
    std: Tensor | None = None

    def _raw_features(self, features) -> Tensor:
        """FeatureSet -> (N, C, h, w) float32 on the finest grid, not yet standardised."""
        maps = features.maps()
        if not maps:
            raise PipelineError(f"{self.method}: the feature cache holds no feature maps")
        k = self.fit_params.neighbourhood
        grid = finest_grid(maps)
        out = []
        for m in maps:
            if k > 1:
                m = F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)
            if tuple(m.shape[-2:]) != grid:
                m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            out.append(m)
        return torch.cat(out, dim=1)

    def _standardised(self, features) -> Tensor:
        x = self._raw_features(features)
        if x.shape[1] != self.mean.shape[1]:
            raise PipelineError(
                f"{self.method}: features have {x.shape[1]} channels but the model was fitted on "
                f"{self.mean.shape[1]} (re-run the fit stage)"
            )
        return (x - self.mean) / self.std

    def fit(self, train_features, val=None) -> "FeatureAE":
        x = self._raw_features(train_features)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant channels: just centre them
        x = (x - mean) / std
        x_val = (self._raw_features(val) - mean) / std if val is not None and len(val) > 0 else None
        self.mean, self.std = mean, std
        fit_network(self, self.build_net, _mse, x, x_val)
        return self

    def build_net(self) -> nn.Module:
        return FeatureAutoencoder(self.mean.shape[1], self.fit_params.latent)

    def model_inputs(self, features) -> Tensor:
        return self._standardised(features)

    def image_size(self, features) -> tuple[int, int]:
        return tuple(features.image_size)

    def get_state(self) -> dict:
        return {**super().get_state(), "mean": self.mean.clone(), "std": self.std.clone()}

    def set_state(self, state: dict) -> None:
        self.mean, self.std = state["mean"].float(), state["std"].float()
        super().set_state(state)
