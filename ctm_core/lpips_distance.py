"""LPIPS distance for the CTM loss, with the VGG16 backbone read from the local cache.

The official CTM code measures its consistency loss with LPIPS after bilinearly
upsampling small images to 224x224 (LPIPS features are tuned for ImageNet-sized inputs;
at 32x32 the deep VGG layers see almost nothing). We build on the `lpips` package: its
learned linear-layer weights ship inside the package, and the ImageNet VGG16 backbone is
loaded from our cache instead of being downloaded by torchvision. Like the official code's
`piq.LPIPS(replace_pooling=True)`, the VGG's max-pooling layers are 2x2 average pools: the
distance and its gradients are those of the official loss, not of the lpips package's default.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from lpips import LPIPS, normalize_tensor  # this module is imported only by runs that use LPIPS
from torch import nn

from ctm_core.pretrained import require_file, require_weights
from ctm_core.recompute import forward_recomputed_in_backward

LPIPS_BACKBONE_ENTRY = "vgg16_lpips"
_LPIPS_SLICES = ("slice1", "slice2", "slice3", "slice4", "slice5")
# The conv layers of torchvision's VGG16 `features` (the ones LPIPS uses: all 13).
_VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _vgg_features_state(path: Path) -> dict[str, torch.Tensor]:
    """`features.N.*` tensors of a torchvision VGG16 state_dict file (classifier keys ignored)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"backbone_path {path} does not hold a state_dict (got {type(state).__name__})")
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    expected = {f"{i}.{kind}" for i in _VGG16_CONV_INDICES for kind in ("weight", "bias")}
    missing = sorted(expected - set(features), key=lambda k: int(k.split(".")[0]))
    if missing:
        raise ValueError(
            f"backbone_path {path} is not a torchvision VGG16 state_dict: missing features.{missing[0]}"
            f" (and {len(missing) - 1} more)"
        )
    return features


def _load_vgg_backbone(lpips_net: nn.Module, features: dict[str, torch.Tensor], path: Path) -> None:
    """Copy torchvision VGG16 `features` weights into lpips' sliced copy of the same layers.

    lpips keeps torchvision's layer indices as module names inside its five slices
    (slice1.0 <- features.0, slice2.5 <- features.5, ...), so the mapping is by index.
    """
    with torch.no_grad():
        for slice_name in _LPIPS_SLICES:
            for key, param in getattr(lpips_net, slice_name).state_dict(keep_vars=True).items():
                source = features[key]
                if source.shape != param.shape:
                    raise ValueError(
                        f"backbone_path {path}: features.{key} has shape {tuple(source.shape)},"
                        f" expected {tuple(param.shape)}"
                    )
                param.copy_(source)


def _average_pooling(module: nn.Module) -> None:
    """Swap every MaxPool2d under `module` for a 2x2 average pool (piq's replace_pooling)."""
    for name, child in module.named_children():
        if isinstance(child, nn.MaxPool2d):
            setattr(module, name, nn.AvgPool2d(kernel_size=2, stride=2))
        else:
            _average_pooling(child)


class LPIPSDistance(nn.Module):
    """Per-sample LPIPS (VGG, v0.1) between image batches in [-1, 1].

    Images whose height or width is below `resize_to` are bilinearly upsampled to
    resize_to x resize_to first (None: never resize). Grayscale inputs are repeated to
    three channels. All weights are frozen; gradients flow to the inputs only.

    The backbone comes from `backbone_path` if given, else from the cache entry
    'vgg16_lpips' (cache_dir > $CTM_LAB_CACHE > ~/.cache/ctm-lab).

    `recompute_features` (set by the trainer, train.recompute_features): keep none of the first
    input's VGG activations for the backward and run it again there (ctm_core.recompute). The second
    input's features are computed once, outside that region: in CTM it is the target, which no gradient
    reaches, so recomputing its side would cost a VGG forward per step for nothing (~8 TFLOP at batch
    256), and its five feature maps (~12 MB per image in bf16) are what the distance needs anyway.
    """

    def __init__(
        self,
        resize_to: int | None = 224,
        cache_dir: str | os.PathLike | None = None,
        backbone_path: str | os.PathLike | None = None,
    ):
        super().__init__()
        if resize_to is not None and resize_to < 16:
            raise ValueError(f"resize_to must be None or >= 16, got {resize_to}")
        if backbone_path is not None:
            path = require_file(backbone_path, LPIPS_BACKBONE_ENTRY)
        else:
            path = require_weights(LPIPS_BACKBONE_ENTRY, cache_dir)
        features = _vgg_features_state(path)  # validate before the (slow) LPIPS construction
        with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=` flag
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        _load_vgg_backbone(self.lpips.net, features, path)
        _average_pooling(self.lpips.net)
        self.requires_grad_(False)
        self.resize_to = resize_to
        self.recompute_features = False
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # a fixed metric: lpips' dropout layers must stay off

    def _prepare(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{name} must have shape (B, 1 or 3, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize_to is not None and min(x.shape[-2:]) < self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        return x

    def compile_networks(self, **options) -> None:
        """torch.compile the feature extraction and the distance to given features (what `forward` runs)."""
        self._features = torch.compile(self._features, **options)
        self._distance_to = torch.compile(self._distance_to, **options)

    def _features(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The VGG's five feature maps of an image in [-1, 1], each unit-normalised over channels."""
        taps = self.lpips.net(self.lpips.scaling_layer(image))
        return tuple(normalize_tensor(tap) for tap in taps)

    def _distance_to(self, image: torch.Tensor, *target: torch.Tensor) -> torch.Tensor:
        """LPIPS between an image and the `_features` of another: per layer, the learned channel weights
        on the squared feature difference, averaged over space; summed over layers. Shape (B, 1, 1, 1)."""
        diffs = [(a - b) ** 2 for a, b in zip(self._features(image), target, strict=True)]
        return sum(lin(diff).mean((2, 3), keepdim=True) for lin, diff in zip(self.lpips.lins, diffs, strict=True))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        x, target = self._prepare(x, "x"), self._features(self._prepare(y, "y"))
        if self.recompute_features:
            d = forward_recomputed_in_backward(self._distance_to, x, *target)
        else:
            d = self._distance_to(x, *target)
        return d.reshape(x.shape[0])
