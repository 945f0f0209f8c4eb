"""Discriminators for the CTM GAN term.

`ProjectedDiscriminator` follows the projected-GAN recipe the CTM paper uses: images are
augmented (DiffAugment), passed through frozen pretrained feature networks, mixed by fixed
random projections across channels and across scales, and judged by small trainable patch
heads, one per feature scale. The frozen parts give the discriminator good features from
the start, so it cannot overfit a small data set quickly.

`PatchDiscriminator` is trained from scratch on the pixels (DiffAugment, then one patch head): for
small images where ImageNet features do not apply (8x8 digits) or where no weight cache exists.

`VectorDiscriminator` is a plain MLP for vector (toy) data.

Only modules live here; the hinge / non-saturating losses are in ctm_core/losses.py.
Every discriminator returns a list of logit tensors, one per head, so the losses can treat
both kinds alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ctm_core.pretrained import require_file, require_weights
from ctm_core.recompute import forward_recomputed_in_backward

PAPER_FEATURE_NETS = ("tf_efficientnet_lite0", "deit_base_distilled_patch16_224")
DIFFAUG_POLICY = ("color", "translation", "cutout")

# ----------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020): differentiable augmentations, applied to real and fake
# alike. Inputs are images in [-1, 1]; each call draws fresh per-sample parameters, so two
# calls (real batch, fake batch) are augmented independently.


def _rand(x: torch.Tensor, *shape: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, device=x.device, dtype=x.dtype, generator=generator)


def _color(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_rand(x, b, 1, 1, 1, generator=generator) - 0.5)  # brightness
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (2.0 * _rand(x, b, 1, 1, 1, generator=generator)) + mean_c  # saturation
    mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean_all) * (_rand(x, b, 1, 1, 1, generator=generator) + 0.5) + mean_all  # contrast
    return x


def _translation(x: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Shift each image by up to ratio * size pixels, filling with zeros."""
    b, c, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if max_dy == 0 and max_dx == 0:
        return x
    dy = torch.randint(-max_dy, max_dy + 1, (b, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(-max_dx, max_dx + 1, (b, 1, 1), device=x.device, generator=generator)
    src_y = torch.arange(h, device=x.device).view(1, h, 1) - dy
    src_x = torch.arange(w, device=x.device).view(1, 1, w) - dx
    inside = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)  # (b, h, w)
    flat_index = src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)
    gathered = x.flatten(2).gather(2, flat_index.view(b, 1, h * w).expand(b, c, h * w))
    return gathered.view(b, c, h, w) * inside.unsqueeze(1).to(x.dtype)


def _cutout(x: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Zero one square of side ratio * size per image, centred anywhere in the image."""
    b, _, h, w = x.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if size_y == 0 or size_x == 0:
        return x
    cy = torch.randint(0, h, (b, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w, (b, 1, 1), device=x.device, generator=generator)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    y0, x0 = cy - size_y // 2, cx - size_x // 2
    hole = (ys >= y0) & (ys < y0 + size_y) & (xs >= x0) & (xs < x0 + size_x)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def diff_augment(
    x: torch.Tensor,
    policy: Sequence[str] = DIFFAUG_POLICY,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DiffAugment of images (B, C, H, W) in [-1, 1]; differentiable w.r.t. x."""
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    for op in policy:
        if op == "color":
            x = _color(x, generator)
        elif op == "translation":
            x = _translation(x, translation_ratio, generator)
        elif op == "cutout":
            x = _cutout(x, cutout_ratio, generator)
        else:
            raise ValueError(f"policy contains unknown augmentation {op!r}; known: {DIFFAUG_POLICY}")
    return x


class DiffAugment(nn.Module):
    """diff_augment with its settings, shared by the image discriminators (their defaults differ, so
    they pass all three); an empty policy is off. No parameters or buffers: checkpoints are the same
    with or without it."""

    def __init__(self, policy: Sequence[str] | None, translation_ratio: float, cutout_ratio: float):
        super().__init__()
        self.policy = tuple(policy) if policy else ()
        self.translation_ratio, self.cutout_ratio = translation_ratio, cutout_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.policy, self.translation_ratio, self.cutout_ratio) if self.policy else x


# ----------------------------------------------------------------------------
# Frozen feature networks.


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} does not hold a state_dict (got {type(state).__name__})")
    return state


def _evenly_spaced_blocks(num_blocks: int, count: int) -> list[int]:
    """`count` block indices spread over the depth, the last one included (DPT-style taps)."""
    count = min(count, num_blocks)
    return [round((i + 1) * num_blocks / count) - 1 for i in range(count)]


class FrozenFeatureNet(nn.Module):
    """A pretrained timm network used as a fixed multi-scale feature extractor.

    Input: images in [-1, 1]. They are resized to the network's input size, mapped to its
    own normalisation, and the outputs of `indices` (timm `forward_intermediates` taps) are
    returned as NCHW maps (`channels` of them). Networks whose taps all share one resolution
    (ViTs) are turned into a pyramid by `to_pyramid`, which resamples map i by the factor
    2^(n-2-i) (for four taps: x4, x2, x1, x0.5), as in projected GANs built on ViT features;
    `resolutions` are the pyramid's.

    The network's weights come from a file, so they are neither trained nor checkpointed:
    the model is held outside the module tree (no parameters, no state_dict entries, always
    in eval mode), but follows `.to()` / `.cuda()` / `.half()`. Gradients still flow to
    the input image, which the generator loss needs.
    """

    def __init__(
        self,
        model: nn.Module,
        indices: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int,
        name: str = "",
    ):
        super().__init__()
        if input_size < 16:
            raise ValueError(f"input_size must be >= 16, got {input_size}")
        model.eval().requires_grad_(False)
        if hasattr(model, "prune_intermediate_layers"):
            model.prune_intermediate_layers(list(indices), prune_norm=True, prune_head=True)
        object.__setattr__(self, "_model", model)  # not registered: see class docstring
        self.name = name
        self.indices = list(indices)
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            raw = self._taps(torch.zeros(1, 3, self.input_size, self.input_size))
        self.make_pyramid = len(raw) > 1 and len({tuple(r.shape[-2:]) for r in raw}) == 1
        self.channels = [int(f.shape[1]) for f in raw]
        with torch.no_grad():
            self.resolutions = [int(f.shape[-1]) for f in self.to_pyramid(raw)]

    @property
    def model(self) -> nn.Module:
        return self._model

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._model._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self._model.eval()  # batch-norm statistics and dropout of the frozen net never change
        return self

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._model.forward_intermediates(x, indices=self.indices, intermediates_only=True)

    def to_pyramid(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The taps' maps (or any per-channel linear map of them) at the pyramid's resolutions."""
        if not self.make_pyramid:
            return list(maps)
        n = len(maps)
        out = []
        for i, t in enumerate(maps):
            exponent = n - 2 - i  # n=4: 2, 1, 0, -1
            if exponent > 0:
                t = F.interpolate(t, scale_factor=2**exponent, mode="bilinear", align_corners=False)
            elif exponent < 0:
                size = max(1, t.shape[-1] // 2 ** (-exponent))
                t = F.adaptive_avg_pool2d(t, size)
            out.append(t)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = ((x + 1) * 0.5 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self._taps(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, indices={self.indices}, input_size={self.input_size}, channels={self.channels}"


def build_feature_net(
    model_name: str,
    weights_path: str | os.PathLike | None,
    *,
    num_scales: int = 4,
    input_size: int | None = None,
    model_kwargs: dict | None = None,
) -> FrozenFeatureNet:
    """A timm model with weights from `weights_path` (a state_dict file of the full model).

    `weights_path=None` keeps timm's random initialisation (debugging only). A missing file
    raises MissingWeightsError. Nothing is downloaded.
    """
    import timm  # deferred: importing timm is slow and only GAN runs need it

    if num_scales < 1:
        raise ValueError(f"num_scales must be >= 1, got {num_scales}")
    model = timm.create_model(model_name, pretrained=False, **(model_kwargs or {}))
    if weights_path is not None:
        path = require_file(weights_path, model_name)
        state = _load_state_dict_file(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"weights_path {path} does not match timm model {model_name!r}: {err}") from err
    num_taps = len(model.feature_info)
    single_resolution = len({f["reduction"] for f in model.feature_info}) == 1
    if single_resolution:  # ViT: taps from blocks spread over the depth
        indices = _evenly_spaced_blocks(num_taps, num_scales)
    else:  # CNN: the deepest `num_scales` stages
        indices = list(range(max(0, num_taps - num_scales), num_taps))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if input_size is None:
        patch_embed = getattr(model, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None)
        input_size = int(img_size[-1]) if img_size is not None else int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return FrozenFeatureNet(model, indices, mean, std, input_size, name=model_name)


# ----------------------------------------------------------------------------
# Fixed random mixing (projected-GAN CCM + CSM).


def _random_conv_weight(out_ch: int, in_ch: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform weights scaled so the output has about the input's variance."""
    bound = math.sqrt(3.0 / (in_ch * k * k))
    return (torch.rand(out_ch, in_ch, k, k, generator=generator) * 2 - 1) * bound


class RandomMixing(nn.Module):
    """Fixed random cross-channel (1x1 conv per scale) and cross-scale (top-down) mixing.

    Cross-scale: starting from the coarsest scale, each coarser result is projected to the
    finer scale's width, upsampled and added, so fine maps also carry coarse context. The
    weights are buffers drawn from `seed`: never trained, but saved with checkpoints. The
    discriminator puts a feature net's pyramid resampling between the two (mix_channels,
    FrozenFeatureNet.to_pyramid, mix_scales).
    """

    def __init__(self, in_channels: Sequence[int], base_channels: int = 64, expand: bool = True, seed: int = 0):
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        gen = torch.Generator().manual_seed(int(seed))
        n = len(in_channels)
        self.out_channels = [base_channels * (2**i if expand else 1) for i in range(n)]
        for i, (c_in, c_out) in enumerate(zip(in_channels, self.out_channels)):
            self.register_buffer(f"channel_mix{i}", _random_conv_weight(c_out, c_in, 1, gen))
        for i in range(n - 1):
            self.register_buffer(f"scale_mix{i}", _random_conv_weight(self.out_channels[i], self.out_channels[i + 1], 1, gen))

    def mix_channels(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [F.conv2d(f, getattr(self, f"channel_mix{i}").to(f.dtype)) for i, f in enumerate(feats)]

    def mix_scales(self, mixed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = [None] * len(mixed)
        out[-1] = mixed[-1]
        for i in range(len(mixed) - 2, -1, -1):
            coarse = F.conv2d(out[i + 1], getattr(self, f"scale_mix{i}").to(mixed[i].dtype))
            coarse = F.interpolate(coarse, size=mixed[i].shape[-2:], mode="bilinear", align_corners=False)
            out[i] = (mixed[i] + coarse) * (1 / math.sqrt(2))
        return out


# ----------------------------------------------------------------------------
# Trainable heads.


def _sn_conv(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0) -> nn.Module:
    return spectral_norm(nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding))


class PatchHead(nn.Module):
    """Small patch discriminator for one feature scale: stride-2 blocks down to <= 8 px,
    then a 3x3 conv to one logit per patch (plus a projection term when conditional)."""

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        width: int = 64,
        max_width: int = 256,
        min_resolution: int = 8,
        num_classes: int = 0,
    ):
        super().__init__()
        layers: list[nn.Module] = [_sn_conv(in_channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        ch, res = width, resolution
        while res > min_resolution:
            nxt = min(ch * 2, max_width)
            layers += [_sn_conv(ch, nxt, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch, res = nxt, res // 2
        self.body = nn.Sequential(*layers)
        self.out = _sn_conv(ch, 1, 3, padding=1)
        self.embed = nn.Embedding(num_classes, ch) if num_classes > 0 else None

    def forward(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x)
        logits = self.out(h)
        if self.embed is not None:
            e = self.embed(class_labels)[:, :, None, None]
            logits = logits + (e * h).sum(dim=1, keepdim=True) / math.sqrt(h.shape[1])
        return logits.flatten(1)


def _check_class_labels(class_labels: torch.Tensor | None, num_classes: int, batch: int) -> None:
    if num_classes == 0:
        return  # unconditional: labels ignored, as the official CTM discriminator (cond=0)
    if class_labels is None:
        raise ValueError(f"class_labels are required when num_classes={num_classes}")
    if class_labels.shape != (batch,):
        raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")


class ProjectedDiscriminator(nn.Module):
    """Projected-GAN discriminator over one or more frozen feature networks.

    forward(x) takes images in [-1, 1] (B, C, H, W) with C in {1, 3} and returns a list of
    patch logits (B, P_k), one per (feature network, scale) head. Only the heads are trained
    (`trainable_parameters()`); the mixing weights are fixed buffers and the feature networks
    are frozen. DiffAugment draws its parameters per sample (so real and fake get independent
    draws, also when stacked in one call) and is shared by all feature networks.

    `recompute_features` (set by the trainer, train.recompute_features): keep none of the feature
    networks' activations for the generator's backward and run them again there (ctm_core.recompute).
    """

    def __init__(
        self,
        feature_nets: Sequence[FrozenFeatureNet],
        *,
        base_channels: int = 64,
        expand: bool = True,
        head_width: int = 64,
        head_max_width: int = 256,
        num_classes: int = 0,
        diffaug_policy: Sequence[str] | None = DIFFAUG_POLICY,
        translation_ratio: float = 0.125,
        cutout_ratio: float = 0.2,
        projection_seed: int = 0,
    ):
        super().__init__()
        if len(feature_nets) == 0:
            raise ValueError("feature_nets must hold at least one network")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.feature_nets = nn.ModuleList(feature_nets)
        self.mixers = nn.ModuleList(
            RandomMixing(net.channels, base_channels, expand, seed=projection_seed + k)
            for k, net in enumerate(feature_nets)
        )
        self.heads = nn.ModuleList()
        for net, mixer in zip(feature_nets, self.mixers):
            for ch, res in zip(mixer.out_channels, net.resolutions):
                self.heads.append(PatchHead(ch, res, head_width, head_max_width, num_classes=num_classes))
        self.num_classes = num_classes
        self.diffaug = DiffAugment(diffaug_policy, translation_ratio, cutout_ratio)
        self.recompute_features = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self,
        x: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment: bool = True,
    ) -> list[torch.Tensor]:
        _check_class_labels(class_labels, self.num_classes, x.shape[0])
        return self._heads(self._features(x, augment), class_labels)

    def real_and_fake_logits(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[list[torch.Tensor],
                                                                                    list[torch.Tensor]]:
        """forward(real), forward(fake) for the discriminator's step, with the frozen feature networks
        run once on both batches stacked: on a GPU the step is bound by launching their kernels.
        The heads still see real and fake in separate calls, so each head's gradient sums the two
        halves apart, as two calls do; in one sum of mixed signs float rounding leaves a residue
        where the hinge loss's gradient is exactly zero, and Adam-type optimisers turn such residues
        into steps of ~0.1 lr (measured on the DDP-equals-one test)."""
        _check_class_labels(None, self.num_classes, real.shape[0])
        n = real.shape[0]
        both = self._features(torch.cat([real, fake]), augment=True)
        return (self._heads([f[:n] for f in both]), self._heads([f[n:] for f in both]))

    def _features(self, x: torch.Tensor, augment: bool) -> list[torch.Tensor]:
        """Every head's input: DiffAugment (drawn per sample), the frozen networks, the fixed mixing."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"x must have shape (B, 1 or 3, H, W), got {tuple(x.shape)}")
        if augment:
            x = self.diffaug(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        run = forward_recomputed_in_backward if self.recompute_features else (lambda net, x: net(x))
        features = []
        for net, mixer in zip(self.feature_nets, self.mixers):
            # Resampling is linear per channel and the channel mixing per pixel, so the two commute: mixed
            # first, a ViT's pyramid upsamples the mixer's 64-128 channels instead of its own 768.
            features += mixer.mix_scales(net.to_pyramid(mixer.mix_channels(run(net, x))))
        return features

    def compile_heads(self, **compile_options) -> None:
        """torch.compile the trainable heads: on a GPU their many small kernels (the spectral norms' power
        iterations) otherwise leave it waiting for the host. All heads as one compiled function, not one
        per head: they share PatchHead.forward's code, and its eight shapes (times grad modes) would pass
        torch.compile's recompile limit and fall back to eager. `compile_options` go to torch.compile."""
        self._heads = torch.compile(self._heads, **compile_options)

    def _heads(self, features: Sequence[torch.Tensor], class_labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [head(feat, class_labels) for head, feat in zip(self.heads, features, strict=True)]


def build_projected_discriminator(
    model_names: Sequence[str],
    pretrained_paths: Sequence[str | os.PathLike | None],
    *,
    input_size: int | None = None,
    model_kwargs: Sequence[dict | None] | None = None,
    num_scales: int = 4,
    **disc_kwargs,
) -> ProjectedDiscriminator:
    """ProjectedDiscriminator over any timm models, weights from explicit files.

    pretrained_paths[i] is the state_dict file of model_names[i] (None: random init, for
    debugging only). input_size overrides every net's native input size (tests use small
    images); model_kwargs[i] go to timm.create_model (e.g. depth for a tiny ViT).
    """
    if len(pretrained_paths) != len(model_names):
        raise ValueError(
            f"pretrained_paths has {len(pretrained_paths)} entries but model_names has {len(model_names)}"
        )
    if model_kwargs is not None and len(model_kwargs) != len(model_names):
        raise ValueError(f"model_kwargs has {len(model_kwargs)} entries but model_names has {len(model_names)}")
    nets = [
        build_feature_net(
            name,
            path,
            num_scales=num_scales,
            input_size=input_size,
            model_kwargs=(model_kwargs[i] if model_kwargs is not None else None),
        )
        for i, (name, path) in enumerate(zip(model_names, pretrained_paths))
    ]
    return ProjectedDiscriminator(nets, **disc_kwargs)


def build_paper_discriminator(cache_dir: str | os.PathLike | None = None, **disc_kwargs) -> ProjectedDiscriminator:
    """The CTM paper's discriminator: EfficientNet-lite0 + DeiT-base at 224, weights from the cache."""
    paths = [require_weights(name, cache_dir) for name in PAPER_FEATURE_NETS]
    return build_projected_discriminator(PAPER_FEATURE_NETS, paths, **disc_kwargs)


# ----------------------------------------------------------------------------
# Small images, no pretrained features.


class PatchDiscriminator(nn.Module):
    """DiffAugment + one spectral-norm patch head on the raw pixels, trained from scratch.

    The projected discriminator upsamples to 224 px for ImageNet networks, which is wasted on 8x8
    grayscale digits and impossible without the weight cache; this one runs anywhere, CPU included.
    Returns [patch logits (B, P)], like the other discriminators.
    """

    def __init__(self, channels: int, resolution: int, width: int = 32, max_width: int = 128,
                 num_classes: int = 0, diffaug_policy: Sequence[str] | None = ("translation", "cutout"),
                 translation_ratio: float = 0.125, cutout_ratio: float = 0.25):
        super().__init__()
        for arg, value, low in (("channels", channels, 1), ("resolution", resolution, 4), ("width", width, 1),
                                ("num_classes", num_classes, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}")
        self.head = PatchHead(channels, resolution, width, max_width, min_resolution=4, num_classes=num_classes)
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.diffaug = DiffAugment(diffaug_policy, translation_ratio, cutout_ratio)

    def forward(self, x: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment: bool = True) -> list[torch.Tensor]:
        expected = (self.channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        _check_class_labels(class_labels, self.num_classes, x.shape[0])
        if augment:
            x = self.diffaug(x)
        return [self.head(x, class_labels)]


# ----------------------------------------------------------------------------
# Vector data.


class VectorDiscriminator(nn.Module):
    """MLP discriminator for vectors (B, dim): `depth` hidden layers of width `hidden`.

    Returns [logits (B,)]. With num_classes > 0 it adds a projection term <embed(y), h>.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, num_classes: int = 0):
        super().__init__()
        for arg, value, low in (("dim", dim, 1), ("hidden", hidden, 1), ("depth", depth, 1), ("num_classes", num_classes, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}")
        layers: list[nn.Module] = []
        width_in = dim
        for _ in range(depth):
            layers += [nn.Linear(width_in, hidden), nn.LeakyReLU(0.2)]
            width_in = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, 1)
        self.embed = nn.Embedding(num_classes, hidden) if num_classes > 0 else None
        self.dim = dim
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        _check_class_labels(class_labels, self.num_classes, x.shape[0])
        h = self.body(x)
        logits = self.out(h).squeeze(1)
        if self.embed is not None:
            logits = logits + (self.embed(class_labels) * h).sum(dim=1) / math.sqrt(h.shape[1])
        return [logits]
