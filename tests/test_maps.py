"""The map post-processing of stages/methods/maps.py against the libraries it reproduces: the smoothing is
scipy.ndimage.gaussian_filter's ('reflect' borders, truncated at 4 sigma), the resize torch's antialiased
bilinear interpolation. The hand-written versions exist only because they must export to ONNX; these
libraries are their oracles."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from stages.methods.maps import GaussianSmoothing, MapHead, resize_matrix
from stages.methods.training import UnitImages


@pytest.mark.parametrize("size", [(16, 16), (7, 12), (3, 5), (1, 4)])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0])
def test_gaussian_smoothing_is_scipys_gaussian_filter(size, sigma):
    """Every sigma on every size, including kernels far wider than the map (sigma 4: radius 16 on a
    3 x 5 map, where 'reflect' folds the map over itself several times)."""
    maps = np.random.default_rng(int(sigma * 10) + size[0]).normal(size=(3, *size)) ** 2  # skewed, positive
    ours = GaussianSmoothing(size, sigma)(torch.from_numpy(maps).float()).double().numpy()
    expected = ndimage.gaussian_filter(maps, sigma=(0, sigma, sigma), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_sigma_zero_leaves_maps_as_they_are():
    maps = torch.rand(2, 5, 6)
    assert torch.equal(GaussianSmoothing((5, 6), 0.0)(maps), maps)


def test_the_map_head_smooths_like_scipy_after_torchs_bilinear_upsampling():
    """MapHead = bilinear upsampling (PatchCore's), scipy's smoothing, then the max or mean: (scores, maps)."""
    raw = torch.rand(2, 6, 8, generator=torch.Generator().manual_seed(3))
    upsampled = F.interpolate(raw[:, None], size=(24, 32), mode="bilinear", align_corners=False)[:, 0]
    expected = ndimage.gaussian_filter(upsampled.double().numpy(), sigma=(0, 4, 4), mode="reflect", truncate=4.0)
    for image_score, reduce in (("max", np.max), ("mean", np.mean)):
        scores, maps = MapHead((24, 32), 4.0, image_score)(raw)
        np.testing.assert_allclose(maps.double().numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scores.double().numpy(), reduce(expected.reshape(2, -1), axis=1), rtol=1e-5)


@pytest.mark.parametrize(
    "size_in, size_out",
    [((48, 48), (32, 32)), ((32, 32), (48, 48)), ((37, 50), (19, 64)), ((19, 64), (37, 50)), ((224, 224), (7, 7)),
     ((5, 3), (11, 2)), ((2, 9), (1, 1))],
    ids=["down", "up", "odd down and up", "odd up and down", "far down", "tiny", "to one pixel"],
)
def test_resize_matrix_is_torchs_antialiased_bilinear_resize(size_in, size_out):
    """Two matrix products (rows, then columns) equal F.interpolate(antialias=True) on down- and
    up-scaling, odd and non-square sizes, in float32 as the models use them (within 1e-6: a few units
    in the last place; torch's own float32 and float64 resizes differ by 2e-6)."""
    x = torch.rand(2, 3, *size_in, generator=torch.Generator().manual_seed(size_in[0]))
    rows, columns = resize_matrix(size_in[0], size_out[0]), resize_matrix(size_in[1], size_out[1])
    assert rows.shape == (size_out[0], size_in[0]) and columns.shape == (size_out[1], size_in[1])
    ours = rows @ x @ columns.t()
    expected = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_unit_images_resize_as_torch_does():
    """The pixel autoencoders' input module: uint8 -> [0, 1], resized with those matrices."""
    images = torch.randint(0, 256, (2, 45, 30, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = F.interpolate(images.permute(0, 3, 1, 2).float() / 255.0, size=(32, 32), mode="bilinear",
                             align_corners=False, antialias=True).clamp(0.0, 1.0)
    torch.testing.assert_close(UnitImages((45, 30), 32)(images), expected, rtol=1e-5, atol=1e-6)
