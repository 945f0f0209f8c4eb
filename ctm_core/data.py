"""Datasets chosen by a spec string, and a resumable batch stream; nothing is downloaded at run time.

Spec grammar: ``<kind>[:<target>][?key=value&key=value...]``

    toy:<name>          gmm1d, gmm2d_8, gmm2d_25, moons, swissroll, checkerboard, rings
                        options n (train size, 10000), n_test (10000), scale (1.0)
    digits[:8|:16]      scikit-learn's bundled 8x8 digits, optionally upsampled to 16x16
                        option test_frac (0.2)
    npy:<path>          .npy, or .npz with key 'x' (or its only array) and optional 'y'
                        option test_frac (0.1)
    cifar10:<root>      torchvision's CIFAR10 layout under root (download=False)
    folder:<path>       image files, or one sub-folder of images per class
                        options res (resize to res x res), channels (3), test_frac (0.1)

Images come out as float32 (n, c, h, w) in [-1, 1] and vectors as (n, d), the project's data
convention. The toys are scaled to about unit size (per-coordinate std near sigma_data = 0.5),
except gmm1d, which is exactly the distribution of the unofficial 1-D CTM toy task (two equal
Gaussians at -1.5 and 1.5 with std 0.3; `?scale=` rescales it).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ctm_core.gmm import GaussianMixture

# The mixture parameters of a GMM toy (weights (K,), means (K, D), per-component isotropic stds (K,))
# are the lead's GaussianMixture, which also provides the closed-form denoiser and flow.
GaussianMixtureParams = GaussianMixture

TOY_NAMES = ("gmm1d", "gmm2d_8", "gmm2d_25", "moons", "swissroll", "checkerboard", "rings")
DATA_KINDS = ("toy", "digits", "npy", "cifar10", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "test")


class DataSpecError(ValueError):
    """A data spec string that cannot be parsed; the message names the spec."""


# ----------------------------------------------------------------------------------------------
# Spec parsing.

# Per kind: option name -> (parser, default, description of valid values).
def _positive_int(v: str) -> int:
    out = int(v)
    if out <= 0:
        raise ValueError
    return out


def _positive_float(v: str) -> float:
    out = float(v)
    if not (out > 0 and math.isfinite(out)):
        raise ValueError
    return out


def _open_fraction(v: str) -> float:
    out = float(v)
    if not 0 < out < 1:
        raise ValueError
    return out


def _channels(v: str) -> int:
    out = int(v)
    if out not in (1, 3):
        raise ValueError
    return out


_OPTIONS: dict[str, dict[str, tuple[Any, Any, str]]] = {
    "toy": {
        "n": (_positive_int, 10000, "a positive integer"),
        "n_test": (_positive_int, 10000, "a positive integer"),
        "scale": (_positive_float, 1.0, "a positive number"),
    },
    "digits": {"test_frac": (_open_fraction, 0.2, "a number in (0, 1)")},
    "npy": {"test_frac": (_open_fraction, 0.1, "a number in (0, 1)")},
    "cifar10": {},
    "folder": {
        "res": (_positive_int, None, "a positive integer"),
        "channels": (_channels, 3, "1 or 3"),
        "test_frac": (_open_fraction, 0.1, "a number in (0, 1)"),
    },
}


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: kind, target (toy name, digits resolution, path or root), options.

    `options` holds every option of the kind, defaults filled in, as sorted (name, value) pairs so
    the spec stays hashable.
    """

    kind: str
    target: str
    options: tuple[tuple[str, Any], ...] = ()
    text: str = ""

    def option(self, name: str) -> Any:
        for key, value in self.options:
            if key == name:
                return value
        raise KeyError(f"data spec {self.text!r} has no option {name!r}")

    def __str__(self) -> str:
        return self.text


def parse_data_spec(spec: str | DataSpec) -> DataSpec:
    """Parse and validate a spec string (see the module docstring); DataSpecError names the spec."""
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise DataSpecError(f"data spec must be a non-empty string like 'toy:gmm2d_8', got {spec!r}")
    text = spec.strip()
    head, _, query = text.partition("?")
    kind, sep, target = head.partition(":")
    kind = kind.strip().lower()
    target = target.strip()
    if kind not in DATA_KINDS:
        raise DataSpecError(f"data spec {text!r}: unknown kind {kind!r}; known kinds: {', '.join(DATA_KINDS)}")

    if kind == "toy":
        if target not in TOY_NAMES:
            raise DataSpecError(f"data spec {text!r}: unknown toy {target!r}; known toys: {', '.join(TOY_NAMES)}")
    elif kind == "digits":
        if target not in ("", "8", "16"):
            raise DataSpecError(f"data spec {text!r}: digits resolution must be 8 or 16, got {target!r}")
        target = target or "8"
    elif not target:
        what = {"npy": "a .npy/.npz path", "cifar10": "the CIFAR-10 root folder", "folder": "an image folder"}[kind]
        raise DataSpecError(f"data spec {text!r}: kind {kind!r} needs {what} after the colon, e.g. '{kind}:/data/x'")
    elif kind == "npy" and Path(target).suffix.lower() not in (".npy", ".npz"):
        raise DataSpecError(f"data spec {text!r}: npy path {target!r} must end in .npy or .npz")

    schema = _OPTIONS[kind]
    values = {name: default for name, (_, default, _) in schema.items()}
    if query:
        for item in query.split("&"):
            name, eq, raw = item.partition("=")
            name = name.strip()
            if not eq or not name:
                raise DataSpecError(f"data spec {text!r}: option {item!r} must look like name=value")
            if name not in schema:
                known = ", ".join(schema) or "none"
                raise DataSpecError(f"data spec {text!r}: unknown option {name!r} for kind {kind!r}; known: {known}")
            parser, _, valid = schema[name]
            try:
                values[name] = parser(raw.strip())
            except ValueError:
                raise DataSpecError(f"data spec {text!r}: option {name}={raw!r} must be {valid}") from None
    return DataSpec(kind=kind, target=target, options=tuple(sorted(values.items())), text=text)


# ----------------------------------------------------------------------------------------------
# The dataset object.


@dataclass
class Dataset:
    """One split held in memory: x float32 (n, *data_shape); y int64 (n,) or None.

    num_classes is 0 when there are no labels (the networks' convention for unconditional).
    For Gaussian-mixture toys, `mixture` is the exact distribution the points were drawn from.
    """

    x: Tensor
    y: Tensor | None
    kind: str  # "vector" | "image"
    spec: str
    split: str
    num_classes: int = 0
    mixture: GaussianMixture | None = None
    class_names: tuple[str, ...] | None = None

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_dataset(spec: str | DataSpec, split: str = "train", seed: int = 0) -> Dataset:
    """Load split 'train' or 'test' of the dataset a spec names.

    Toys draw a fresh sample per (seed, split), so the test split is an independent sample of the
    same distribution. Fixed datasets (digits, npy, folder) split deterministically, independent of
    seed, so every run of a sweep evaluates against the same held-out points; CIFAR-10 uses its own
    train/test files.
    """
    parsed = parse_data_spec(spec)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    loader = {"toy": _load_toy, "digits": _load_digits, "npy": _load_npy, "cifar10": _load_cifar10,
              "folder": _load_folder}[parsed.kind]
    return loader(parsed, split, int(seed))


def derived_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (same on every machine and Python run)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


# ----------------------------------------------------------------------------------------------
# Toys.


def toy_mixture(name: str, scale: float = 1.0) -> GaussianMixture | None:
    """The mixture parameters of a Gaussian-mixture toy, or None for the other toys."""
    if name == "gmm1d":  # the unofficial toy task's two_gmm_1D
        weights, means, stds = [0.5, 0.5], [[-1.5], [1.5]], [0.3, 0.3]
    elif name == "gmm2d_8":  # radius 0.7: per-coordinate std ~0.5
        angles = [2 * math.pi * k / 8 for k in range(8)]
        weights, means, stds = [1 / 8] * 8, [[0.7 * math.cos(a), 0.7 * math.sin(a)] for a in angles], [0.05] * 8
    elif name == "gmm2d_25":  # spacing 0.35: per-coordinate std ~0.5
        grid = [-0.7, -0.35, 0.0, 0.35, 0.7]
        weights, means, stds = [1 / 25] * 25, [[a, b] for a in grid for b in grid], [0.05] * 25
    else:
        return None
    return GaussianMixture(weights=tuple(weights),
                           means=tuple(tuple(float(v) * scale for v in m) for m in means),
                           stds=tuple(float(s) * scale for s in stds))


def _sample_mixture(mix: GaussianMixture, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    w = torch.tensor(mix.weights, dtype=torch.float64)
    m = torch.tensor(mix.means, dtype=torch.float64)
    s = torch.tensor(mix.stds, dtype=torch.float64)
    k = torch.multinomial(w, n, replacement=True, generator=g)
    x = m[k] + s[k, None] * torch.randn(n, m.shape[1], dtype=torch.float64, generator=g)
    return x, k


def _sample_moons(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    label = torch.randint(0, 2, (n,), generator=g)
    angle = math.pi * torch.rand(n, dtype=torch.float64, generator=g)
    upper = torch.stack([angle.cos(), angle.sin()], 1)
    lower = torch.stack([1 - angle.cos(), 0.5 - angle.sin()], 1)
    x = torch.where(label[:, None] == 0, upper, lower)
    x = x + 0.05 * torch.randn(n, 2, dtype=torch.float64, generator=g)
    return (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 0.6, label


def _sample_swissroll(n: int, g: torch.Generator) -> tuple[Tensor, None]:
    turn = 1.5 * math.pi * (1 + 2 * torch.rand(n, dtype=torch.float64, generator=g))
    x = torch.stack([turn * turn.cos(), turn * turn.sin()], 1)
    x = x + 0.3 * torch.randn(n, 2, dtype=torch.float64, generator=g)
    centre = torch.tensor([2.0, 2.0 / (3 * math.pi)], dtype=torch.float64)  # E[t cos t], E[t sin t]
    return (x - centre) * 0.07, None


def _sample_checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, None]:
    # 4 x 4 board on [-2, 2]^2; a point is uniform in a cell whose (row + column) is even.
    col = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + (col % 2)
    cell = torch.stack([col, row], 1).double() - 2
    x = cell + torch.rand(n, 2, dtype=torch.float64, generator=g)
    return x * (0.5 / math.sqrt(4 / 3)), None


def _sample_rings(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    ring = torch.randint(0, 4, (n,), generator=g)
    radius = 0.25 * (ring + 1).double()
    angle = 2 * math.pi * torch.rand(n, dtype=torch.float64, generator=g)
    x = radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
    return x + 0.02 * torch.randn(n, 2, dtype=torch.float64, generator=g), ring


_TOY_SAMPLERS = {"moons": (_sample_moons, 2), "swissroll": (_sample_swissroll, 0),
                 "checkerboard": (_sample_checkerboard, 0), "rings": (_sample_rings, 4)}


def _load_toy(spec: DataSpec, split: str, seed: int) -> Dataset:
    name, scale = spec.target, spec.option("scale")
    n = spec.option("n") if split == "train" else spec.option("n_test")
    g = _generator("toy", name, split, seed)
    mix = toy_mixture(name, scale)
    if mix is not None:
        x, y = _sample_mixture(mix, n, g)
        num_classes = len(mix.weights)
    else:
        sampler, num_classes = _TOY_SAMPLERS[name]
        x, y = sampler(n, g)
        x = x * scale
    return Dataset(x=x.float().contiguous(), y=None if y is None else y.long(), kind="vector", spec=spec.text,
                   split=split, num_classes=num_classes, mixture=mix)


# ----------------------------------------------------------------------------------------------
# Fixed datasets: deterministic splits.


def _split_indices(n: int, test_frac: float, source: str, labels: Tensor | None = None) -> dict[str, Tensor]:
    """Deterministic train/test indices (sorted), stratified by label when labels are given."""
    g = _generator("split", source)
    groups = [torch.arange(n)] if labels is None else [torch.nonzero(labels == c).flatten()
                                                       for c in torch.unique(labels)]
    test = []
    for members in groups:
        perm = members[torch.randperm(len(members), generator=g)]
        test.append(perm[: int(round(test_frac * len(members)))])
    is_test = torch.zeros(n, dtype=torch.bool)
    is_test[torch.cat(test)] = True
    return {"train": torch.nonzero(~is_test).flatten(), "test": torch.nonzero(is_test).flatten()}


def _take_split(spec: DataSpec, split: str, x: Tensor, y: Tensor | None, source: str, stratify: bool) -> tuple:
    n = x.shape[0]
    idx = _split_indices(n, spec.option("test_frac"), source, y if stratify else None)
    if len(idx["train"]) == 0 or len(idx["test"]) == 0:
        raise ValueError(f"data spec {spec.text!r}: {n} examples with test_frac={spec.option('test_frac')} "
                         f"leave an empty {'train' if len(idx['train']) == 0 else 'test'} split")
    sel = idx[split]
    return x[sel].contiguous(), None if y is None else y[sel].contiguous()


def _load_digits(spec: DataSpec, split: str, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float()[:, None] / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    y = torch.from_numpy(bunch.target).long()
    x, y = _take_split(spec, split, x, y, "digits", stratify=True)
    if spec.target == "16":
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    return Dataset(x=x.contiguous(), y=y, kind="image", spec=spec.text, split=split, num_classes=10,
                   class_names=tuple(str(d) for d in range(10)))


def _as_image_tensor(arr: np.ndarray, where: str) -> Tensor:
    """uint8 images -> [-1, 1]; float images must already be in [-1, 1]."""
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    x = torch.from_numpy(arr.astype(np.float32))
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"{where}: image values span [{lo:.4g}, {hi:.4g}]; expected floats in [-1, 1] "
                         f"(or uint8 0..255, which is rescaled)")
    return x.clamp(-1.0, 1.0)


def _validate_array(x: np.ndarray, path: str) -> str:
    """Check an array of examples; return 'vector' or 'image'."""
    where = f"npy data {path!r}"
    if x.dtype.kind not in "iuf":
        raise ValueError(f"{where}: array dtype {x.dtype} is not numeric")
    if x.ndim not in (2, 4):
        raise ValueError(f"{where}: array has shape {x.shape} (ndim {x.ndim}); expected vectors (n, d) "
                         f"or images (n, c, h, w)")
    if x.size == 0:
        raise ValueError(f"{where}: array is empty (shape {x.shape})")
    if x.dtype.kind == "f":
        bad = int((~np.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{where}: array contains {bad} NaN/inf entries")
    if x.ndim == 4 and x.shape[1] not in (1, 2, 3, 4) and x.shape[-1] in (1, 3, 4):
        raise ValueError(f"{where}: images of shape {x.shape} look channels-last; store them as (n, c, h, w)")
    return "vector" if x.ndim == 2 else "image"


def _validate_labels(y: np.ndarray, n: int, path: str) -> Tensor:
    where = f"npy data {path!r}"
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{where}: labels 'y' have shape {y.shape}; expected ({n},) to match 'x'")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{where}: labels 'y' must be whole numbers")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels 'y' have non-numeric dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"{where}: labels 'y' must be >= 0, found {y.min()}")
    return torch.from_numpy(y.astype(np.int64))


def read_array_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y or None) from a .npy file, or a .npz with key 'x' (or its only array) and optional 'y'."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"npy data file {str(p)!r} does not exist")
    try:
        if p.suffix.lower() == ".npy":
            return np.load(p, allow_pickle=False), None
        with np.load(p, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "x" in keys:
                key = "x"
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise ValueError(f"npy data {str(p)!r}: archive has arrays {keys}; name the data 'x' "
                                 f"(labels, if any, 'y')")
            return archive[key], (archive["y"] if "y" in keys and key == "x" else None)
    except ValueError as err:
        if str(p) in str(err):
            raise
        raise ValueError(f"npy data {str(p)!r} cannot be read as a numpy array file: {err}") from err
    except OSError as err:
        raise ValueError(f"npy data {str(p)!r} cannot be read as a numpy array file: {err}") from err


def _load_npy(spec: DataSpec, split: str, seed: int) -> Dataset:
    path = spec.target
    arr, labels = read_array_file(path)
    kind = _validate_array(arr, path)
    x = _as_image_tensor(arr, f"npy data {path!r}") if kind == "image" else torch.from_numpy(arr.astype(np.float32))
    y = None if labels is None else _validate_labels(labels, arr.shape[0], path)
    num_classes = 0 if y is None else int(y.max()) + 1
    x, y = _take_split(spec, split, x, y, f"npy:{Path(path).name}:{arr.shape[0]}", stratify=False)
    return Dataset(x=x, y=y, kind=kind, spec=spec.text, split=split, num_classes=num_classes)


def _load_cifar10(spec: DataSpec, split: str, seed: int) -> Dataset:
    from torchvision.datasets import CIFAR10

    root = Path(spec.target).expanduser()
    try:
        ds = CIFAR10(str(root), train=(split == "train"), download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"CIFAR-10 not found under {str(root)!r} (data spec {spec.text!r}): expected torchvision's layout "
            f"{str(root / 'cifar-10-batches-py')}/ with data_batch_1..5 and test_batch. Fetch it on a machine "
            f"with internet, e.g. torchvision.datasets.CIFAR10({str(root)!r}, download=True). ({err})") from err
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = torch.tensor(ds.targets, dtype=torch.long)
    return Dataset(x=x.contiguous(), y=y, kind="image", spec=spec.text, split=split, num_classes=10,
                   class_names=tuple(ds.classes))


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def list_image_folder(path: str | os.PathLike) -> tuple[list[Path], list[int] | None, tuple[str, ...] | None]:
    """(files, labels, class names): flat folder of images, or one sub-folder per class."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    top = sorted(p for p in root.iterdir() if _is_image(p))
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and any(_is_image(p) for p in d.iterdir()))
    if top and class_dirs:
        raise ValueError(f"image folder {str(root)!r} mixes images and class sub-folders "
                         f"({[d.name for d in class_dirs][:5]}); use one layout")
    if class_dirs:
        files, labels = [], []
        for label, d in enumerate(class_dirs):
            members = sorted(p for p in d.iterdir() if _is_image(p))
            files += members
            labels += [label] * len(members)
        return files, labels, tuple(d.name for d in class_dirs)
    if not top:
        raise ValueError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return top, None, None


def _read_image(path: Path, res: int | None, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB" if channels == 3 else "L")
        if res is not None:
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((res, res), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _load_folder(spec: DataSpec, split: str, seed: int) -> Dataset:
    files, labels, class_names = list_image_folder(spec.target)
    res, channels = spec.option("res"), spec.option("channels")
    arrays = [_read_image(p, res, channels) for p in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"image folder {spec.target!r} has images of several sizes {sorted(shapes)[:4]}; "
                         f"add ?res=N to the spec to resize them to N x N")
    x = _as_image_tensor(np.stack(arrays), f"image folder {spec.target!r}")
    y = None if labels is None else torch.tensor(labels, dtype=torch.long)
    x, y = _take_split(spec, split, x, y, f"folder:{len(files)}", stratify=y is not None)
    return Dataset(x=x, y=y, kind="image", spec=spec.text, split=split,
                   num_classes=0 if class_names is None else len(class_names), class_names=class_names)


# ----------------------------------------------------------------------------------------------
# Batches.


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """A host tensor on `device` without holding the host back.

    A copy from pageable memory to a GPU first waits until everything queued on the stream has
    run, so each one stalls the host and then leaves the GPU idle while the host launches anew;
    a copy from pinned memory is queued like a kernel (the caching host allocator keeps the
    pinned buffer until the copy is done)."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class BatchStream:
    """Endless, deterministic, resumable stream of minibatch indices.

    The global stream is the concatenation of per-epoch permutations perm(0), perm(1), ..., each
    drawn from a generator seeded by (seed, epoch), so the state is just (epoch, offset) and a
    global batch may straddle an epoch boundary (no example is dropped). batch_size is the global
    batch; rank r of world_size takes the r-th contiguous slice of it, so the union over ranks is
    the one-process batch and a resumed run may even change world_size. With hflip, every stream
    position gets a coin (also seeded by (seed, epoch)) telling whether to mirror that example.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 hflip: bool = False):
        for name, value, low in (("dataset_size", dataset_size, 1), ("batch_size", batch_size, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by world_size={world_size}")
        self.dataset_size, self.batch_size, self.seed = int(dataset_size), int(batch_size), int(seed)
        self.rank, self.world_size, self.hflip = int(rank), int(world_size), bool(hflip)
        self.epoch, self.offset, self.batches_drawn = 0, 0, 0
        self._cache: tuple[int, Tensor, Tensor | None] | None = None

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def _epoch_order(self, epoch: int) -> tuple[Tensor, Tensor | None]:
        if self._cache is None or self._cache[0] != epoch:
            perm = torch.randperm(self.dataset_size, generator=_generator("perm", self.seed, epoch))
            flips = None
            if self.hflip:
                flips = torch.rand(self.dataset_size, generator=_generator("hflip", self.seed, epoch)) < 0.5
            self._cache = (epoch, perm, flips)
        return self._cache[1], self._cache[2]

    def next_with_flips(self) -> tuple[Tensor, Tensor | None]:
        """This rank's next (indices int64 (b,), flip mask bool (b,) or None without hflip)."""
        idx, flips, need = [], [], self.batch_size
        while need:
            perm, flip = self._epoch_order(self.epoch)
            take = min(need, self.dataset_size - self.offset)
            idx.append(perm[self.offset:self.offset + take])
            if flip is not None:
                flips.append(flip[self.offset:self.offset + take])
            self.offset += take
            need -= take
            if self.offset == self.dataset_size:
                self.epoch, self.offset = self.epoch + 1, 0
        self.batches_drawn += 1
        lo, hi = self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size
        return torch.cat(idx)[lo:hi], (torch.cat(flips)[lo:hi] if self.hflip else None)

    def __next__(self) -> Tensor:
        return self.next_with_flips()[0]

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def take(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Draw the next batch from in-memory data, mirroring images where the stream says so."""
        if x.shape[0] != self.dataset_size:
            raise ValueError(f"x has {x.shape[0]} rows but the stream was built for dataset_size={self.dataset_size}")
        idx, flip = self.next_with_flips()
        xb = x[to_device(idx, x.device)]
        if flip is not None:
            if xb.ndim != 4:
                raise ValueError(f"hflip needs images (n, c, h, w); x has shape {tuple(x.shape)}")
            flip = to_device(flip, x.device)
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        return xb, None if y is None else y[to_device(idx, y.device)]

    def state_dict(self) -> dict[str, int | bool]:
        return {"epoch": self.epoch, "offset": self.offset, "batches_drawn": self.batches_drawn,
                "seed": self.seed, "dataset_size": self.dataset_size, "batch_size": self.batch_size,
                "hflip": self.hflip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the stream's identity (seed, sizes, hflip) must match."""
        missing = {"epoch", "offset", "seed", "dataset_size", "batch_size"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        for key in ("seed", "dataset_size", "batch_size", "hflip"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state[{key!r}]={state[key]!r} does not match this stream's {key}={getattr(self, key)!r}")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.dataset_size:
            raise ValueError(f"state has an invalid position epoch={epoch}, offset={offset}")
        self.epoch, self.offset = epoch, offset
        self.batches_drawn = int(state.get("batches_drawn", 0))
