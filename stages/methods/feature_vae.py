"""Variational autoencoder on cached CNN features: feature_ae with a variational bottleneck.

The study's next step ("feature extractor backbones with variational autoencoders"). Same input as
feature_ae (cached maps, averaged over `neighbourhood`, on the finest grid, standardised per
channel). A 1x1-conv encoder C -> (C + latent) // 2 -> 2 * latent gives a Gaussian posterior
(mean, log-variance) per location; the decoder mirrors it. Training minimises the negative ELBO
per location: squared reconstruction error summed over channels + `beta` * KL(q(z|x) || N(0, I)),
with one reparameterised sample per location (seeded: the fit is deterministic on CPU).

Scoring decodes the posterior mean. `score.anomaly_map`: `reconstruction` (squared error of that
reconstruction, summed over channels, as feature_ae) or `elbo` (the same plus `beta` * the KL term:
the negative ELBO with the mean as the sample). Maps are upsampled to the image size and smoothed;
the image score is their max (or mean).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from stages.core.schema import option
from stages.methods.training import FeatureFit, FeatureReconstructionDetector, MapScore, conv1x1_block

ANOMALY_MAPS = ("reconstruction", "elbo")


class FeatureVAE(nn.Module):
    def __init__(self, channels: int, latent: int):
        super().__init__()
        hidden = (channels + latent) // 2
        self.encoder = nn.Sequential(*conv1x1_block(channels, hidden), nn.Conv2d(hidden, 2 * latent, 1))
        self.decoder = nn.Sequential(*conv1x1_block(latent, hidden), nn.Conv2d(hidden, channels, 1))

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var.clamp(-10.0, 10.0)  # keeps exp() finite early in training

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of the posterior mean (what scoring uses)."""
        return self.decoder(self.posterior(x)[0])


def kl_map(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) per location, summed over latent channels: (N, h, w)."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(1)


@dataclasses.dataclass(frozen=True)
class Fit(FeatureFit):
    latent: int = option(32, "latent channels per location", ge=1)
    beta: float = option(1.0, "weight of the KL term in the training loss (and the elbo map)", ge=0)


@dataclasses.dataclass(frozen=True)
class Score(MapScore):
    anomaly_map: str = option(
        "reconstruction",
        "reconstruction: squared error of the decoded mean; elbo: plus beta * KL",
        choices=ANOMALY_MAPS,
    )


class FeatureVariationalAE(FeatureReconstructionDetector):
    method = "feature_vae"
    Fit = Fit
    Score = Score

    def build_net(self) -> nn.Module:
        return FeatureVAE(self.mean.shape[1], self.fit_params.latent)

    def loss(self, net: nn.Module, x: Tensor) -> Tensor:
        mean, log_var = net.posterior(x)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp() if net.training else mean
        reconstruction = (net.decoder(z) - x).pow(2).sum(1)
        return (reconstruction + self.fit_params.beta * kl_map(mean, log_var)).mean()

    def error_maps(self, recon: Tensor, x: Tensor) -> Tensor:
        error = super().error_maps(recon, x)
        if self.score_params.anomaly_map == "elbo":
            error = error + self.fit_params.beta * kl_map(*self.net.posterior(x))
        return error
