"""Sample-quality metrics: sliced Wasserstein, energy distance, Frechet distances (digits, FID).

All return Python floats, lower is better, and are pure functions of their tensors (random
projections come from an explicit seed). The digits feature network is a small CNN that the
platform trains once, deterministically, and keeps in the local cache; FID reads the Inception
network from the local cache only (see ctm_core.pretrained).
"""
from __future__ import annotations

import collections
import hashlib
import math
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctm_core.checkpoint import atomic_save
from ctm_core.pretrained import MissingWeightsError, require_file, require_weights, resolve_cache_dir


def _flat64(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample along dim 0, got shape {tuple(x.shape)}")
    return x.detach().reshape(x.shape[0], -1).double()


def _same_dim(x: Tensor, y: Tensor) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same per-sample size, got {x.shape[1]} and {y.shape[1]}")


# ----------------------------------------------------------------------------------------------
# Sample-based distances.


def _wasserstein_1d_sorted(a: Tensor, b: Tensor, p: float) -> Tensor:
    """W_p^p between empirical measures given sorted samples a (n, P), b (m, P): one value per column.

    Exact for unequal n, m: both quantile functions are step functions, so integrate |Qa - Qb|^p
    over the merged breakpoints {i/n} U {j/m}.
    """
    n, m = a.shape[0], b.shape[0]
    if n == m:
        return (a - b).abs().pow(p).mean(0)
    ends = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                      torch.arange(1, m + 1, dtype=torch.float64) / m]).sort().values
    starts = torch.cat([torch.zeros(1, dtype=torch.float64), ends[:-1]])
    widths = (ends - starts).clamp_min(0)
    mids = (starts + ends) / 2
    ia = (mids * n).floor().long().clamp(0, n - 1)
    ib = (mids * m).floor().long().clamp(0, m - 1)
    return (widths[:, None] * (a[ia] - b[ib]).abs().pow(p)).sum(0)


def sliced_wasserstein(x: Tensor, y: Tensor, num_projections: int = 256, p: float = 2, seed: int = 0) -> float:
    """Sliced W_p: (mean over random unit directions theta of W_p^p(theta.x, theta.y))^(1/p).

    Each 1-D W_p is exact (by sorting). x (n, ...) and y (m, ...) are flattened per sample; the
    directions depend only on (seed, dimension), so calls with the same seed are comparable.
    """
    if not (isinstance(num_projections, int) and num_projections >= 1):
        raise ValueError(f"num_projections must be an int >= 1, got {num_projections!r}")
    if not p >= 1:
        raise ValueError(f"p must be >= 1, got {p!r}")
    a, b = _flat64(x, "x"), _flat64(y, "y")
    _same_dim(a, b)
    dim = a.shape[1]
    theta = torch.randn(dim, num_projections, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    theta = theta / theta.norm(dim=0, keepdim=True)
    chunk = max(1, min(num_projections, 2**24 // max(a.shape[0] + b.shape[0], 1)))
    total = torch.zeros((), dtype=torch.float64)
    for lo in range(0, num_projections, chunk):
        t = theta[:, lo:lo + chunk].to(a.device)
        pa, pb = (a @ t).sort(0).values, (b @ t.to(b.device)).sort(0).values.to(a.device)
        total = total + _wasserstein_1d_sorted(pa.cpu(), pb.cpu(), p).sum()
    return float((total / num_projections) ** (1.0 / p))


def _mean_distance(a: Tensor, b: Tensor, exclude_diagonal: bool, chunk: int) -> float:
    total = 0.0
    for lo in range(0, a.shape[0], chunk):
        total += float(torch.cdist(a[lo:lo + chunk], b).sum())
    count = a.shape[0] * (b.shape[0] - 1) if exclude_diagonal else a.shape[0] * b.shape[0]
    return total / count


def energy_distance(x: Tensor, y: Tensor, chunk_size: int = 1024, y_within: float | None = None) -> float:
    """Squared energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (unbiased within-sample terms).

    Zero in expectation when x and y come from one distribution (so it can be slightly negative),
    positive otherwise. Needs at least two samples on each side. `y_within` = E|Y-Y'| of a fixed
    reference, computed once by `within_distance(y)` when y is scored against many times.
    """
    a, b = _flat64(x, "x"), _flat64(y, "y")
    _same_dim(a, b)
    for name, t in (("x", a), ("y", b)):
        if t.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 samples for the energy distance, got {t.shape[0]}")
    between = _mean_distance(a, b, False, chunk_size)
    within_a = _mean_distance(a, a, True, chunk_size)
    within_b = _mean_distance(b, b, True, chunk_size) if y_within is None else y_within
    return 2 * between - within_a - within_b


_WITHIN_MEMO: "collections.OrderedDict[tuple, float]" = collections.OrderedDict()
_WITHIN_MEMO_SIZE = 8


def within_distance(y: Tensor, chunk_size: int = 1024) -> float:
    """E|Y-Y'| over distinct pairs: the reference's own term of the energy distance.

    Memoised by the data's SHA-1 (a pure function of it): a sweep worker scores trial after trial
    against the same held-out set, and the O(n^2) term cost ~0.7 s per trial at n = 5,000.
    """
    b = _flat64(y, "y")
    key = (hashlib.sha1(b.cpu().contiguous().numpy().tobytes()).hexdigest(), tuple(b.shape), chunk_size)
    if key in _WITHIN_MEMO:
        _WITHIN_MEMO.move_to_end(key)
        return _WITHIN_MEMO[key]
    value = _mean_distance(b, b, True, chunk_size)
    _WITHIN_MEMO[key] = value
    while len(_WITHIN_MEMO) > _WITHIN_MEMO_SIZE:
        _WITHIN_MEMO.popitem(last=False)
    return value


# ----------------------------------------------------------------------------------------------
# Frechet distance.


def gaussian_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of features (n, d), float64 numpy like FID reference files."""
    f = np.asarray(features.detach().cpu().double() if isinstance(features, Tensor) else features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (n >= 2, d), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr sqrt(cov1 cov2) through the symmetric form sqrt(cov1) cov2 sqrt(cov1) (exact for PSD inputs)."""
    vals, vecs = np.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    inner = root1 @ cov2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 sqrt(cov1 cov2)) between two Gaussians.

    The matrix root is scipy's sqrtm. Near-singular covariances (few samples, many features) can
    give a non-finite, complex or inaccurate root: a non-finite one is retried with eps added to the
    diagonals, tiny imaginary parts (round-off) are dropped, and a root with a large imaginary part
    or a poor fit (|R R - cov1 cov2| large) gives way to the symmetric eigenvalue form
    tr sqrt(sqrt(cov1) cov2 sqrt(cov1)), which is exact for positive semi-definite covariances.
    """
    from scipy import linalg

    arrays = {}
    for name, value in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
        if isinstance(value, Tensor):
            value = value.detach().cpu().double().numpy()
        arrays[name] = np.atleast_1d(np.asarray(value, dtype=np.float64))
    m1, c1, m2, c2 = arrays["mu1"], arrays["cov1"], arrays["mu2"], arrays["cov2"]
    d = m1.shape[0]
    if m1.ndim != 1 or m2.shape != m1.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got shapes {m1.shape} and {m2.shape}")
    c1, c2 = c1.reshape(d, d) if c1.size == d * d else c1, c2.reshape(d, d) if c2.size == d * d else c2
    for name, c in (("cov1", c1), ("cov2", c2)):
        if c.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match the means, got {c.shape}")
    for name, a in (("mu1", m1), ("cov1", c1), ("mu2", m2), ("cov2", c2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")

    product = c1 @ c2
    with warnings.catch_warnings():  # singular products are expected and handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(product)
        if not np.all(np.isfinite(root)):
            offset = np.eye(d) * eps
            product = (c1 + offset) @ (c2 + offset)
            root = linalg.sqrtm(product)
    trace_root = None
    if np.all(np.isfinite(root)):
        real = root.real
        small_imag = not np.iscomplexobj(root) or np.abs(root.imag).max() <= 1e-3 * max(1.0, np.abs(real).max())
        accurate = np.linalg.norm(real @ real - product) <= 1e-3 * max(1.0, np.linalg.norm(product))
        if small_imag and accurate:
            trace_root = float(np.trace(real))
    if trace_root is None:
        trace_root = _psd_trace_sqrt_product(c1, c2)
    diff = m1 - m2
    return float(diff @ diff + np.trace(c1) + np.trace(c2) - 2 * trace_root)


# ----------------------------------------------------------------------------------------------
# Digits classifier Frechet distance.

DIGITS_CLASSIFIER_FILE = "digits_classifier_v1.pt"
_DIGITS_FORMAT = ("ctm-lab-digits-classifier", 1)


class DigitsClassifier(nn.Module):
    """Small CNN on 8x8 digits; its 128-d penultimate layer is the feature space of fd_digits.

    16x16 inputs (the digits:16 data) are average-pooled to 8x8 first.
    """

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128 * 2 * 2, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)
        self.test_accuracy: float | None = None

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """(n, 1, 8k, 8k) images in [-1, 1] -> (n, 1, 8, 8); out-of-range values are clamped as when saved."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3] or x.shape[2] % 8:
            raise ValueError(f"digits images must have shape (n, 1, 8k, 8k), got {tuple(x.shape)}")
        x = x.float().clamp(-1, 1)
        return F.avg_pool2d(x, x.shape[2] // 8) if x.shape[2] != 8 else x

    def features(self, x: Tensor) -> Tensor:
        return self.body(self.prepare(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _train_digits_classifier(seed: int = 0, epochs: int = 15, batch_size: int = 64) -> DigitsClassifier:
    """Deterministic training on the digits train split; one thread, since this net is too small to
    gain from more and intra-op threads slow it down badly on a busy machine."""
    from ctm_core.data import BatchStream, load_dataset

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    stream = BatchStream(len(train), batch_size, seed)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(steps):
            xb, yb = stream.take(train.x, train.y)
            shift = torch.randint(-1, 2, (2,), generator=g)  # one-pixel jitter per batch against overfitting
            xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            model.test_accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    finally:
        torch.set_num_threads(threads)
    return model


def digits_classifier(cache_dir: str | os.PathLike | None = None, retrain: bool = False) -> DigitsClassifier:
    """The digits feature network in eval mode: loaded from the cache, or trained (seed 0) and saved.

    The cache file (<cache>/digits_classifier_v1.pt) records the test accuracy, available as
    `.test_accuracy`. A file of another format or version is replaced.
    """
    path = resolve_cache_dir(cache_dir) / DIGITS_CLASSIFIER_FILE
    if path.is_file() and not retrain:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if (blob.get("format"), blob.get("version")) == _DIGITS_FORMAT:
                model = DigitsClassifier()
                model.load_state_dict(blob["state_dict"])
                model.test_accuracy = float(blob["test_accuracy"])
                return model.eval()
        except (RuntimeError, KeyError, AttributeError, EOFError, ValueError):
            pass  # unreadable or stale: train anew and replace it
    model = _train_digits_classifier()
    atomic_save({"format": _DIGITS_FORMAT[0], "version": _DIGITS_FORMAT[1], "seed": 0,
                        "state_dict": model.state_dict(), "test_accuracy": model.test_accuracy}, path)
    return model


@torch.no_grad()
def digits_features(images: Tensor, classifier: DigitsClassifier, batch_size: int = 1024) -> Tensor:
    """Penultimate-layer features (n, 128) of digits images (n, 1, 8k, 8k)."""
    classifier.eval()
    device = next(classifier.parameters()).device
    out = [classifier.features(images[i:i + batch_size].to(device)).double().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def digits_fd(samples: Tensor, reference: Tensor | tuple[np.ndarray, np.ndarray],
              classifier: DigitsClassifier | None = None, cache_dir: str | os.PathLike | None = None) -> float:
    """Frechet distance between digits samples and a reference (images, or their (mu, cov) stats)
    in the classifier's feature space. Use a few hundred samples or more (features are 128-d)."""
    classifier = classifier if classifier is not None else digits_classifier(cache_dir)
    mu1, cov1 = gaussian_stats(digits_features(samples, classifier))
    if isinstance(reference, Tensor):
        mu2, cov2 = gaussian_stats(digits_features(reference, classifier))
    else:
        mu2, cov2 = reference
    return frechet_distance(mu1, cov1, mu2, cov2)


# ----------------------------------------------------------------------------------------------
# FID.

INCEPTION_WEIGHTS = "inception_fid"


class FIDBackendError(RuntimeError):
    """The Inception weights are present but this environment cannot build the network for them."""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_inception(inception_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   device: str | torch.device | None = None) -> Callable[[Tensor], Tensor]:
    """A feature extractor uint8 images (n, 3, h, w) -> pool features (n, 2048), from local files only.

    Accepted: a TorchScript detector with NVIDIA's interface `net(images, return_features=True)`
    (the inception-2015-12-05.pt used by StyleGAN2-ADA and EDM), given as inception_path, or the
    cache's default entry `inception_fid`: pytorch-fid's state dict, built with that package.
    """
    if inception_path is not None:
        path = require_file(inception_path, INCEPTION_WEIGHTS)
    else:
        path = require_weights(INCEPTION_WEIGHTS, cache_dir)
    if _is_torchscript(path):
        with warnings.catch_warnings():  # TorchScript is deprecated in recent torch but still loads
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location=device or "cpu").eval()

        def extract(images: Tensor) -> Tensor:
            return net(images, return_features=True)

        return extract
    return _pytorch_fid_extractor(path, device)


def _pytorch_fid_extractor(path: Path, device: str | torch.device | None) -> Callable[[Tensor], Tensor]:
    """pytorch-fid's FID Inception (the TF 2015-12-05 graph's port) with weights from `path`.

    pytorch-fid fetches its weights through torch.hub; pointing the hub at a folder that holds only
    our cached file makes it load that file and never touch the network.
    """
    import tempfile

    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    except ImportError as err:
        raise FIDBackendError(f"{path} is a pytorch-fid state dict, which needs the pytorch-fid package "
                              "(pip install pytorch-fid); or pass inception_path= to NVIDIA's TorchScript "
                              "inception-2015-12-05.pt") from err
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        (Path(hub) / "checkpoints").mkdir()
        (Path(hub) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[-1]).symlink_to(Path(path).resolve())
        torch.hub.set_dir(hub)
        try:
            net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True,
                              use_fid_inception=True)
        finally:
            torch.hub.set_dir(previous)
    net = net.eval().to(device or "cpu")

    def extract(images: Tensor) -> Tensor:
        return net(images.float() / 255.0)[0].flatten(1)

    return extract


def to_uint8_images(samples: Tensor) -> Tensor:
    """[-1, 1] images (n, c, h, w) -> uint8 (n, 3, h, w) as they would be saved (grey repeated)."""
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"samples must be images (n, 1 or 3, h, w), got shape {tuple(samples.shape)}")
    x = (samples.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_stats(images: Tensor, extractor: Callable[[Tensor], Tensor], batch_size: int = 100,
                    device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, cov) of the extractor's features over [-1, 1] images."""
    feats = []
    for lo in range(0, images.shape[0], batch_size):
        batch = to_uint8_images(images[lo:lo + batch_size])
        feats.append(extractor(batch.to(device) if device is not None else batch).double().cpu())
    return gaussian_stats(torch.cat(feats))


def load_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, cov) from an .npz with keys 'mu' and 'sigma' (the EDM / pytorch-fid reference format)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"FID reference statistics {str(p)!r} do not exist")
    with np.load(p) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"FID reference statistics {str(p)!r} must hold arrays 'mu' and 'sigma', has {list(z)}")
        return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)


def save_reference_stats(path: str | os.PathLike, mu: np.ndarray, cov: np.ndarray) -> None:
    """Write (mu, cov) as 'mu'/'sigma' (atomic)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".npz", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=cov)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fid_from_samples(samples: Tensor, reference: str | os.PathLike | Tensor,
                     inception_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                     extractor: Callable[[Tensor], Tensor] | None = None, batch_size: int = 100,
                     device: str | torch.device | None = None) -> float:
    """FID of [-1, 1] samples against reference stats (.npz path) or reference images.

    The network comes from load_inception (local files only; MissingWeightsError when absent)
    unless an extractor is given. Comparable to published numbers only with 50k samples.
    """
    if extractor is None:
        extractor = load_inception(inception_path, cache_dir, device)
    mu1, cov1 = inception_stats(samples, extractor, batch_size, device)
    if isinstance(reference, Tensor):
        mu2, cov2 = inception_stats(reference, extractor, batch_size, device)
    else:
        mu2, cov2 = load_reference_stats(reference)
    return frechet_distance(mu1, cov1, mu2, cov2)


__all__ = [
    "sliced_wasserstein", "energy_distance", "gaussian_stats", "frechet_distance",
    "DigitsClassifier", "digits_classifier", "digits_features", "digits_fd",
    "MissingWeightsError", "FIDBackendError", "load_inception", "to_uint8_images", "inception_stats",
    "load_reference_stats", "save_reference_stats", "fid_from_samples",
]
