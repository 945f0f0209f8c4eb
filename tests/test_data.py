"""Tests for ctm_core.data: spec parsing, datasets, splits, malformed inputs, the batch stream."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctm_core.data import (TOY_NAMES, BatchStream, DataSpecError, GaussianMixtureParams, load_dataset,
                           parse_data_spec, toy_mixture)
from ctm_core.gmm import GaussianMixture

# ---------------------------------------------------------------------------------------------
# Spec parsing


@pytest.mark.parametrize("spec, kind, target, options", [
    ("toy:gmm1d", "toy", "gmm1d", {"n": 10000, "n_test": 10000, "scale": 1.0}),
    ("toy:moons?n=100&n_test=50&scale=2", "toy", "moons", {"n": 100, "n_test": 50, "scale": 2.0}),
    ("digits", "digits", "8", {"test_frac": 0.2}),
    ("digits:16?test_frac=0.5", "digits", "16", {"test_frac": 0.5}),
    ("npy:/data/x.npz", "npy", "/data/x.npz", {"test_frac": 0.1}),
    ("npy:rel/x.NPY?test_frac=0.25", "npy", "rel/x.NPY", {"test_frac": 0.25}),
    ("cifar10:/data/cifar", "cifar10", "/data/cifar", {}),
    ("folder:/imgs?res=32&channels=1", "folder", "/imgs", {"res": 32, "channels": 1, "test_frac": 0.1}),
] + [(f"toy:{name}", "toy", name, {"n": 10000, "n_test": 10000, "scale": 1.0}) for name in TOY_NAMES])
def test_valid_specs_parse(spec, kind, target, options):
    parsed = parse_data_spec(spec)
    assert (parsed.kind, parsed.target) == (kind, target)
    assert dict(parsed.options) == options
    assert str(parsed) == spec
    assert parse_data_spec(parsed) is parsed
    hash(parsed)  # usable as a cache key


@pytest.mark.parametrize("spec, fragment", [
    ("mnist", "unknown kind"),
    ("toy:", "unknown toy"),
    ("toy:gmm3d", "unknown toy"),
    ("digits:32", "8 or 16"),
    ("npy:", "needs"),
    ("npy:/data/x.csv", ".npy or .npz"),
    ("cifar10:", "needs"),
    ("folder:", "needs"),
    ("toy:moons?n=0", "positive integer"),
    ("toy:moons?n=ten", "positive integer"),
    ("toy:moons?scale=-1", "positive number"),
    ("toy:moons?bogus=1", "unknown option"),
    ("toy:moons?n", "name=value"),
    ("digits?test_frac=1.5", "(0, 1)"),
    ("cifar10:/x?res=32", "unknown option"),
    ("folder:/x?channels=2", "1 or 3"),
])
def test_invalid_specs_name_the_spec(spec, fragment):
    with pytest.raises(DataSpecError) as info:
        parse_data_spec(spec)
    assert spec in str(info.value)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_empty_or_non_string_spec(bad):
    with pytest.raises(DataSpecError, match="data spec"):
        parse_data_spec(bad)


def test_load_dataset_validates_split_and_seed():
    with pytest.raises(ValueError, match="split"):
        load_dataset("toy:moons?n=10", split="val")
    with pytest.raises(ValueError, match="seed"):
        load_dataset("toy:moons?n=10", seed=1.5)


# ---------------------------------------------------------------------------------------------
# Toys


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_shapes_scale_and_seeding(name):
    spec = f"toy:{name}?n=4000&n_test=3000"
    train = load_dataset(spec, "train", seed=0)
    test = load_dataset(spec, "test", seed=0)
    dim = 1 if name == "gmm1d" else 2
    assert train.x.shape == (4000, dim) and test.x.shape == (3000, dim)
    assert train.x.dtype == torch.float32 and train.kind == "vector" and train.data_shape == (dim,)
    assert torch.isfinite(train.x).all()
    if name != "gmm1d":  # the others are scaled to sigma_data-like size
        rms = train.x.pow(2).mean().sqrt().item()
        assert 0.35 < rms < 0.65, rms
        assert train.x.mean(0).abs().max() < 0.1
    # Deterministic per (seed, split); an independent sample otherwise.
    assert torch.equal(train.x, load_dataset(spec, "train", seed=0).x)
    assert not torch.equal(train.x[:3000], test.x)
    assert not torch.equal(train.x, load_dataset(spec, "train", seed=1).x)
    if train.y is not None:
        assert train.y.dtype == torch.int64 and train.y.shape == (4000,)
        assert train.num_classes == int(train.y.max()) + 1
        assert set(train.y.unique().tolist()) == set(range(train.num_classes))
    else:
        assert train.num_classes == 0


def test_gmm1d_is_the_unofficial_toy_task_distribution():
    mix = toy_mixture("gmm1d")
    assert mix.weights == (0.5, 0.5) and mix.means == ((-1.5,), (1.5,)) and mix.stds == (0.3, 0.3)
    d = load_dataset("toy:gmm1d?n=20000")
    assert d.mixture == mix
    x = d.x.flatten().double()
    assert abs(x.mean()) < 0.05
    assert abs(x.var() - (1.5**2 + 0.3**2)) < 0.05
    # The component labels say which mode produced each point.
    left = x[d.y == 0]
    assert abs(left.mean() + 1.5) < 0.02 and abs(left.std() - 0.3) < 0.02


@pytest.mark.parametrize("name, k", [("gmm1d", 2), ("gmm2d_8", 8), ("gmm2d_25", 25)])
def test_gmm_toys_expose_exact_mixture(name, k):
    d = load_dataset(f"toy:{name}?n=20000&scale=2")
    mix = d.mixture
    assert isinstance(mix, GaussianMixture) and GaussianMixtureParams is GaussianMixture
    w, m, s = (torch.tensor(v, dtype=torch.float64) for v in (mix.weights, mix.means, mix.stds))
    assert w.shape == (k,) and m.shape == (k, d.x.shape[1]) and s.shape == (k,)
    assert torch.allclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    base = toy_mixture(name)
    assert torch.allclose(m, 2 * torch.tensor(base.means, dtype=torch.float64))  # scale option
    # Moments of the data match the mixture's.
    x = d.x.double()
    mean = (w[:, None] * m).sum(0)
    second = (w[:, None] * (m**2 + s[:, None] ** 2)).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.05)
    assert torch.allclose(x.var(0), second - mean**2, rtol=0.05)
    # Every point sits near the mean of its component.
    dist = (x - m[d.y]).norm(dim=1) / s[d.y]
    assert dist.mean() < math.sqrt(x.shape[1]) * 1.2
    # The closed-form denoiser at tiny noise is (nearly) the identity on data points.
    assert torch.allclose(mix.denoiser(d.x[:100].double(), 1e-4), d.x[:100].double(), atol=1e-3)
    assert load_dataset("toy:moons?n=10").mixture is None


# ---------------------------------------------------------------------------------------------
# Digits


def test_digits_split_shapes_range_labels():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) < 10
    for d in (train, test):
        assert d.x.shape[1:] == (1, 8, 8) and d.kind == "image" and d.num_classes == 10
        assert d.x.min() >= -1 and d.x.max() <= 1 and d.x.min() == -1 and d.x.max() == 1
        assert d.y.dtype == torch.int64 and set(d.y.tolist()) == set(range(10))
    # Stratified: every class is represented in proportion.
    counts = test.y.bincount(minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    # Disjoint: no test image is also a train image with the same label... checked by rows.
    joined = torch.cat([train.x, test.x]).reshape(1797, -1)
    assert torch.unique(joined, dim=0).shape[0] >= 1797 - 5  # the raw set has a few exact duplicates
    # The split is fixed, whatever the seed.
    assert torch.equal(load_dataset("digits", "test", seed=3).x, test.x)


def test_digits16_is_the_upsampled_set():
    d8, d16 = load_dataset("digits", "test"), load_dataset("digits:16", "test")
    assert d16.x.shape == (len(d8), 1, 16, 16) and d16.data_shape == (1, 16, 16)
    assert torch.equal(d16.y, d8.y)
    assert d16.x.min() >= -1 and d16.x.max() <= 1
    upsampled = torch.nn.functional.interpolate(d8.x, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(d16.x, upsampled)


# ---------------------------------------------------------------------------------------------
# npy / npz


def test_npy_vectors_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "v.npy", x)
    train = load_dataset(f"npy:{tmp_path / 'v.npy'}", "train")
    test = load_dataset(f"npy:{tmp_path / 'v.npy'}", "test")
    assert train.x.dtype == torch.float32 and train.kind == "vector" and train.y is None and train.num_classes == 0
    assert len(train) == 45 and len(test) == 5
    rows = {tuple(r) for r in np.round(np.concatenate([train.x.numpy(), test.x.numpy()]), 5)}
    assert rows == {tuple(r) for r in np.round(x.astype(np.float32), 5)}
    assert torch.equal(load_dataset(f"npy:{tmp_path / 'v.npy'}", "test", seed=9).x, test.x)


def test_npz_images_with_labels_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(40, 3, 4, 4), dtype=np.uint8)
    y = np.arange(40) % 4
    np.savez(tmp_path / "im.npz", x=x, y=y)
    spec = f"npy:{tmp_path / 'im.npz'}?test_frac=0.25"
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    assert train.kind == "image" and train.data_shape == (3, 4, 4) and len(test) == 10
    assert train.num_classes == 4 and train.y.dtype == torch.int64
    xs = torch.cat([train.x, test.x])
    assert xs.min() >= -1 and xs.max() <= 1
    # Each row keeps its label: the label is recoverable from the pixels.
    lookup = {tuple(np.round(xi.flatten() / 127.5 - 1, 4)): yi for xi, yi in zip(x.astype(np.float32), y)}
    for xi, yi in zip(train.x, train.y):
        assert lookup[tuple(np.round(xi.flatten().numpy(), 4))] == yi
    # A single unnamed array also works; float images in [-1, 1] are kept as they are.
    f = rng.uniform(-1, 1, size=(10, 1, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "one.npz", f)
    d = load_dataset(f"npy:{tmp_path / 'one.npz'}?test_frac=0.5", "test")
    assert d.x.shape == (5, 1, 2, 2) and d.y is None


@pytest.mark.parametrize("array, fragment", [
    (np.zeros((4, 2, 2)), "ndim 3"),
    (np.zeros((0, 3)), "empty"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN/inf"),
    (np.array([["a", "b"], ["c", "d"]]), "not numeric"),
    (np.full((3, 1, 2, 2), 5.0), "[-1, 1]"),
    (np.zeros((3, 8, 8, 3)), "channels-last"),
])
def test_malformed_arrays_name_the_path(tmp_path, array, fragment):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError) as info:
        load_dataset(f"npy:{path}")
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_malformed_npz_and_labels(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 2)), b=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="'x'") as info:
        load_dataset(f"npy:{tmp_path / 'two.npz'}")
    assert str(tmp_path / "two.npz") in str(info.value)
    np.savez(tmp_path / "lab.npz", x=np.zeros((3, 2)), y=np.zeros(4))
    with pytest.raises(ValueError, match=r"labels 'y' have shape \(4,\)"):
        load_dataset(f"npy:{tmp_path / 'lab.npz'}")
    np.savez(tmp_path / "neg.npz", x=np.zeros((3, 2)), y=np.array([0, -1, 2]))
    with pytest.raises(ValueError, match=">= 0"):
        load_dataset(f"npy:{tmp_path / 'neg.npz'}")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="junk.npy"):
        load_dataset(f"npy:{tmp_path / 'junk.npy'}")
    np.save(tmp_path / "tiny.npy", np.zeros((1, 2)))
    with pytest.raises(ValueError, match="empty train split|empty test split"):
        load_dataset(f"npy:{tmp_path / 'tiny.npy'}")


def test_missing_files_are_file_not_found(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_dataset(f"npy:{missing}")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as info:
        load_dataset(f"cifar10:{tmp_path / 'cifar'}")
    assert str(tmp_path / "cifar") in str(info.value)
    with pytest.raises(FileNotFoundError, match="imgs"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")


# ---------------------------------------------------------------------------------------------
# Image folders


def _write_png(path, size, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_with_classes_resized(tmp_path):
    for i in range(10):
        _write_png(tmp_path / "cats" / f"{i}.png", (12, 10), (255, 0, 0))
        _write_png(tmp_path / "dogs" / f"{i}.jpg", (20, 20), (0, 0, 255))
    (tmp_path / "cats" / "notes.txt").write_text("ignored")
    spec = f"folder:{tmp_path}?res=8&test_frac=0.2"
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    assert train.x.shape == (16, 3, 8, 8) and test.x.shape == (4, 3, 8, 8)
    assert train.class_names == ("cats", "dogs") and train.num_classes == 2
    assert test.y.bincount().tolist() == [2, 2]  # stratified
    cats = torch.cat([train.x[train.y == 0], test.x[test.y == 0]])
    assert torch.allclose(cats[:, 0], torch.ones_like(cats[:, 0]), atol=0.02)  # red -> +1 in channel 0
    assert torch.allclose(cats[:, 2], -torch.ones_like(cats[:, 2]), atol=0.02)
    grey = load_dataset(f"folder:{tmp_path}?res=4&channels=1", "train")
    assert grey.data_shape == (1, 4, 4)


def test_folder_flat_and_errors(tmp_path):
    flat = tmp_path / "flat"
    for i in range(5):
        _write_png(flat / f"{i}.png", (6, 6), (i * 50, 0, 0))
    d = load_dataset(f"folder:{flat}?test_frac=0.2", "test")
    assert d.x.shape == (1, 3, 6, 6) and d.y is None and d.num_classes == 0
    _write_png(flat / "big.png", (9, 9), (0, 0, 0))
    with pytest.raises(ValueError, match=r"\?res=N"):
        load_dataset(f"folder:{flat}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    _write_png(flat / "sub" / "x.png", (6, 6), (0, 0, 0))
    with pytest.raises(ValueError, match="mixes"):
        load_dataset(f"folder:{flat}?res=6")


# ---------------------------------------------------------------------------------------------
# BatchStream


def _draw(stream, k):
    return [next(stream) for _ in range(k)]


def test_stream_is_deterministic_and_covers_each_epoch():
    a, b = BatchStream(100, 10, seed=5), BatchStream(100, 10, seed=5)
    batches_a, batches_b = _draw(a, 25), _draw(b, 25)
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    assert all(x.dtype == torch.int64 and x.shape == (10,) for x in batches_a)
    for epoch in range(2):  # each run of 10 batches is a permutation
        ids = torch.cat(batches_a[10 * epoch:10 * epoch + 10]).sort().values
        assert torch.equal(ids, torch.arange(100))
    assert not torch.equal(torch.cat(batches_a[:10]), torch.cat(batches_a[10:20]))  # fresh order per epoch
    other = _draw(BatchStream(100, 10, seed=6), 1)[0]
    assert not torch.equal(other, batches_a[0])
    assert a.state_dict()["epoch"] == 2 and a.state_dict()["offset"] == 50


@pytest.mark.parametrize("k", [0, 1, 3, 7, 12])
def test_stream_resumes_exactly(k):
    # 37 examples, batch 8: batches straddle epoch boundaries.
    reference = BatchStream(37, 8, seed=1)
    _draw(reference, k)
    state = reference.state_dict()
    expected = _draw(reference, 10)
    resumed = BatchStream(37, 8, seed=1)
    resumed.load_state_dict(dict(state))
    got = _draw(resumed, 10)
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert resumed.batches_drawn == k + 10


def test_stream_batches_straddle_epochs_without_dropping():
    stream = BatchStream(10, 4, seed=0)
    flat = torch.cat(_draw(stream, 5))  # 20 items = exactly two epochs
    assert torch.equal(flat[:10].sort().values, torch.arange(10))
    assert torch.equal(flat[10:].sort().values, torch.arange(10))
    big = next(BatchStream(3, 7, seed=0))  # a batch larger than the dataset spans epochs too
    assert big.shape == (7,) and torch.equal(big[:3].sort().values, torch.arange(3))


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_shards_union_is_the_global_batch(world_size):
    single = BatchStream(50, 12, seed=3)
    ranks = [BatchStream(50, 12, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(9):
        global_batch = next(single)
        shards = [next(s) for s in ranks]
        assert all(s.shape == (12 // world_size,) for s in shards)
        assert torch.equal(torch.cat(shards), global_batch)
    # A resumed job may use another world size and still continue the same global stream.
    state = single.state_dict()
    expected = next(single)
    halves = [BatchStream(50, 12, seed=3, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert torch.equal(torch.cat([next(h) for h in halves]), expected)


def test_stream_hflip_is_seeded_resumable_and_applied():
    x = torch.arange(20 * 1 * 2 * 3, dtype=torch.float32).reshape(20, 1, 2, 3)
    y = torch.arange(20)
    stream = BatchStream(20, 8, seed=2, hflip=True)
    for _ in range(3):
        state = stream.state_dict()
        twin = BatchStream(20, 8, seed=2, hflip=True)
        twin.load_state_dict(state)
        idx, flips = twin.next_with_flips()
        xb, yb = stream.take(x, y)
        assert torch.equal(yb, idx)
        for i in range(8):
            source = x[idx[i]]
            assert torch.equal(xb[i], source.flip(-1) if flips[i] else source)
    many = torch.cat([BatchStream(1000, 1000, seed=0, hflip=True).next_with_flips()[1].float()])
    assert 0.4 < many.mean() < 0.6
    assert BatchStream(20, 8, seed=2).next_with_flips()[1] is None
    with pytest.raises(ValueError, match="hflip needs images"):
        BatchStream(20, 8, seed=2, hflip=True).take(torch.zeros(20, 3))


def test_stream_validation():
    with pytest.raises(ValueError, match="divisible"):
        BatchStream(10, 6, seed=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        BatchStream(10, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="dataset_size"):
        BatchStream(0, 4, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(10, 0, seed=0)
    with pytest.raises(ValueError, match="dataset_size"):
        BatchStream(10, 4, seed=0).take(torch.zeros(11, 2))
    state = BatchStream(10, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        BatchStream(10, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(10, 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        BatchStream(10, 4, seed=0).load_state_dict({"epoch": 0})
