"""Global kNN, PatchCore, the coreset sampler and the distance helpers on small tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.core.errors import PipelineError
from stages.features.cache import FeatureSet
from stages.methods import REGISTRY, get_method
from stages.methods.global_knn import GlobalKNN
from stages.methods.neighbours import nearest, squared_norms
from stages.methods.patchcore import PatchCore
from stages.methods.sampler import RandomProjection, greedy_select


def feature_set(global_embeddings=None, maps=None, image_size=(32, 32)) -> FeatureSet:
    n = len(global_embeddings) if global_embeddings is not None else len(next(iter(maps.values())))
    return FeatureSet(
        global_embeddings=global_embeddings if global_embeddings is not None else torch.zeros(n, 4),
        feature_maps=maps or {},
        image_size=image_size,
        names=[f"img{i}" for i in range(n)],
    )


def greedy_coreset(features, ratio, projection_dim=128, n_starting_points=10, seed=0):
    """Indices (sorted) of the `ratio` fraction of rows by approximate greedy k-center, projected and
    selected in one go (PatchCore.fit streams the projection batch by batch)."""
    projection = RandomProjection(features.shape[1], projection_dim, seed)
    return greedy_select(projection(features), ratio, projection.generator, n_starting_points, progress=False)


@torch.no_grad()
def embed(model: PatchCore, maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Feature maps of a batch, in layer order -> (N * h * w, D) patch embeddings and the grid (h, w)."""
    return model.embedder([m.shape[1] for m in maps])([m.float() for m in maps])


def test_nearest_block_by_block_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(37, 5, generator=g), torch.randn(53, 5, generator=g)
    brute = torch.cdist(queries.double(), bank.double()).min(dim=1)
    whole = nearest(queries, bank, squared_norms(bank))
    assert torch.allclose(whole[0].double(), brute.values, atol=1e-5) and torch.equal(whole[1], brute.indices)
    for max_elements in (7, 100, 53 * 10):  # one query per block, a few, and blocks of 10 queries
        dist, index = nearest(queries, bank, squared_norms(bank), max_elements=max_elements)
        assert torch.allclose(dist, whole[0], atol=1e-6) and torch.equal(index, whole[1])


def test_the_strict_product_runs_in_openblas_haswell_kernels():
    """Under numerics: strict (the suite's) the CPU product is numpy's OpenBLAS on its Haswell kernels, the
    same code path on every AVX2 CPU (bench/cross_cpu_check.py), not MKL: its bytes are OpenBLAS's
    fl(||b||^2 - 2 q.b), and nearest() takes each row's first minimum, as torch's min does."""
    import numpy as np
    from threadpoolctl import threadpool_info

    from stages.core import numerics
    from stages.methods.neighbours import _row_minimum, bank_terms

    assert numerics.active_mode() == "strict"
    np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # numpy loads its BLAS
    # numpy's OpenBLAS, and scipy's where scipy is loaded: each on its Haswell kernels
    assert {(i["internal_api"], i["architecture"]) for i in threadpool_info() if i["user_api"] == "blas"} == {
        ("openblas", "Haswell")}
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 96, generator=g), torch.randn(500, 96, generator=g)
    norms = squared_norms(bank)
    expected = norms.numpy() - np.float32(2.0) * (queries.numpy() @ bank.numpy().T)
    assert np.array_equal(bank_terms(queries, bank, norms).numpy().view(np.uint32), expected.view(np.uint32))
    # the row minimum: small integers, so every row has tied minima; numpy's pass takes the first, as torch's
    terms = torch.randint(0, 4, (200, 300), generator=g).float()
    values, index = _row_minimum(terms, numpy_pass=True)
    assert torch.equal(values, terms.min(dim=1).values) and torch.equal(index, terms.min(dim=1).indices)
    assert torch.equal(index, (terms == values[:, None]).float().argmax(dim=1))  # the first of the ties
    distances, nearest_index = nearest(queries, bank, norms)
    assert torch.equal(nearest_index, torch.cdist(queries.double(), bank.double()).min(dim=1).indices)
    assert torch.allclose(distances, torch.cdist(queries, bank).min(dim=1).values, atol=1e-5)


def test_a_bank_of_another_width_is_the_same_plain_error_on_either_path():
    """numpy's product (strict, CPU) and torch's (fast, GPU, tracing) refuse a width mismatch alike."""
    from stages.methods.neighbours import _bank_terms

    queries, bank = torch.zeros(2, 4), torch.zeros(3, 5)
    for openblas in (True, False):
        with pytest.raises(ValueError, match=r"^the queries have 4 features, the bank's rows 5$"):
            _bank_terms(queries, bank, squared_norms(bank), openblas)


def test_global_knn_score_is_mean_distance_to_k_nearest():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(20, 6, generator=g)
    test = torch.randn(5, 6, generator=g)
    model = GlobalKNN(score={"k": 3}).fit(feature_set(train))
    scores = model.predict(feature_set(test)).image_scores
    expected = np.sort(np.linalg.norm(test.numpy()[:, None] - train.numpy()[None], axis=2), axis=1)[:, :3].mean(1)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert model.predict(feature_set(test)).anomaly_maps is None


def test_global_knn_keeps_highest_variance_dimensions():
    train = torch.zeros(10, 4)
    train[:, 1] = torch.arange(10.0)  # the only dimension that varies much
    train[:, 3] = torch.arange(10.0) * 0.1
    model = GlobalKNN(fit={"top_variance_dims": 1}, score={"k": 2}).fit(feature_set(train))
    assert model.dims.tolist() == [1]
    query = torch.tensor([[100.0, 4.0, -100.0, 0.0]])  # differs only in dropped dimensions
    assert model.predict(feature_set(query)).image_scores[0] == pytest.approx(0.5)


def test_global_knn_caps_k_at_the_bank_with_a_warning(capsys):
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(10, 3, generator=g), torch.randn(2, 3, generator=g)
    capped = GlobalKNN(score={"k": 50}).fit(feature_set(train)).predict(feature_set(test)).image_scores
    warning = capsys.readouterr().err.strip()
    assert warning == "warning: k=50 is larger than the memory bank (10 training images); using k=10"
    every = GlobalKNN(score={"k": 10}).fit(feature_set(train)).predict(feature_set(test)).image_scores
    np.testing.assert_array_equal(capped, every)


def _naive_greedy(points: torch.Tensor, n_select: int, start: torch.Tensor) -> list[int]:
    min_dist = torch.cdist(points, points[start]).mean(1)
    chosen = []
    for _ in range(n_select):
        i = int(torch.argmax(min_dist))
        chosen.append(i)
        min_dist = torch.minimum(min_dist, torch.cdist(points, points[i : i + 1])[:, 0])
    return sorted(chosen)


def test_greedy_coreset_matches_naive_k_center():
    g = torch.Generator().manual_seed(3)
    points = torch.randn(300, 8, generator=g)
    selected = greedy_coreset(points, 0.1, projection_dim=None, n_starting_points=10, seed=7)
    start = torch.randperm(300, generator=torch.Generator().manual_seed(7))[:10]
    assert selected.tolist() == _naive_greedy(points, 30, start)
    # same seed, same coreset; ratio 1 keeps everything
    assert torch.equal(selected, greedy_coreset(points, 0.1, projection_dim=None, seed=7))
    assert greedy_coreset(points, 1.0).tolist() == list(range(300))


@pytest.mark.parametrize("candidates", [1, 3, 16, 10_000])
def test_greedy_rounds_select_what_the_plain_loop_selects(monkeypatch, candidates):
    """Rounds of picks among the farthest points (few candidates: many rounds; more than the points:
    one round) give the plain loop's indices, duplicates included: equal distances at the
    candidates' bound must fall back to the plain step and take the lowest index."""
    import stages.methods.sampler as sampler

    g = torch.Generator().manual_seed(11)
    clusters = torch.randn(6, 5, generator=g) * 4
    points = torch.cat([clusters.repeat_interleave(40, 0) + torch.randn(240, 5, generator=g), clusters.repeat(3, 1)])
    far = torch.tensor([[30.0, -30, 30, -30, 30], [-25.0, 25, 25, -25, 0]])
    # exact duplicates, the farthest points among them: ties at the candidates' bound
    points = torch.cat([points[:5], far, points[5:], points[:50], far, far])
    monkeypatch.setattr(sampler, "CANDIDATES", candidates)
    monkeypatch.setattr(sampler, "PASS_BLOCK", 64)  # several blocks per pass
    # up to 0.6: 188 of 248 distinct points, so no pick is left to rounding noise between duplicates
    for ratio in (0.05, 0.3, 0.6):
        selected = sampler.greedy_select(points, ratio, torch.Generator().manual_seed(2), progress=False)
        assert torch.equal(selected, sampler.plain_greedy_select(points, ratio, torch.Generator().manual_seed(2))), (
            ratio
        )


def test_greedy_round_ties(monkeypatch):
    """A candidate equal to the bound is not provably the farthest (a point outside may tie with a lower
    index): the round ends without a pick. Among equal candidates the lowest index goes first."""
    import stages.methods.sampler as sampler

    points = torch.tensor([[0.0, 0], [3, 0], [0, 3], [1, 1]])
    norms = (points * points).sum(dim=1)
    monkeypatch.setattr(sampler, "CANDIDATES", 1)
    assert sampler._select_among_farthest(points, norms, torch.tensor([1.0, 5, 5, 5]), limit=4) == []
    monkeypatch.setattr(sampler, "CANDIDATES", 2)
    # 1 and 2 tie above the bound (1.0): 1 first; then 2, now 18 away from 1, still above the bound
    assert sampler._select_among_farthest(points, norms, torch.tensor([0.0, 7, 7, 1]), limit=4) == [1, 2]


def test_greedy_coreset_picks_one_point_per_cluster():
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(5, 16, generator=g) * 20
    points = torch.cat([c + torch.randn(200, 16, generator=g) for c in centres])
    selected = greedy_coreset(points, 0.005, projection_dim=8, seed=0)
    # 5 points out of 1000: k-center puts one in each cluster (a random pick would in 4% of cases)
    assert len(selected) == 5
    assert sorted(int(i) // 200 for i in selected) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, "half", float("nan")])
def test_coreset_ratio_outside_unit_interval(ratio):
    with pytest.raises(PipelineError, match=r"fit.coreset_ratio: must be a finite number in \(0, 1\], got"):
        PatchCore(fit={"coreset_ratio": ratio})


def _texture_maps(n: int, seed: int, anomaly_at=None):
    """Two layers (8x8 and 4x4) of a smooth periodic pattern plus noise; optional anomaly at (row, col)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    base = torch.stack([torch.sin(xx + c) + torch.cos(yy * 0.5 + c) for c in range(6)])
    fine = base[None].repeat(n, 1, 1, 1) + 0.05 * torch.randn(n, 6, 8, 8, generator=g)
    if anomaly_at is not None:
        fine[:, :, anomaly_at[0], anomaly_at[1]] += 5.0
    coarse = torch.nn.functional.avg_pool2d(fine, 2).repeat(1, 2, 1, 1)
    return {"layer2": fine.half(), "layer3": coarse.half()}


def test_patchcore_localises_an_anomalous_patch(tmp_path):
    train = feature_set(maps=_texture_maps(6, seed=0), image_size=(32, 32))
    good = feature_set(maps=_texture_maps(2, seed=1), image_size=(32, 32))
    bad = feature_set(maps=_texture_maps(2, seed=2, anomaly_at=(2, 5)), image_size=(32, 32))
    fit = dict(coreset_ratio=0.5, pretrain_embed_dimension=16, target_embed_dimension=16)
    model = PatchCore(fit=fit, score={"smoothing_sigma": 1})
    model.fit(train)
    assert len(model.bank) == int(6 * 64 * 0.5)
    good_pred, bad_pred = model.predict(good), model.predict(bad)
    assert bad_pred.anomaly_maps.shape == (2, 32, 32)
    assert bad_pred.image_scores.min() > 3 * good_pred.image_scores.max()
    row, col = np.unravel_index(bad_pred.anomaly_maps[0].argmax(), (32, 32))
    # feature cell (2, 5) covers pixels rows 8-11, cols 20-23 at stride 4
    assert 6 <= row <= 13 and 18 <= col <= 25

    model.save(tmp_path / "pc")
    loaded = get_method("patchcore").load(tmp_path / "pc", score={"smoothing_sigma": 1})
    np.testing.assert_array_equal(loaded.predict(bad).image_scores, bad_pred.image_scores)
    np.testing.assert_array_equal(loaded.predict(bad).anomaly_maps, bad_pred.anomaly_maps)

    # scoring params come from the caller, not the checkpoint: the same bank, re-scored with eq. 7
    reweighted = get_method("patchcore").load(tmp_path / "pc", score={"smoothing_sigma": 1, "reweight": True})
    assert torch.equal(reweighted.bank, model.bank)
    weighted_scores = reweighted.predict(bad).image_scores
    patches, _ = embed(model, list(bad.feature_maps.values()))
    expected = [_eq7_reference(model.bank, image, b=9) for image in patches.reshape(2, 64, -1)]
    np.testing.assert_allclose(weighted_scores, expected, rtol=1e-4)
    assert np.all(weighted_scores < bad_pred.image_scores)  # eq. 7's factor is below 1


def _eq7_reference(bank, patches, b: int) -> float:
    """PatchCore eq. 7 in NumPy for one image's patches: s* = max over patches of the distance to the
    nearest bank patch m*; s = (1 - exp(||m_test - m*||) / sum_{m in N_b(m*)} exp(||m_test - m||)) * s*,
    with N_b(m*) the b bank patches nearest to m* (m* itself among them)."""
    bank, patches = np.asarray(bank, np.float64), np.asarray(patches, np.float64)
    distances = np.linalg.norm(patches[:, None] - bank[None], axis=2)
    best = distances.min(1).argmax()
    m_test, m_star = patches[best], bank[distances[best].argmin()]
    s_star = np.linalg.norm(m_test - m_star)
    support = bank[np.argsort(np.linalg.norm(bank - m_star, axis=1), kind="stable")[:b]]
    weight = 1 - np.exp(np.linalg.norm(m_test - m_star)) / np.exp(np.linalg.norm(m_test - support, axis=1)).sum()
    return weight * s_star


def test_patchcore_eq7_reweighting_on_a_hand_made_bank():
    """patch_size 1, one layer and embedding sizes equal to its channels: a patch embedding is the feature
    itself, so the bank (coreset ratio 1: every training patch) and the test patches are the 2-d points
    written here."""
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    # two test images of 1 x 2 patches: image 0 = (0.1, 0.1), (3, 0); image 1 = (0, 2.5), (5, 4)
    patches = torch.tensor([[[0.1, 0.1], [3.0, 0.0]], [[0.0, 2.5], [5.0, 4.0]]])
    train = feature_set(maps={"layer": bank.t().reshape(1, 2, 2, 2)}, image_size=(8, 8))  # one image, 2 x 2 patches
    inputs = feature_set(maps={"layer": patches.permute(0, 2, 1).reshape(2, 2, 1, 2)}, image_size=(4, 8))
    fit = dict(
        coreset_ratio=1.0, projection_dim=None, patch_size=1, pretrain_embed_dimension=2, target_embed_dimension=2
    )

    def scores(**score):
        model = PatchCore(fit=fit, score={"smoothing_sigma": 0, **score}).fit(train)
        assert torch.equal(model.bank, bank)
        return model.predict(inputs).image_scores

    np.testing.assert_allclose(scores(), [2.0, 1.0], rtol=1e-6)  # distances to the nearest bank patch
    weighted = scores(reweight=True, num_neighbors=3)
    # image 0: s* = 2 at (3, 0), m* = (1, 0); its 3 bank neighbours (1, 0), (0, 0), (0, 2) lie 2, 3, sqrt(13) away
    by_hand = (1 - np.exp(2) / (np.exp(2) + np.exp(3) + np.exp(np.sqrt(13)))) * 2
    assert weighted[0] == pytest.approx(by_hand, rel=1e-5)
    np.testing.assert_allclose(weighted, [_eq7_reference(bank, image, b=3) for image in patches], rtol=1e-5)
    # a neighbourhood of 4 (the whole bank) adds (5, 5), sqrt(29) away from (3, 0)
    np.testing.assert_allclose(
        scores(reweight=True, num_neighbors=4), [_eq7_reference(bank, image, b=4) for image in patches], rtol=1e-5
    )


@pytest.mark.parametrize("batch_size, projection_dim", [(1, 8), (4, 8), (3, None)])
def test_streamed_fit_keeps_the_one_shot_coreset(batch_size, projection_dim):
    """Embedding and projecting batch by batch selects the same patches as projecting all at once."""
    g = torch.Generator().manual_seed(8)
    maps = {
        "layer2": torch.randn(7, 6, 8, 8, generator=g).half(),
        "layer3": torch.randn(7, 10, 4, 4, generator=g).half(),
    }
    fit = dict(
        coreset_ratio=0.2,
        pretrain_embed_dimension=16,
        target_embed_dimension=12,
        projection_dim=projection_dim,
        batch_size=batch_size,
    )
    model = PatchCore(fit=fit, seed=3).fit(feature_set(maps=maps))
    patches, _ = embed(model, list(maps.values()))
    expected = patches[greedy_coreset(patches, 0.2, projection_dim=projection_dim, seed=3)]
    assert len(model.bank) == int(7 * 64 * 0.2)
    assert torch.equal(model.bank, expected)


def test_patchcore_is_deterministic():
    train = feature_set(maps=_texture_maps(4, seed=5))
    params = dict(coreset_ratio=0.25, pretrain_embed_dimension=8, target_embed_dimension=8)
    def fit():
        return PatchCore(fit=params).fit(train).bank

    assert torch.equal(fit(), fit())


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_an_unfitted_model_says_so_in_one_line_whatever_the_method(method, tmp_path):
    """One fitted check (scikit-learn's check_is_fitted) for every registered method: scoring, predicting
    and saving before fit() or load() give the same one-line error, and saving writes nothing."""
    from stages.data.prepared import Split

    detector = get_method(method)()
    assert detector.fitted_attributes, f"{method} declares no fitted_attributes"
    if detector.uses == "pixels":
        inputs = Split(np.zeros((1, 32, 32, 3), np.uint8), ["a"], np.zeros(1, np.int64), ["good"], None)
    else:
        inputs = feature_set(torch.zeros(1, 4), {"layer": torch.zeros(1, 4, 8, 8)})
    calls = {"scorer": lambda: detector.scorer((32, 32)), "cached_scorer": lambda: detector.cached_scorer((32, 32)),
             "predict": lambda: detector.predict(inputs, progress=False), "save": lambda: detector.save(tmp_path / "m")}
    for name, call in calls.items():
        with pytest.raises(PipelineError) as info:
            call()
        assert str(info.value) == f"{method}: not fitted (call fit() or load() first)", name
    assert not (tmp_path / "m").exists()


def test_unknown_method():
    with pytest.raises(PipelineError, match="unknown method 'magic'"):
        get_method("magic")


def _official_embed(maps, p, pretrain_dim, target_dim):
    """The official PatchCore order: unfold every layer into p x p patches, upsample the coarser
    layers' patch tensors to the finest grid, then MeanMapper per layer and the Aggregator."""
    ref_h, ref_w = maps[0].shape[-2:]
    per_layer = []
    for layer in maps:
        n, c, h, w = layer.shape
        patches = torch.nn.functional.unfold(layer, p, padding=p // 2).reshape(n, c, p, p, h, w)
        if (h, w) != (ref_h, ref_w):
            flat = patches.reshape(-1, 1, h, w)
            flat = torch.nn.functional.interpolate(flat, size=(ref_h, ref_w), mode="bilinear", align_corners=False)
            patches = flat.reshape(n, c, p, p, ref_h, ref_w)
        features = patches.permute(0, 4, 5, 1, 2, 3).reshape(n * ref_h * ref_w, 1, -1)
        per_layer.append(torch.nn.functional.adaptive_avg_pool1d(features, pretrain_dim).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(len(per_layer[0]), 1, -1)
    return torch.nn.functional.adaptive_avg_pool1d(stacked, target_dim).squeeze(1)


def test_patchcore_embedding_matches_the_official_order_of_operations():
    g = torch.Generator().manual_seed(6)
    maps = [torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 7, 4, 4, generator=g)]
    model = PatchCore(fit=dict(pretrain_embed_dimension=12, target_embed_dimension=10))
    ours, grid = embed(model, maps)
    assert grid == (8, 8)
    torch.testing.assert_close(ours, _official_embed(maps, 3, 12, 10), rtol=1e-5, atol=1e-6)
    # listing the coarse layer first still embeds on the finest grid
    assert embed(model, maps[::-1])[1] == (8, 8)


def test_exact_sqrt_is_the_correctly_rounded_float32_sqrt():
    """The methods' square root: bit for bit IEEE's float32 sqrt (numpy's is the CPU's sqrt
    instruction), on values of every magnitude, with zero kept. torch's float32 sqrt goes through MKL's
    vector math, which differs between Intel and AMD CPUs in the last bit (bench/cross_cpu_check.py)."""
    import numpy as np

    from stages.methods.neighbours import exact_sqrt, root, squared_distances

    rng = np.random.default_rng(0)
    x = (rng.random(100_000) * 10.0 ** rng.integers(-20, 20, 100_000)).astype(np.float32)
    x[:3] = [0.0, 1.0, 4.0]
    got = exact_sqrt(torch.from_numpy(x))
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy().view(np.uint32), np.sqrt(x).view(np.uint32))
    q, b = torch.randn(7, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    assert torch.allclose(squared_distances(q, b), torch.cdist(q, b) ** 2, atol=1e-12)
    assert torch.allclose(root(squared_distances(q, b)), torch.cdist(q, b), atol=1e-12)
    assert (root(squared_distances(q, q)) >= 0).all()  # clamped: no negative rounding residue under the root
