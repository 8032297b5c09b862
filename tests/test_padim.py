"""PaDiM against the paper's formulas written out in NumPy, on tiny random feature maps.

Two layers on a non-square grid (6 x 8 and 3 x 4, as a stride-8 and a stride-16 layer of a 48 x 64
image), channels correlated and far from zero mean, so a swapped axis, a biased covariance, a missing
eps, a cancelling running sum or a shifted upsampling all change the numbers.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.core.errors import PipelineError
from stages.features.cache import FeatureSet
from stages.methods import get_method
from stages.methods.base import STATE_FILE
from stages.methods.maps import MapHead
from stages.methods.padim import PaDiM

IMAGE_SIZE = (48, 64)
CHANNELS = (5, 7)  # fine, coarse: 12 concatenated channels


def feature_set(n: int, seed: int, channels=CHANNELS, grid=(6, 8), spread: float = 1.0) -> FeatureSet:
    """Correlated channels (a random mixing of 3 sources, `spread` their scale, plus noise of std 0.3)
    around a large offset, cached as float16."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    layers = {}
    for i, (c, stride) in enumerate(zip(channels, (1, 2))):
        sources = spread * torch.randn(n, 3, h // stride, w // stride, generator=g)
        mixing = torch.randn(c, 3, generator=torch.Generator().manual_seed(100 + i))
        x = torch.einsum("ck,nkhw->nchw", mixing, sources) + 0.3 * torch.randn(
            n, c, h // stride, w // stride, generator=g
        )
        layers[f"layer{i + 2}"] = (x + 20.0).half()
    return FeatureSet(torch.zeros(n, 4), layers, IMAGE_SIZE, [f"img{i}" for i in range(n)])


@torch.no_grad()
def distance_maps(model: PaDiM, inputs: FeatureSet) -> torch.Tensor:
    """(N, h, w) Mahalanobis distances at the feature grid, before upsampling and smoothing: the
    scorer's first step, on its own."""
    scorer, step = model.scorer(tuple(inputs.image_size)), model.batch_size()
    return torch.cat([scorer.distances(*model.scorer_inputs(inputs, start, start + step))
                      for start in range(0, len(inputs), step)])


def concatenated(features: FeatureSet, upsample: str = "nearest") -> np.ndarray:
    """(N, C, h, w) float64: every layer on the finest grid, concatenated. Nearest = each coarse cell
    copied over the 2 x 2 fine cells it covers (the reference code's unfold / fold)."""
    maps = [m.double().numpy() for m in features.feature_maps.values()]
    h, w = maps[0].shape[-2:]
    out = []
    for m in maps:
        if m.shape[-2:] != (h, w):
            if upsample == "nearest":
                m = m.repeat(h // m.shape[-2], axis=2).repeat(w // m.shape[-1], axis=3)
            else:
                m = F.interpolate(torch.from_numpy(m), size=(h, w), mode="bilinear", align_corners=False).numpy()
        out.append(m)
    return np.concatenate(out, axis=1)


def paper_distances(
    train: FeatureSet, test: FeatureSet, dims: np.ndarray, eps: float = 0.01, upsample: str = "nearest"
) -> np.ndarray:
    """Defard et al. eq. 1 and 2 per position (i, j): mu = mean of the N training vectors,
    Sigma = 1/(N-1) sum (x - mu)(x - mu)^T + eps I, M(x) = sqrt((x - mu)^T Sigma^-1 (x - mu))."""
    x_train = concatenated(train, upsample)[:, dims]
    x_test = concatenated(test, upsample)[:, dims]
    n, d, h, w = x_train.shape
    distances = np.empty((len(x_test), h, w))
    for i in range(h):
        for j in range(w):
            x = x_train[:, :, i, j]
            mu = x.mean(axis=0)
            sigma = (x - mu).T @ (x - mu) / (n - 1) + eps * np.eye(d)
            delta = x_test[:, :, i, j] - mu
            distances[:, i, j] = np.sqrt(np.einsum("nk,kl,nl->n", delta, np.linalg.inv(sigma), delta))
    return distances


@pytest.mark.parametrize("n_train, dimensions", [(40, 8), (40, None), (5, 10)])
def test_maps_match_the_papers_formulas(n_train, dimensions):
    """Raw maps within 1e-5 of the float64 formulas, then the same post-processing gives the same maps
    and image scores (5 images for 10 dimensions: a rank-4 sample covariance, invertible by eps I)."""
    train, test = feature_set(n_train, seed=0), feature_set(6, seed=1)
    model = PaDiM(fit={"dimensions": dimensions}, score={"smoothing_sigma": 2}, seed=3).fit(train)
    dims = model.dims.numpy()
    assert len(dims) == (dimensions or sum(CHANNELS)) and len(set(dims.tolist())) == len(dims)
    expected = paper_distances(train, test, dims)
    ours = distance_maps(model, test)
    assert ours.shape == (6, 6, 8)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)

    prediction = model.predict(test)
    _, maps = MapHead(IMAGE_SIZE, 2.0)(torch.from_numpy(expected).float())
    assert prediction.anomaly_maps.shape == (6, *IMAGE_SIZE) and prediction.anomaly_maps.dtype == np.float32
    assert prediction.image_scores.dtype == np.float64
    np.testing.assert_allclose(prediction.anomaly_maps, maps.numpy(), rtol=1e-5)
    np.testing.assert_allclose(prediction.image_scores, maps.numpy().reshape(6, -1).max(axis=1), rtol=1e-5)


def test_options_match_the_formulas_too():
    """upsample: bilinear, another eps, and the mean image score."""
    train, test = feature_set(20, seed=4), feature_set(3, seed=5)
    fit = {"dimensions": 9, "regularisation": 0.5, "upsample": "bilinear"}
    model = PaDiM(fit=fit, score={"smoothing_sigma": 0, "image_score": "mean"}, seed=1).fit(train)
    expected = paper_distances(train, test, model.dims.numpy(), eps=0.5, upsample="bilinear")
    np.testing.assert_allclose(distance_maps(model, test).numpy(), expected, rtol=1e-5)
    _, maps = MapHead(IMAGE_SIZE, 0.0)(torch.from_numpy(expected).float())
    np.testing.assert_allclose(model.predict(test).image_scores, maps.numpy().reshape(3, -1).mean(axis=1), rtol=1e-5)


def test_float32_whitening_keeps_ill_conditioned_distances():
    """Sources 30x the noise: covariances of condition number 1e5 (1e2 above). The float32 Cholesky
    factor of the inverse still gives the float64 distances within 1e-5; x^T Sigma^-1 x with Sigma^-1
    itself in float32 is off by 3e-4 here (the reason the model stores W, not Sigma^-1)."""
    train, test = feature_set(60, seed=22, spread=30.0), feature_set(8, seed=23, spread=30.0)
    model = PaDiM(fit={"dimensions": None}).fit(train)
    expected = paper_distances(train, test, np.arange(12))
    np.testing.assert_allclose(distance_maps(model, test).numpy(), expected, rtol=1e-5)


def _fitted(train: FeatureSet, **fit) -> PaDiM:
    return PaDiM(fit={"dimensions": 8, **fit}, seed=2).fit(train)


@pytest.mark.parametrize("batch_size, positions_per_pass", [(1, None), (4, None), (7, 5), (3, 1), (50, 47)])
def test_streaming_fit_equals_the_one_shot_fit(monkeypatch, batch_size, positions_per_pass):
    """Any batching of images and positions gives the Gaussians of one batch holding everything, and no
    step ever embeds more than batch_size training images at once."""
    import stages.methods.padim as padim

    train = feature_set(17, seed=6)
    one_shot = _fitted(train, batch_size=len(train))
    seen = []
    real_embed = padim.embed
    monkeypatch.setattr(padim, "embed", lambda maps, *args: seen.append(len(maps[0])) or real_embed(maps, *args))
    streamed = _fitted(train, batch_size=batch_size, positions_per_pass=positions_per_pass)
    passes = 1 if positions_per_pass is None else -(-48 // positions_per_pass)
    assert max(seen) == min(batch_size, len(train)) and sum(seen) == passes * len(train)
    assert torch.equal(streamed.dims, one_shot.dims)
    torch.testing.assert_close(streamed.mean, one_shot.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(streamed.whitening, one_shot.whitening, rtol=1e-5, atol=1e-6)


def test_whitening_is_the_inverse_covariance_factor():
    """W^T W = Sigma^-1 with W lower triangular, at every position (float32 storage: 1e-5)."""
    train = feature_set(30, seed=7)
    model = _fitted(train)
    x = concatenated(train)[:, model.dims.numpy()].reshape(30, 8, -1).transpose(2, 0, 1)
    w = model.whitening.double().numpy()
    assert model.whitening.dtype == torch.float32 and model.whitening.shape == (48, 8, 8)
    assert np.all(np.triu(w, k=1) == 0)
    for p in (0, 13, 47):
        sigma = np.cov(x[p], rowvar=False) + 0.01 * np.eye(8)
        np.testing.assert_allclose(w[p].T @ w[p] @ sigma, np.eye(8), atol=1e-5)
        np.testing.assert_allclose(model.mean[p].double().numpy(), x[p].mean(axis=0), rtol=1e-6)


def test_the_seed_draws_the_dimensions():
    train = feature_set(10, seed=8)
    a, again, b = (PaDiM(fit={"dimensions": 6}, seed=s).fit(train) for s in (0, 0, 1))
    assert torch.equal(a.dims, again.dims) and torch.equal(a.whitening, again.whitening)
    assert not torch.equal(a.dims, b.dims)
    assert a.draws_random_numbers()
    # every channel: nothing drawn, one fit serves every seed
    every = PaDiM(fit={"dimensions": None}, seed=5)
    assert not every.draws_random_numbers()
    assert every.fit(train).dims.tolist() == list(range(12))


def test_save_and_load_round_trip(tmp_path):
    train, test = feature_set(12, seed=9), feature_set(3, seed=10)
    model = PaDiM(fit={"dimensions": 7}, score={"smoothing_sigma": 1}, seed=4).fit(train)
    model.save(tmp_path / "padim")
    blob = torch.load(tmp_path / "padim" / STATE_FILE, weights_only=True)  # tensors and plain data only
    assert blob["method"] == "padim" and blob["seed"] == 4 and blob["fit"]["dimensions"] == 7
    assert blob["state"]["whitening"].dtype == torch.float32
    loaded = get_method("padim").load(tmp_path / "padim", score={"smoothing_sigma": 1})
    for key in ("dims", "mean", "whitening"):
        assert torch.equal(getattr(loaded, key), getattr(model, key))
    before, after = model.predict(test), loaded.predict(test)
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    np.testing.assert_array_equal(after.anomaly_maps, before.anomaly_maps)
    # scoring params come from the caller: no smoothing is the raw map upsampled
    raw = get_method("padim").load(tmp_path / "padim", score={"smoothing_sigma": 0})
    _, maps = MapHead(IMAGE_SIZE, 0.0)(distance_maps(model, test))
    np.testing.assert_array_equal(raw.predict(test).anomaly_maps, maps.numpy())


def test_an_anomalous_position_is_found():
    train, good, bad = feature_set(30, seed=11), feature_set(2, seed=12), feature_set(2, seed=12)
    # off the channels' correlation at fine cell (4, 1): pixels rows 32-39, columns 8-15
    bad.feature_maps["layer2"][:, :, 4, 1] += torch.tensor([4.0, -4, 4, -4, 4]).half()
    model = PaDiM(fit={"dimensions": 10}, score={"smoothing_sigma": 2}).fit(train)
    good_pred, bad_pred = model.predict(good), model.predict(bad)
    assert bad_pred.image_scores.min() > 2 * good_pred.image_scores.max()
    row, col = np.unravel_index(bad_pred.anomaly_maps[0].argmax(), IMAGE_SIZE)
    assert 30 <= row <= 41 and 6 <= col <= 17


def _one_line_error(call) -> str:
    with pytest.raises(PipelineError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_impossible_fits_say_why_in_one_line():
    train = feature_set(6, seed=13)
    assert _one_line_error(lambda: PaDiM(fit={"dimensions": 13}).fit(train)) == (
        "fit.dimensions=13 is more than the 12 channels of the cached feature maps (at most 12, or null for all)"
    )
    assert PaDiM(fit={"dimensions": 12}).fit(train).dims.tolist() == list(range(12))
    one = feature_set(1, seed=14)
    assert _one_line_error(lambda: PaDiM(fit={"dimensions": 4}).fit(one)) == (
        "padim needs at least 2 training images to estimate a covariance per position, got 1"
    )
    broken = feature_set(6, seed=15)
    broken.feature_maps["layer3"][2, :, 1, 2] = float("nan")
    assert "covariance at feature position (2, 4) is not positive definite" in _one_line_error(
        lambda: PaDiM(fit={"dimensions": None}).fit(broken)
    )


def test_two_images_are_enough():
    """Fewer images than dimensions: the sample covariance has rank N - 1, eps I keeps it invertible,
    and the distances are the formulas' (finite and positive)."""
    train, test = feature_set(2, seed=16), feature_set(2, seed=17)
    model = PaDiM(fit={"dimensions": None}).fit(train)
    distances = distance_maps(model, test).numpy()
    assert np.all(np.isfinite(distances)) and np.all(distances > 0)
    np.testing.assert_allclose(distances, paper_distances(train, test, np.arange(12)), rtol=1e-5)


@pytest.mark.parametrize(
    "block, params, message",
    [
        ("fit", {"dimensions": 0}, "fit.dimensions: must be an integer >= 1 or null, got 0"),
        ("fit", {"regularisation": 0}, "fit.regularisation: must be a finite number > 0, got 0"),
        ("fit", {"upsample": "cubic"}, "fit.upsample: must be one of nearest, bilinear, got 'cubic'"),
        ("fit", {"positions_per_pass": 0}, "fit.positions_per_pass: must be an integer >= 1 or null, got 0"),
        ("fit", {"dimension": 100}, "fit.dimension: unknown parameter (did you mean 'dimensions'?"),
        ("score", {"smoothing_sigma": -1}, "score.smoothing_sigma: must be a finite number in [0, 64], got -1"),
    ],
)
def test_bad_params(block, params, message):
    assert _one_line_error(lambda: PaDiM(**{block: params})).startswith(message)


def test_scoring_other_features_than_the_fitted_ones_is_refused():
    model = PaDiM(fit={"dimensions": 4}).fit(feature_set(5, seed=18))
    other = feature_set(2, seed=19, channels=(5, 6))
    assert _one_line_error(lambda: model.predict(other)) == (
        "padim: the features have [5, 6] channels on a 6x8 grid, the model was fitted on [5, 7] on 6x8 "
        "(re-run the fit stage)"
    )
    assert _one_line_error(lambda: PaDiM().predict(other)) == "padim: not fitted (call fit() or load() first)"
