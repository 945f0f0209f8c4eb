"""Tests for ctm_core.metrics: sliced W_p, energy distance, Frechet distance, digits FD, FID plumbing."""

from __future__ import annotations

import math
from pathlib import Path
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from torch import Tensor, nn

from ctm_core.data import load_dataset
from ctm_core.metrics import (load_inception, DIGITS_CLASSIFIER_FILE, FIDBackendError, MissingWeightsError, digits_classifier,
                              digits_fd, digits_features, energy_distance, fid_from_samples, frechet_distance,
                              gaussian_stats, load_reference_stats, save_reference_stats, sliced_wasserstein)


def gaussian(n, dim, seed, shift=0.0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# ---------------------------------------------------------------------------------------------
# Sliced Wasserstein


def test_sliced_w2_of_identical_sets_is_zero():
    x = gaussian(500, 3, 0)
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(500)]) < 1e-12  # order does not matter


def test_sliced_w2_of_a_translated_set_matches_closed_form():
    # y = x + m: every projection is shifted by theta.m, so SW2^2 = E_theta[(theta.m)^2] = |m|^2 / D.
    dim, m = 4, torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    x = gaussian(300, dim, 1)
    expected = m.norm().item() / math.sqrt(dim)
    got = sliced_wasserstein(x, x + m, num_projections=4000, seed=3)
    assert got == pytest.approx(expected, rel=0.03)


def test_sliced_w2_of_shifted_gaussians_independent_samples():
    dim, m = 3, torch.tensor([1.5, 0.0, -1.5], dtype=torch.float64)
    x, y = gaussian(3000, dim, 2), gaussian(3000, dim, 3, shift=m)
    expected = m.norm().item() / math.sqrt(dim)
    assert sliced_wasserstein(x, y, num_projections=500) == pytest.approx(expected, rel=0.06)
    # Same distribution, independent samples: small next to the shift.
    assert sliced_wasserstein(x, gaussian(3000, dim, 4), num_projections=500) < 0.1 * expected


def test_sliced_wasserstein_unequal_sizes_is_exact():
    # In 1-D a projection is +-x, so SW_p is W_p itself: compare with scipy's exact W1...
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([[0.5], [2.5]], dtype=torch.float64)
    w1 = stats.wasserstein_distance(x.flatten().numpy(), y.flatten().numpy())
    assert sliced_wasserstein(x, y, num_projections=8, p=1) == pytest.approx(w1, rel=1e-12)
    # ... and for p = 2, repeating each point equalises sizes without changing either measure.
    xr, yr = x.repeat_interleave(2, dim=0), y.repeat_interleave(3, dim=0)
    for p in (1, 2, 3):
        assert sliced_wasserstein(x, y, p=p) == pytest.approx(sliced_wasserstein(xr, yr, p=p), rel=1e-12)
    # Higher dimensions, unequal sizes: duplicating the smaller set is still neutral.
    a, b = gaussian(30, 5, 5), gaussian(10, 5, 6, shift=0.3)
    assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(a, b.repeat(3, 1)), rel=1e-10)


def test_sliced_wasserstein_images_seed_and_validation():
    imgs = gaussian(64, 48, 7).reshape(64, 3, 4, 4)
    a = sliced_wasserstein(imgs, imgs + 0.1, seed=1)
    assert a == sliced_wasserstein(imgs, imgs + 0.1, seed=1)
    assert a != sliced_wasserstein(imgs, imgs + 0.1, seed=2)
    with pytest.raises(ValueError, match="same per-sample size"):
        sliced_wasserstein(gaussian(5, 2, 0), gaussian(5, 3, 0))
    with pytest.raises(ValueError, match="p must"):
        sliced_wasserstein(imgs, imgs, p=0.5)
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein(imgs, imgs, num_projections=0)
    with pytest.raises(ValueError, match="x must hold"):
        sliced_wasserstein(torch.zeros(0, 2), imgs)


# ---------------------------------------------------------------------------------------------
# Energy distance


def _expected_abs_normal(mean, std):
    """E|Z| for Z ~ N(mean, std^2)."""
    return std * math.sqrt(2 / math.pi) * math.exp(-mean**2 / (2 * std**2)) + mean * (1 - 2 * stats.norm.cdf(-mean / std))


def test_energy_distance_matches_closed_form_in_1d():
    mu = 1.0  # N(0, 1) vs N(1, 1): X - Y ~ N(-1, 2), X - X' ~ N(0, 2)
    expected = 2 * _expected_abs_normal(mu, math.sqrt(2)) - 2 * _expected_abs_normal(0.0, math.sqrt(2))
    got = energy_distance(gaussian(2000, 1, 0), gaussian(2000, 1, 1, shift=mu))
    assert got == pytest.approx(expected, abs=0.03)


def test_energy_distance_zero_for_same_distribution_positive_otherwise():
    x, y = gaussian(1200, 2, 2), gaussian(1000, 2, 3)
    same = energy_distance(x, y)
    assert abs(same) < 0.01
    shifted = energy_distance(x, gaussian(1000, 2, 4, shift=0.5))
    assert shifted > 0.1 and shifted > 20 * abs(same)
    scaled = energy_distance(x, 2 * y)  # same mean, different spread
    assert scaled > 0.1
    assert energy_distance(x, y, chunk_size=300) == pytest.approx(same, abs=1e-9)  # chunking is exact
    with pytest.raises(ValueError, match="at least 2"):
        energy_distance(x[:1], y)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, size=5), rng.uniform(0.1, 2, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # Tensors are accepted too; identical Gaussians are at distance 0.
    assert frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(a)), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1)


def test_frechet_distance_non_commuting_covariances():
    # Rotated diagonal covariances: cov2 = R diag(b) R^T. Closed form via the symmetric root.
    rng = np.random.default_rng(1)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = np.diag(rng.uniform(0.5, 2, d)), q @ np.diag(rng.uniform(0.5, 2, d)) @ q.T
    root_a = np.sqrt(a)
    eig = np.linalg.eigvalsh(root_a @ b @ root_a)
    expected = np.trace(a) + np.trace(b) - 2 * np.sqrt(eig).sum()
    assert frechet_distance(np.zeros(d), a, np.zeros(d), b) == pytest.approx(expected, rel=1e-8)
    # 2-D case worked by hand: cov1 = I, cov2 = s I rotated is still s I -> (1 - sqrt(s))^2 per axis.
    assert frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2)) == pytest.approx(2 + 2 * 1)


def test_frechet_distance_singular_covariances_are_handled():
    rng = np.random.default_rng(2)
    low = rng.normal(size=(8, 2))
    c1, c2 = low @ low.T, (low + 0.1) @ (low + 0.1).T  # rank 2 in 8 dimensions
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no LinAlgWarning leaks out
        fd = frechet_distance(np.zeros(8), c1, np.zeros(8), c2)
    assert np.isfinite(fd) and fd >= -1e-8
    assert frechet_distance(np.zeros(8), c1, np.zeros(8), c1) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_validation_and_stats():
    with pytest.raises(ValueError, match="cov2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))
    cov = np.array([[2.0, 0.6], [0.6, 0.5]])
    feats = torch.from_numpy(np.random.default_rng(3).multivariate_normal([1.0, -1.0], cov, size=20000))
    mu, c = gaussian_stats(feats)
    assert mu.dtype == np.float64 and c.shape == (2, 2)
    assert np.allclose(mu, [1, -1], atol=0.03) and np.allclose(c, cov, atol=0.05)
    with pytest.raises(ValueError, match="features"):
        gaussian_stats(torch.zeros(1, 3))


# ---------------------------------------------------------------------------------------------
# Digits classifier FD


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ctm-lab-cache")
    model = digits_classifier(cache_dir=cache)
    return cache, model


def test_digits_classifier_is_accurate_and_cached(classifier_cache):
    cache, model = classifier_cache
    assert model.test_accuracy > 0.95
    blob = torch.load(cache / DIGITS_CLASSIFIER_FILE, weights_only=True)
    assert blob["test_accuracy"] == model.test_accuracy
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temporary file
    again = digits_classifier(cache_dir=cache)  # loaded, not retrained
    assert again.test_accuracy == model.test_accuracy
    test = load_dataset("digits", "test")
    with torch.no_grad():
        assert torch.equal(again(test.x[:50]), model(test.x[:50]))
        measured = (again(test.x).argmax(1) == test.y).float().mean().item()
    assert measured == pytest.approx(model.test_accuracy)


def test_digits_classifier_respects_env_cache(classifier_cache, monkeypatch):
    cache, model = classifier_cache
    monkeypatch.setenv("CTM_LAB_CACHE", str(cache))
    assert digits_classifier().test_accuracy == model.test_accuracy


def test_digits_fd_separates_data_from_noise(classifier_cache):
    _, model = classifier_cache
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    noise = torch.rand(test.x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = digits_fd(train.x, test.x, classifier=model)
    fake = digits_fd(train.x, noise, classifier=model)
    assert 0 <= real < 0.05 * fake
    # Precomputed reference stats give the same number; 16x16 data is read at 8x8.
    ref = gaussian_stats(digits_features(test.x, model))
    assert digits_fd(train.x, ref, classifier=model) == pytest.approx(real, rel=1e-9)
    t16, r16 = load_dataset("digits:16", "train"), load_dataset("digits:16", "test")
    assert digits_fd(t16.x, r16.x, classifier=model) < 0.05 * fake
    with pytest.raises(ValueError, match="8k"):
        digits_fd(torch.zeros(10, 3, 8, 8), test.x, classifier=model)


# ---------------------------------------------------------------------------------------------
# FID plumbing (the real Inception is not available in tests)


class _FakeDetector(nn.Module):
    """Stands in for NVIDIA's TorchScript Inception: uint8 images -> features with return_features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * 4, 6)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)
        return torch.tanh(self.proj(pooled))


@pytest.fixture(scope="module")
def fake_detector_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in new torch
        torch.jit.script(_FakeDetector().eval()).save(str(path))
    return path


def test_fid_missing_weights_names_file_and_fix(tmp_path):
    samples = torch.zeros(4, 3, 8, 8)
    with pytest.raises(MissingWeightsError) as info:
        fid_from_samples(samples, samples, cache_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "pt_inception-2015-12-05-6726825d.pth" in message
    assert "python -m cluster.prefetch --only inception_fid" in message
    with pytest.raises(MissingWeightsError, match="nope.pt"):
        fid_from_samples(samples, samples, inception_path=tmp_path / "nope.pt")


def _random_fid_inception_state(seed: int) -> dict:
    """pytorch-fid's FID Inception structure with random weights (the real file needs the network)."""
    from pytorch_fid import inception as pf

    torch.manual_seed(seed)
    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = pf.FIDInceptionA(192, 32), pf.FIDInceptionA(256, 64), pf.FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = pf.FIDInceptionC(768, 128), pf.FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = pf.FIDInceptionC(768, 160), pf.FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = pf.FIDInceptionE_1(1280), pf.FIDInceptionE_2(2048)
    return net.state_dict()


def test_fid_inception_from_the_cache_file_without_network(tmp_path, monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("FID Inception must not be downloaded at run time"))
    images = (torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    features = []
    for seed in (0, 1):
        cache = tmp_path / f"cache{seed}"
        cache.mkdir()
        torch.save(_random_fid_inception_state(seed), cache / "pt_inception-2015-12-05-6726825d.pth")
        extract = load_inception(cache_dir=cache)
        with torch.no_grad():
            features.append(extract(images))
    assert features[0].shape == (3, 2048) and torch.isfinite(features[0]).all()
    assert not torch.allclose(features[0], features[1])  # the cached file's weights are the ones used
    assert torch.hub.get_dir() != str(tmp_path)  # the hub folder is restored


def test_fid_with_torchscript_detector(fake_detector_path, tmp_path):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(300, 3, 8, 8, generator=g) * 2 - 1
    same = torch.rand(300, 3, 8, 8, generator=g) * 2 - 1
    dark = (torch.rand(300, 3, 8, 8, generator=g) * 2 - 1) * 0.5 - 0.5
    fid_same = fid_from_samples(same, real, inception_path=fake_detector_path, batch_size=64)
    fid_dark = fid_from_samples(dark, real, inception_path=fake_detector_path, batch_size=64)
    assert fid_same < 0.1 * fid_dark
    # Reference stats saved and read back in the 'mu'/'sigma' format give the same number.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        detector = torch.jit.load(str(fake_detector_path))
    to_uint8 = lambda x: (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # noqa: E731
    with torch.no_grad():
        mu, cov = gaussian_stats(detector(to_uint8(real), return_features=True))
        mu_d, cov_d = gaussian_stats(detector(to_uint8(dark), return_features=True))
    save_reference_stats(tmp_path / "ref.npz", mu, cov)
    mu_r, cov_r = load_reference_stats(tmp_path / "ref.npz")
    assert np.allclose(mu_r, mu) and np.allclose(cov_r, cov)
    via_file = fid_from_samples(dark, tmp_path / "ref.npz", inception_path=fake_detector_path)
    assert via_file == pytest.approx(fid_dark, rel=1e-6)
    assert via_file == pytest.approx(frechet_distance(mu_d, cov_d, mu, cov), rel=1e-6)
    # Grey images are repeated to three channels.
    grey = fid_from_samples(real[:, :1], real[:, :1].repeat(1, 3, 1, 1), inception_path=fake_detector_path)
    assert grey == pytest.approx(0, abs=1e-9)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        fid_from_samples(dark, tmp_path / "missing.npz", inception_path=fake_detector_path)


def test_energy_distance_with_precomputed_reference_term():
    from ctm_core.metrics import energy_distance, within_distance
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 2, generator=g), torch.randn(400, 2, generator=g) + 0.5
    assert energy_distance(x, y, y_within=within_distance(y)) == pytest.approx(energy_distance(x, y), rel=1e-12)
    # memoised by content: the same data gives the cached value, other data its own
    assert within_distance(y.clone()) == within_distance(y)
    assert within_distance(y * 2) == pytest.approx(2 * within_distance(y), rel=1e-12)


def test_digits_evaluation_draws_more_samples_than_the_test_split(classifier_cache):
    """eval.num_samples is not capped at the 359 test images: with that few samples the FD's
    sampling bias (~4 here) swamps the differences between students."""
    from ctm_core.config import load_config
    from ctm_core.evaluation import Evaluator

    cache, _ = classifier_cache
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "digits_teacher.yaml",
                         overrides=["eval.num_samples=1400"])
    test, train = load_dataset("digits", "test"), load_dataset("digits", "train")
    evaluator = Evaluator(config, test.x, "image", torch.device("cpu"), cache_dir=str(cache))
    assert evaluator.z.shape == (1400, 1, 8, 8) and test.x.shape[0] < 1400
    score = evaluator._scorer  # the same scorer in-loop evaluation uses
    few, many = score(train.x[:359])["fd_digits"], score(train.x[:1400])["fd_digits"]
    assert 0 < many < 0.7 * few  # real training digits: only the sampling bias is left, and it shrinks
