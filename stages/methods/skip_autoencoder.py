"""Autoencoder with symmetric skip connections (RED-Net: Mao et al. 2016, arXiv:1606.08921).

Encoder: convolutions E1..EL (len(channels) stride-2 4x4 convs, then a 3x3 conv to `latent`
channels), each followed by ReLU. Decoder: the mirrored transposed convolutions DL..D1, D_k undoing
E_k. As in RED-Net, every `skip_every` layers (default 2) the output of encoder layer E_k is added
element-wise to the output of its mirrored decoder layer (the one producing E_k's shape, D_{k+1}),
and the sum goes through ReLU. The last decoder layer ends in a sigmoid (images in [0, 1]).

This is the carpet study's architecture reproduced on purpose: the skips carry the encoder's
feature maps around the bottleneck (with the defaults E4's 256 x 8 x 8 map skips it entirely, and
E2's 64 x 32 x 32 map is bigger than the 3 x 128 x 128 input), so the network can learn to copy its
input, defects included - which is why it detected anomalies poorly (image AUROC 0.41 / 0.56).

`loss`: "mse" (map = squared error summed over RGB) or "ssim" (loss = 1 - SSIM with an 11-pixel
Gaussian window, data_range 1; map = 1 - local SSIM averaged over RGB, as in the MVTec AD paper).
SSIM comes from pytorch-msssim; the local map is assembled from its own building blocks because
its public `ssim` only returns the spatial mean.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _ms_ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, gaussian_filter
from torch import Tensor, nn

from stages.core.schema import SchemaError, option
from stages.methods.training import PixelFit, PixelReconstructionDetector

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5  # pytorch-msssim's (and Wang et al.'s) default window sigma
SSIM_K = (0.01, 0.03)
LOSSES = ("mse", "ssim")


def ssim_loss(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """1 - SSIM (pytorch_msssim.ssim, window 11), averaged over the batch."""
    return 1.0 - _ms_ssim(x, y, data_range=data_range, win_size=SSIM_WINDOW, size_average=True)


def ssim_map(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Local SSIM, (N, C, H - 10, W - 10): pytorch-msssim's `_ssim` before its spatial mean."""
    channels = x.shape[1]
    win = _fspecial_gauss_1d(SSIM_WINDOW, SSIM_SIGMA).repeat([channels, 1, 1, 1]).to(x.device, x.dtype)
    c1 = (SSIM_K[0] * data_range) ** 2
    c2 = (SSIM_K[1] * data_range) ** 2
    mu1, mu2 = gaussian_filter(x, win), gaussian_filter(y, win)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    sigma1_sq = gaussian_filter(x * x, win) - mu1_sq
    sigma2_sq = gaussian_filter(y * y, win) - mu2_sq
    sigma12 = gaussian_filter(x * y, win) - mu1_mu2
    cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
    return ((2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map


def one_minus_ssim_map(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """(N, H, W): 1 - local SSIM averaged over channels, edge-padded back to the input size."""
    half = SSIM_WINDOW // 2
    dissim = 1.0 - ssim_map(x, y, data_range).mean(1, keepdim=True)
    return F.pad(dissim, (half, half, half, half), mode="replicate").squeeze(1)


class REDNet(nn.Module):
    def __init__(self, channels: list[int], latent: int, skip_every: int):
        super().__init__()
        widths = [3, *channels, latent]  # widths[k] = channels of E_k's output (E_0 = the input)
        n = len(widths) - 1
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()  # decoder[k - 1] = D_k: widths[k] -> widths[k - 1]
        for k in range(1, n + 1):
            down = k < n  # the last (bottleneck) layer keeps the resolution
            if down:
                self.encoder.append(nn.Conv2d(widths[k - 1], widths[k], 4, stride=2, padding=1))
                self.decoder.append(nn.ConvTranspose2d(widths[k], widths[k - 1], 4, stride=2, padding=1))
            else:
                self.encoder.append(nn.Conv2d(widths[k - 1], widths[k], 3, padding=1))
                self.decoder.append(nn.ConvTranspose2d(widths[k], widths[k - 1], 3, padding=1))
        # E_k's output joins D_{k+1}'s output; E_n (the code) has no mirror to join
        self.skips = [k for k in range(1, n) if k % skip_every == 0]

    def forward(self, x: Tensor) -> Tensor:
        feats = []
        h = x
        for conv in self.encoder:
            h = F.relu(conv(h))
            feats.append(h)  # feats[k - 1] = E_k's output
        for k in range(len(self.decoder), 0, -1):  # D_n ... D_1
            h = self.decoder[k - 1](h)
            if k == 1:
                return torch.sigmoid(h)
            if (k - 1) in self.skips:
                h = h + feats[k - 2]
            h = F.relu(h)
        raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Fit(PixelFit):
    loss: str = option("mse", "mse (map: squared error) | ssim (map: 1 - local SSIM)", choices=LOSSES)
    skip_every: int = option(2, "an encoder output joins its mirrored decoder layer every this many layers", ge=1)

    def validate_block(self) -> None:
        super().validate_block()
        if self.loss == "ssim" and self.image_size < SSIM_WINDOW:
            raise SchemaError("image_size", f"must be at least {SSIM_WINDOW} for the SSIM loss, got {self.image_size}")


class SkipAutoencoder(PixelReconstructionDetector):
    method = "skip_autoencoder"
    Fit = Fit

    def build_net(self) -> nn.Module:
        fit = self.fit_params
        return REDNet(list(fit.channels), fit.latent, fit.skip_every)

    def loss(self, net: nn.Module, x: Tensor) -> Tensor:
        recon = net(x)
        return ssim_loss(recon, x) if self.fit_params.loss == "ssim" else F.mse_loss(recon, x)

    def error_maps(self, recon: Tensor, x: Tensor) -> Tensor:
        if self.fit_params.loss == "ssim":
            return one_minus_ssim_map(recon, x)
        return super().error_maps(recon, x)
