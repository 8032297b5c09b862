"""Convolutional autoencoder on pixels with an L2 reconstruction loss (the carpet study's `ae_l2`).

Images are scaled to [0, 1] and resized from the prepared size to `image_size`; the anomaly map is
the per-pixel squared reconstruction error summed over RGB, upsampled back to the prepared size and
Gaussian-smoothed (`smoothing_sigma` pixels at that size); the image score is its max (or mean).

Architecture: len(channels) stride-2 4x4 convolutions (LeakyReLU), a linear 3x3 bottleneck conv to
`latent` channels at 1/2**len(channels) of the resolution, and the mirror image with transposed
convolutions, ending in a sigmoid. With the defaults (image_size 128, 4 levels, latent 16) the code
is 16 x 8 x 8 = 1,024 numbers for a 3 x 128 x 128 = 49,152-number input: 48:1 compression
(in general 3 * 4**len(channels) / latent : 1). The study's bottleneck, 256 x 25 x 25 = 160,000 for
a 3 x 224 x 224 = 150,528 input, did not compress at all and reconstructed defects too.

The pixel-AE machinery here (input scaling, batching, map post-processing, state) is shared with
skip_autoencoder.py, which only swaps the network, the loss and the error map.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.common import PipelineError
from stages.methods.training import TRAINING_DEFAULTS, ReconstructionDetector, fit_network, resolve_hparams

PIXEL_AE_DEFAULTS: dict[str, Any] = dict(
    image_size=128, channels=[32, 64, 128, 256], latent=16, score="max", **TRAINING_DEFAULTS
)


class ConvAutoencoder(nn.Module):
    def __init__(self, channels: list[int], latent: int):
        super().__init__()
        widths = [3, *channels]
        encoder: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            encoder += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        encoder.append(nn.Conv2d(widths[-1], latent, 3, padding=1))  # linear bottleneck
        decoder: list[nn.Module] = [nn.Conv2d(latent, widths[-1], 3, padding=1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths[:0:-1], widths[-2::-1]):
            decoder += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        decoder[-1] = nn.Sigmoid()  # the output is an image in [0, 1]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def to_unit_tensor(images: np.ndarray, size: int) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float32 in [0, 1] (antialiased bilinear resize)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    return x.contiguous()


class Autoencoder(ReconstructionDetector):
    method = "autoencoder"
    uses = "pixels"
    DEFAULTS: dict[str, Any] = PIXEL_AE_DEFAULTS

    def __init__(self, device: str = "cpu", **hparams: Any):
        super().__init__(device=device, **hparams)
        self.hp = resolve_hparams(self.method, self.DEFAULTS, hparams)
        self._check_hparams()
        self.net: nn.Module | None = None

    # --- what subclasses change -------------------------------------------------------------
    def _check_hparams(self) -> None:
        hp, name = self.hp, self.method
        channels, latent, size = hp["channels"], hp["latent"], hp["image_size"]
        if not (isinstance(channels, (list, tuple)) and channels
                and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)):
            raise PipelineError(f"params.yaml: 'channels' of method '{name}' must be a non-empty list of positive integers, got {channels!r}")
        if not (isinstance(latent, int) and not isinstance(latent, bool) and latent > 0):
            raise PipelineError(f"params.yaml: 'latent' of method '{name}' must be a positive integer, got {latent!r}")
        factor = 2 ** len(channels)
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= factor and size % factor == 0):
            raise PipelineError(
                f"params.yaml: 'image_size' of method '{name}' must be a positive multiple of {factor} "
                f"(2 ** len(channels)), got {size!r}"
            )

    def build_net(self) -> nn.Module:
        return ConvAutoencoder(list(self.hp["channels"]), self.hp["latent"])

    def loss(self, net: nn.Module, x: Tensor) -> Tensor:
        return F.mse_loss(net(x), x)

    # --- shared -------------------------------------------------------------------------------
    def model_inputs(self, split) -> Tensor:
        return to_unit_tensor(split.images, self.hp["image_size"])

    def image_size(self, split) -> tuple[int, int]:
        return tuple(split.images.shape[1:3])

    @torch.no_grad()
    def reconstruct(self, split) -> np.ndarray:
        """(N, H, W, 3) float32 in [0, 1]: the network's output at the prepared size (for figures)."""
        if self.net is None:
            raise PipelineError(f"{self.method}: reconstruct() called before fit() or load()")
        x, size, out = self.model_inputs(split), self.image_size(split), []
        net = self.net.to(self.device).eval()
        for start in range(0, len(x), self.hp["batch_size"]):
            recon = net(x[start : start + self.hp["batch_size"]].to(self.device)).cpu()
            out.append(F.interpolate(recon, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0))
        if not out:
            return np.zeros((0, *size, 3), np.float32)
        return torch.cat(out).permute(0, 2, 3, 1).numpy().astype(np.float32)

    def fit(self, train_split, val=None) -> "Autoencoder":
        x_val = self.model_inputs(val) if val is not None and len(val) > 0 else None
        fit_network(self, self.build_net, self.loss, self.model_inputs(train_split), x_val)
        return self
