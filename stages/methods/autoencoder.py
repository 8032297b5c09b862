"""Convolutional autoencoder on pixels with an L2 reconstruction loss (the carpet study's `ae_l2`).

Images are scaled to [0, 1] and resized from the prepared size to `image_size`; the anomaly map is
the per-pixel squared reconstruction error summed over RGB, upsampled back to the prepared size and
Gaussian-smoothed (`smoothing_sigma` pixels at that size); the image score is its max (or mean): `score.image_score`.

Architecture: len(channels) stride-2 4x4 convolutions (LeakyReLU), a linear 3x3 bottleneck conv to
`latent` channels at 1/2**len(channels) of the resolution, and the mirror image with transposed
convolutions, ending in a sigmoid. With the defaults (image_size 128, 4 levels, latent 16) the code
is 16 x 8 x 8 = 1,024 numbers for a 3 x 128 x 128 = 49,152-number input: 48:1 compression
(in general 3 * 4**len(channels) / latent : 1). The study's bottleneck, 256 x 25 x 25 = 160,000 for
a 3 x 224 x 224 = 150,528 input, did not compress at all and reconstructed defects too.

The pixel-AE machinery (input scaling, batching, map post-processing, state) lives in training.py
(PixelReconstructionDetector), shared with skip_autoencoder.py.
"""
from __future__ import annotations

from torch import Tensor, nn

from stages.methods.training import PixelFit, PixelReconstructionDetector

Fit = PixelFit


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


class Autoencoder(PixelReconstructionDetector):
    method = "autoencoder"
    Fit = Fit

    def build_net(self) -> nn.Module:
        return ConvAutoencoder(list(self.fit_params.channels), self.fit_params.latent)
