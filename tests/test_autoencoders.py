"""The trained methods: autoencoder, skip_autoencoder (RED-Net), feature_ae (DFR-style).

Small images, few epochs, one thread: the whole file runs in a few seconds on a CPU.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from stages.core.errors import PipelineError
from stages.data.prepared import Split
from stages.features.cache import FeatureSet
from stages.methods import get_method
from stages.methods.autoencoder import Autoencoder
from stages.methods.base import TrainingDiverged
from stages.methods.feature_ae import FeatureAE
from stages.methods.feature_vae import FeatureVariationalAE
from stages.methods.skip_autoencoder import SkipAutoencoder, one_minus_ssim_map, ssim_loss, ssim_map
from stages.methods.training import train

torch.set_num_threads(1)

TINY = dict(image_size=16, channels=[4, 8], latent=2, batch_size=4, smoothing_sigma=1.0)


def build(cls, seed: int = 0, **params):
    """A detector from flat keyword params: scoring ones (smoothing_sigma, image_score) go to `score`."""
    score_names = {f.name for f in dataclasses.fields(cls.Score)} - {"batch_size"}
    score = {k: v for k, v in params.items() if k in score_names}
    fit = {k: v for k, v in params.items() if k not in score_names}
    return cls(fit=fit, score=score, seed=seed)


def textures(n: int, size: int, seed: int) -> np.ndarray:
    """Defect-free textures: vertical stripes (random phase) times a faint checker, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(n):
        stripes = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 8 + rng.uniform(0, 2 * np.pi))
        checker = 0.05 * (((xx // 4) + (yy // 4)) % 2)
        base = stripes + checker
        rgb = np.stack([base, 0.8 * base + 0.1, 0.6 * base + 0.15], axis=-1)
        rgb = rgb + rng.normal(0.0, 0.02, rgb.shape)
        images.append((np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8))
    return np.stack(images)


def split(images: np.ndarray, masks: np.ndarray | None = None) -> Split:
    n = len(images)
    labels = np.zeros(n, np.int64) if masks is None else masks.reshape(n, -1).any(1).astype(np.int64)
    return Split(images, [f"img{i:03d}.png" for i in range(n)], labels, ["good"] * n, masks)


def feature_set(n: int, seed: int, image_size=(32, 40)) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    maps = {
        "layer2": torch.randn(n, 6, 8, 10, generator=g).half(),
        "layer3": torch.randn(n, 10, 4, 5, generator=g).half(),
    }
    return FeatureSet(torch.zeros(n, 4), maps, tuple(image_size), [f"img{i}" for i in range(n)])


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not states_equal(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_registry_knows_the_trained_methods():
    for name, cls, uses in [
        ("autoencoder", Autoencoder, "pixels"),
        ("skip_autoencoder", SkipAutoencoder, "pixels"),
        ("feature_ae", FeatureAE, "features"),
        ("feature_vae", FeatureVariationalAE, "features"),
    ]:
        assert get_method(name) is cls
        assert cls.method == name and cls.uses == uses


@pytest.mark.parametrize(
    "cls, extra", [(Autoencoder, {}), (SkipAutoencoder, {"loss": "mse"}), (SkipAutoencoder, {"loss": "ssim"})]
)
def test_training_lowers_the_loss_and_records_history(cls, extra):
    train_split, val_split = split(textures(8, 16, 0)), split(textures(4, 16, 1))
    model = build(cls, **TINY, **extra, epochs=6, patience=0, lr=3e-3).fit(train_split, val_split)
    history = model.history
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert all(isinstance(h["train_loss"], float) and isinstance(h["val_loss"], float) for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_feature_ae_lowers_the_loss_without_val():
    model = build(FeatureAE, latent=4, epochs=6, batch_size=4, patience=0, lr=3e-3).fit(feature_set(8, 0), None)
    assert [h["val_loss"] for h in model.history] == [None] * 6
    assert model.history[-1]["train_loss"] < model.history[0]["train_loss"]


def test_autoencoder_finds_a_pasted_defect():
    size = 32
    train_split = split(textures(12, size, 0))
    good = textures(1, size, 1)
    bad = textures(1, size, 2)
    mask = np.zeros((1, size, size), bool)
    mask[0, 10:16, 18:24] = True
    bad[mask] = 255  # a bright square blob

    model = build(
        Autoencoder,
        image_size=size,
        channels=[8, 16],
        latent=4,
        epochs=60,
        batch_size=4,
        patience=0,
        lr=3e-3,
        smoothing_sigma=1.0,
    ).fit(train_split)
    pred = model.predict(split(np.concatenate([good, bad]), np.concatenate([np.zeros_like(mask), mask])))

    assert pred.image_scores.dtype == np.float64 and pred.image_scores.shape == (2,)
    assert pred.anomaly_maps.dtype == np.float32 and pred.anomaly_maps.shape == (2, size, size)
    assert pred.image_scores[1] > 2 * pred.image_scores[0]
    peak = np.unravel_index(pred.anomaly_maps[1].argmax(), (size, size))
    assert mask[0][peak], f"anomaly-map peak {peak} lies outside the defect"


def test_maps_come_back_at_the_prepared_size():
    model = build(Autoencoder, **TINY, epochs=1).fit(split(textures(4, 24, 0)))
    images = textures(3, 24, 1)  # prepared size 24, model size 16
    pred = model.predict(split(images))
    assert pred.anomaly_maps.shape == (3, 24, 24)
    assert np.isfinite(pred.image_scores).all()
    mean_model = build(Autoencoder, **{**TINY, "image_score": "mean"}, epochs=1).fit(split(textures(4, 24, 0)))
    mean_pred = mean_model.predict(split(images))
    np.testing.assert_allclose(mean_pred.image_scores, mean_pred.anomaly_maps.reshape(3, -1).mean(1), rtol=1e-5)


# pytorch-msssim builds its Gaussian window in float32, so its weights sum to 1 only to ~1e-7;
# with sigma terms of that size against C2 = 9e-4 the result is exact to ~1e-5, in either dtype.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssim_loss_and_map_match_the_closed_form_on_constant_images(dtype):
    tol = 5e-5
    a, b, data_range = 0.3, 0.7, 1.0
    c1 = (0.01 * data_range) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # variances and covariance are 0
    x = torch.full((2, 3, 20, 20), a, dtype=dtype)
    y = torch.full((2, 3, 20, 20), b, dtype=dtype)

    assert float(ssim_loss(x, y)) == pytest.approx(1 - expected, abs=tol)
    assert ssim_map(x, y).shape == (2, 3, 10, 10)  # valid 11x11 window
    dissim = one_minus_ssim_map(x, y)
    assert dissim.shape == (2, 20, 20)  # padded back to the input size
    torch.testing.assert_close(dissim, torch.full_like(dissim, 1 - expected), atol=tol, rtol=0)
    assert float(ssim_loss(x, x)) == pytest.approx(0.0, abs=tol)


def test_local_ssim_map_averages_to_pytorch_msssim():
    from pytorch_msssim import ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g)
    y = (x + 0.1 * torch.randn(2, 3, 24, 24, generator=g)).clamp(0, 1)
    expected = ssim(x, y, data_range=1.0, win_size=11, size_average=False)
    torch.testing.assert_close(ssim_map(x, y).mean(dim=(1, 2, 3)), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (build(Autoencoder, **TINY, epochs=3), split(textures(8, 16, 0)), split(textures(3, 16, 1))),
        lambda: (
            build(SkipAutoencoder, **TINY, loss="ssim", epochs=3),
            split(textures(8, 16, 0)),
            split(textures(3, 16, 1)),
        ),
        lambda: (build(FeatureAE, latent=4, batch_size=4, epochs=3), feature_set(8, 0), feature_set(3, 1)),
        lambda: (build(FeatureVariationalAE, latent=4, batch_size=4, epochs=3), feature_set(8, 0), feature_set(3, 1)),
    ],
    ids=["autoencoder", "skip_autoencoder", "feature_ae", "feature_vae"],
)
def test_same_seed_same_weights_and_scores(make):
    model_a, train_data, test_data = make()
    model_b, _, _ = make()
    torch.manual_seed(123)  # global RNG state must not matter: the method seeds itself
    model_a.fit(train_data, test_data)
    torch.manual_seed(456)
    model_b.fit(train_data, test_data)
    assert states_equal(model_a.get_state(), model_b.get_state())
    assert model_a.history == model_b.history
    np.testing.assert_array_equal(model_a.predict(test_data).image_scores, model_b.predict(test_data).image_scores)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: (build(Autoencoder, seed, **TINY, epochs=2), split(textures(8, 16, 0))),
        lambda seed: (build(FeatureVariationalAE, seed, latent=4, batch_size=4, epochs=2), feature_set(8, 0)),
    ],
    ids=["autoencoder", "feature_vae"],
)
def test_another_seed_another_fit(make):
    """The seed is the fit's: two seeds give two different networks, and the state saves which one it was."""
    first, data = make(0)
    second, _ = make(1)
    first.fit(data)
    second.fit(data)
    assert first.draws_random_numbers() and not states_equal(first.get_state(), second.get_state())
    again, _ = make(1)
    assert states_equal(again.fit(data).get_state(), second.get_state())


def test_nan_loss_raises_training_diverged_with_the_epoch():
    calls = {"n": 0}
    net = torch.nn.Linear(2, 2)

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = model(batch).pow(2).mean()
        return loss * float("nan") if calls["n"] > 2 else loss  # 2 batches per epoch: NaN in epoch 2

    with pytest.raises(TrainingDiverged, match="loss became NaN at epoch 2"):
        train(net, loss_fn, torch.randn(8, 2), None, lr=1e-3, epochs=5, batch_size=4, patience=0, seed=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (build(Autoencoder, **TINY, lr=1e30, epochs=3), split(textures(8, 16, 0))),
        lambda: (build(SkipAutoencoder, **TINY, lr=1e30, epochs=3), split(textures(8, 16, 0))),
        lambda: (build(FeatureAE, latent=4, batch_size=4, epochs=3), _nan_features()),
    ],
    ids=["autoencoder_huge_lr", "skip_autoencoder_huge_lr", "feature_ae_nan_features"],
)
def test_divergence_leaves_no_state(make, tmp_path):
    model, data = make()
    with pytest.raises(TrainingDiverged, match=r"at epoch \d+"):
        model.fit(data)
    assert model.history == []
    with pytest.raises(PipelineError, match="not fitted"):
        model.save(tmp_path / "model")
    assert not (tmp_path / "model" / "model.pt").exists()


def _nan_features() -> FeatureSet:
    features = feature_set(8, 0)
    features.feature_maps["layer2"][0, 0, 0, 0] = float("nan")
    return features


@pytest.mark.parametrize(
    "make",
    [
        lambda: (build(Autoencoder, **TINY, epochs=2), split(textures(6, 16, 0)), split(textures(3, 20, 1))),
        lambda: (
            build(SkipAutoencoder, **TINY, loss="ssim", epochs=2),
            split(textures(6, 16, 0)),
            split(textures(3, 20, 1)),
        ),
        lambda: (build(FeatureAE, latent=4, batch_size=4, epochs=2), feature_set(6, 0), feature_set(3, 1)),
        lambda: (build(FeatureVariationalAE, latent=4, batch_size=4, epochs=2), feature_set(6, 0), feature_set(3, 1)),
    ],
    ids=["autoencoder", "skip_autoencoder", "feature_ae", "feature_vae"],
)
def test_save_load_round_trip_gives_identical_predictions(make, tmp_path):
    model, train_data, test_data = make()
    model.fit(train_data)
    before = model.predict(test_data)
    model.save(tmp_path)
    loaded = get_method(model.method).load(tmp_path, score=model.score_params)
    assert loaded.fit_params == model.fit_params
    after = loaded.predict(test_data)
    np.testing.assert_array_equal(before.image_scores, after.image_scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)


def test_feature_ae_maps_have_the_image_size_and_finite_scores():
    model = build(FeatureAE, latent=4, batch_size=4, epochs=3, neighbourhood=3, smoothing_sigma=2.0)
    model.fit(feature_set(8, 0), feature_set(2, 2))
    pred = model.predict(feature_set(5, 1, image_size=(32, 40)))
    assert pred.anomaly_maps.shape == (5, 32, 40) and pred.anomaly_maps.dtype == np.float32
    assert pred.image_scores.shape == (5,) and pred.image_scores.dtype == np.float64
    assert np.isfinite(pred.image_scores).all() and np.isfinite(pred.anomaly_maps).all()
    np.testing.assert_allclose(pred.image_scores, pred.anomaly_maps.reshape(5, -1).max(1), rtol=1e-6)
    state = model.get_state()
    assert state["mean"].shape == (1, 16, 1, 1) and state["std"].shape == (1, 16, 1, 1)


def test_unknown_loss_names_the_parameter():
    with pytest.raises(PipelineError, match="^fit.loss: must be one of mse, ssim, got 'l1'$"):
        build(SkipAutoencoder, loss="l1")


@pytest.mark.parametrize(
    "cls, hparams, name",
    [
        (Autoencoder, {"colour": 3}, "colour"),
        (Autoencoder, {"image_score": "median"}, "image_score"),
        (Autoencoder, {"image_size": 100}, "image_size"),
        (Autoencoder, {"epochs": 0}, "epochs"),
        (FeatureAE, {"neighbourhood": 2}, "neighbourhood"),
    ],
)
def test_bad_hparams_are_one_line_errors(cls, hparams, name):
    with pytest.raises(PipelineError, match=rf"^(fit|score)\.{name}: (unknown parameter|must be)"):
        build(cls, **hparams)


def test_without_validation_data_early_stopping_watches_the_train_loss():
    net = torch.nn.Linear(2, 2)
    def constant(model, batch):  # never improves after epoch 1
        return model(batch).sum() * 0 + 1.0

    for val in (None, torch.zeros(0, 2)):  # empty validation data counts as none
        history = train(net, constant, torch.randn(4, 2), val, lr=1e-3, epochs=20, batch_size=4, patience=3, seed=0)
        assert len(history) == 4  # best at epoch 1, then 3 epochs without improvement
        assert all(math.isclose(h["train_loss"], 1.0) and h["val_loss"] is None for h in history)


@pytest.mark.parametrize("defect", ["cut", "metal_contamination"])
def test_autoencoder_on_synthetic_carpet_finds_a_real_defect(defect):
    """Trained on defect-free synthetic carpet, the AE scores a carpet with a clearly visible generated
    defect (ΔE*ab 32, 96 px) higher than a held-out good one, and its map peaks inside the defect's exact
    mask. Cuts and metal flakes: their bright and dark structure is what a pixel reconstruction misses;
    a colour stain or a hole at this difference stays below this tiny AE's residuals on the texture
    itself (the difficulty ladder measures exactly that, docs/explanation/synthetic-benchmark.md)."""
    from stages.data.synthetic import Level, render_image

    size = 64
    train_split = split(np.stack([render_image(0, 0, i, size)[0] for i in range(16)]))
    good = render_image(0, 1, 0, size)[0]
    # a clearly visible defect, large enough for 64 px (96 px; the default ladder's 16 x 16 px would be 4 x 4)
    visible = Level(delta_e=32.0, area=1536, width=8.0)
    bad, mask = render_image(0, 2, 0, size, defect, visible)
    model = build(
        Autoencoder,
        image_size=size,
        channels=[16, 32],
        latent=8,
        epochs=40,
        batch_size=4,
        patience=0,
        lr=3e-3,
        smoothing_sigma=1.0,
    ).fit(train_split)
    pred = model.predict(split(np.stack([good, bad])))
    assert pred.image_scores[1] > 1.3 * pred.image_scores[0]
    peak = np.unravel_index(pred.anomaly_maps[1].argmax(), (size, size))
    assert mask[peak], f"anomaly-map peak {peak} lies outside the {defect} mask"


def test_feature_vae_learns_and_its_elbo_map_adds_the_kl_term(tmp_path):
    model = build(FeatureVariationalAE, latent=4, batch_size=4, epochs=8, patience=0, lr=3e-3, smoothing_sigma=0.0)
    model.fit(feature_set(8, 0), feature_set(3, 2))
    assert model.history[-1]["train_loss"] < model.history[0]["train_loss"]
    test = feature_set(3, 1)
    reconstruction = model.predict(test)
    model.save(tmp_path)
    # the map kind is a scoring param: the same fitted model, re-scored
    elbo = FeatureVariationalAE.load(tmp_path, score={"anomaly_map": "elbo", "smoothing_sigma": 0.0}).predict(test)
    assert np.all(elbo.anomaly_maps >= reconstruction.anomaly_maps - 1e-6)
    assert np.all(elbo.image_scores > reconstruction.image_scores)  # the KL term is positive somewhere


@pytest.mark.parametrize("beta", [0.37, 2.5])
def test_feature_vae_elbo_map_is_reconstruction_plus_beta_kl(beta):
    """score.anomaly_map: elbo -> per location, sum_c (decoded mean - x)^2 + beta * KL(N(mu, sigma^2) || N(0, I)),
    KL = 1/2 sum_latent (mu^2 + sigma^2 - 1 - log sigma^2), with the model's own (non-default) beta."""
    fit = dict(latent=3, batch_size=4, epochs=1, patience=0, beta=beta)
    elbo = build(FeatureVariationalAE, **fit, anomaly_map="elbo").fit(feature_set(6, 0))
    plain = build(FeatureVariationalAE, **fit, anomaly_map="reconstruction").fit(feature_set(6, 0))
    assert elbo.fit_params.beta == beta
    x = torch.randn(2, 16, 8, 10, generator=torch.Generator().manual_seed(5))  # 6 + 10 standardised channels
    with torch.no_grad():
        for model in (elbo, plain):
            model.net.eval()
        mean, log_var = elbo.net.posterior(x)
        recon = elbo.net(x)
        assert torch.equal(recon, elbo.net.decoder(mean))  # scoring decodes the posterior mean
        reconstruction = ((recon - x) ** 2).sum(dim=1)
        kl = 0.5 * (mean**2 + torch.exp(log_var) - 1 - log_var).sum(dim=1)
        assert kl.shape == (2, 8, 10) and bool((kl > 0).any())
        torch.testing.assert_close(elbo.error_maps(recon, x), reconstruction + beta * kl, rtol=1e-5, atol=1e-6)
        # the same weights (same seed) scored with the reconstruction map: no KL term
        torch.testing.assert_close(plain.net(x), recon)
        torch.testing.assert_close(plain.error_maps(plain.net(x), x), reconstruction, rtol=1e-5, atol=1e-6)
