"""Local cache of pretrained weight files.

Training jobs run on compute nodes without internet, so every pretrained network the
project uses (LPIPS backbone, discriminator feature networks, FID Inception) is read
from one cache directory that `python -m cluster.prefetch` fills on a machine that
has internet. Nothing in this module touches the network; it only knows *where* a
file should be and says how to get it when it is not there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV_VAR = "CTM_LAB_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/ctm-lab")

# ----------------------------------------------------------------------------
# Registry.


@dataclass(frozen=True)
class WeightEntry:
    """One known weight file.

    `source_kind` tells cluster.prefetch which download path to use:
    "torchvision" (source = "<builder>:<WeightsEnum member>"), "timm" (source = timm model
    name; the file holds the model's full state_dict) or "url" (source = direct URL; the file
    is stored as downloaded).
    """

    name: str
    filename: str
    description: str
    source_kind: str
    source: str
    hash_prefix: str | None = None  # first hex digits of the sha256, when the source publishes one

    def path(self, cache_dir: str | os.PathLike | None = None) -> Path:
        return resolve_cache_dir(cache_dir) / self.filename


WEIGHTS: dict[str, WeightEntry] = {
    e.name: e
    for e in (
        WeightEntry(
            name="vgg16_lpips",
            filename="vgg16_imagenet1k_v1.pth",
            description="torchvision VGG16 ImageNet-1k weights (IMAGENET1K_V1), the LPIPS backbone",
            source_kind="torchvision",
            source="vgg16:IMAGENET1K_V1",
        ),
        WeightEntry(
            name="tf_efficientnet_lite0",
            filename="timm_tf_efficientnet_lite0.pth",
            description="timm tf_efficientnet_lite0 ImageNet weights, GAN discriminator feature network",
            source_kind="timm",
            source="tf_efficientnet_lite0",
        ),
        WeightEntry(
            name="deit_base_distilled_patch16_224",
            filename="timm_deit_base_distilled_patch16_224.pth",
            description="timm deit_base_distilled_patch16_224 ImageNet weights, GAN discriminator feature network",
            source_kind="timm",
            source="deit_base_distilled_patch16_224",
        ),
        WeightEntry(
            name="inception_fid",
            filename="pt_inception-2015-12-05-6726825d.pth",
            description="FID Inception-v3 weights (pytorch-fid port of the 2015-12-05 TF graph)",
            source_kind="url",
            source="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
            hash_prefix="6726825d",
        ),
    )
}

# ----------------------------------------------------------------------------
# Errors.


class MissingWeightsError(FileNotFoundError):
    """A weight file is not in the local cache; the message says how to fetch it."""

    def __init__(self, name: str, path: str | os.PathLike, detail: str | None = None):
        self.name = name
        self.path = Path(path)
        self.detail = detail
        lines = [f"Pretrained weights '{name}' not found: expected file {self.path}."]
        if detail:
            lines.append(detail)
        if name in WEIGHTS:
            lines.append(
                f"Fix: on a machine with internet access (e.g. the login node) run "
                f"`python -m cluster.prefetch --only {name}` (add `--cache-dir DIR` for another cache), "
                f"or set {CACHE_ENV_VAR} to a directory that already holds {WEIGHTS[name].filename}."
            )
        else:  # an explicit file outside the registry (e.g. a custom timm backbone)
            lines.append("Fix: save the state_dict there, or pass the path of an existing file.")
        super().__init__(" ".join(lines))

    def __reduce__(self):  # keep picklable (Ray/submitit ship exceptions between processes)
        return (type(self), (self.name, self.path, self.detail))


# ----------------------------------------------------------------------------
# Lookup.


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache directory: explicit argument > $CTM_LAB_CACHE > ~/.cache/ctm-lab (not created)."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_CACHE_DIR.expanduser()


def get_entry(name: str) -> WeightEntry:
    if name not in WEIGHTS:
        raise ValueError(f"name={name!r} is not a known weight entry; known: {sorted(WEIGHTS)}")
    return WEIGHTS[name]


def weights_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where entry `name` lives in the cache (whether or not it is there)."""
    return get_entry(name).path(cache_dir)


def require_weights(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of entry `name` in the cache; MissingWeightsError if the file is absent."""
    path = weights_path(name, cache_dir)
    if not path.is_file():
        raise MissingWeightsError(name, path)
    return path


def require_file(path: str | os.PathLike, name: str) -> Path:
    """An explicitly given weight file (bypassing the cache) must exist too."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(name, path, detail="(The path was given explicitly; the cache is not consulted.)")
    return path
