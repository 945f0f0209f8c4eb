"""DDPM++-style U-Net with CTM's two-time conditioning.

Layout follows the DDPM++ configuration of Song et al. as reimplemented in EDM (standard
encoder/decoder, 2x2 box down-sampling, nearest up-sampling, residual blocks with
GroupNorm + SiLU, single-head self-attention at chosen resolutions, skip connections from every
encoder stage, residual sums scaled by sqrt(1/2)). The CTM change: every residual block receives
affine_t(emb_t) + affine_s(emb_s), with separate affine layers for t and for s.

Compile-friendliness: forward contains no data-dependent Python branching; the skip routing is
fixed at construction (`takes_skip` flags), and all resampling uses plain torch ops that keep
the channels_last memory format.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .embeddings import TimeEmbedding, check_inputs
from .trunk import CompilableTrunk

_SQRT_HALF = math.sqrt(0.5)
HAS_TRITON = importlib.util.find_spec("triton") is not None  # PyTorch's Linux wheels bundle it


def _init_xavier(layer: nn.Conv2d | nn.Linear, gain: float = 1.0) -> None:
    """DDPM++ init: xavier-uniform weights (scaled by `gain`), zero bias."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class GroupNorm(nn.GroupNorm):
    """GroupNorm(x [+ shift]) [then SiLU], in its input's precision, as EDM runs it.

    bf16 autocast would upcast every activation to fp32 for the norm and cast it back for the next
    convolution: two extra copies of each activation, in the forward and in the backward. The
    kernel accumulates the statistics in fp32 either way, so only the output's rounding differs,
    and the next convolution rounds its input to bf16 anyway.

    On CUDA with channels_last activations, calls go to `group_norm_nhwc`'s Triton kernels, which
    read that layout directly and fuse the shift and the SiLU (`triton=False` keeps the PyTorch
    path). They are PyTorch operators, so compiled networks (the teacher) call them too.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False):
        super().__init__(num_groups, num_channels, eps=eps)
        self.silu = silu
        self.triton = True

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        if self.triton and HAS_TRITON and x.is_cuda:
            from .group_norm_nhwc import group_norm_nhwc, supports  # Triton is imported on CUDA only
            if supports(x):
                return group_norm_nhwc(x, self.weight, self.bias, self.num_groups, self.eps, self.silu, shift)
        if shift is not None:
            x = x + shift[:, :, None, None]
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                x = F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        else:  # nothing to undo (and small CPU nets feel every op)
            x = super().forward(x)
        return F.silu(x) if self.silu else x


def _group_norm(channels: int, eps: float, silu: bool) -> GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels, always a divisor of `channels`."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return GroupNorm(groups, channels, eps=eps, silu=silu)


def use_triton_norms(module: nn.Module, enabled: bool) -> None:
    """Route every U-Net GroupNorm inside `module` to the Triton kernels on CUDA, or not."""
    for norm in module.modules():
        if isinstance(norm, GroupNorm):
            norm.triton = enabled


def _resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """2x box-filter down-sampling or 2x nearest up-sampling (the [1, 1] resampling filter)."""
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over all pixels; returns the residual branch only."""

    def __init__(self, channels: int, num_heads: int, eps: float):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = _group_norm(channels, eps, silu=False)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)
        _init_xavier(self.qkv, gain=math.sqrt(0.2))
        _init_xavier(self.proj, gain=1e-5)  # near-identity block at init, as in DDPM++

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, head_dim)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(-1, -2).reshape(b, c, h, w)
        return self.proj(a)


class UNetBlock(nn.Module):
    """Residual block: GroupNorm-SiLU-[resample]-Conv, add t/s conditioning, GroupNorm-SiLU-
    Dropout-Conv, plus a (projected) skip; optionally followed by self-attention.

    adaptive_scale=False (DDPM++): the conditioning is a per-channel bias added before norm1.
    adaptive_scale=True: it is split into scale and shift applied after norm1 (FiLM).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        resample: str = "none",
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        eps: float = 1e-6,
        adaptive_scale: bool = False,
        takes_skip: bool = False,
    ):
        super().__init__()
        if resample not in ("none", "up", "down"):
            raise ValueError(f"resample must be 'none', 'up' or 'down', got {resample!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample = resample
        self.dropout = dropout
        self.adaptive_scale = adaptive_scale
        self.takes_skip = takes_skip  # decoder blocks concatenate one encoder skip before running

        cond_channels = out_channels * (2 if adaptive_scale else 1)
        self.norm0 = _group_norm(in_channels, eps, silu=True)
        self.conv0 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.affine_t = nn.Linear(emb_channels, cond_channels)
        self.affine_s = nn.Linear(emb_channels, cond_channels)
        self.norm1 = _group_norm(out_channels, eps, silu=not adaptive_scale)  # FiLM: SiLU after
        self.conv1 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        needs_proj = in_channels != out_channels or resample != "none"
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if needs_proj else None
        self.attn = SelfAttention2d(out_channels, num_heads, eps) if attention else None

        for layer in (self.conv0, self.affine_t, self.affine_s, self.skip):
            if layer is not None:
                _init_xavier(layer)
        _init_xavier(self.conv1, gain=1e-5)

    def forward(self, x: torch.Tensor, emb_t: torch.Tensor, emb_s: torch.Tensor) -> torch.Tensor:
        # conv0's bias goes into norm1's per-channel shift rather than onto conv0's output: the same function
        # (norm1 sees conv0(x) + bias [+ cond] either way), without a pass over the activation to add it, nor
        # one in the backward to reduce its gradient (the norm's shift gradient gives it)
        h = F.conv2d(_resample(self.norm0(x), self.resample), self.conv0.weight, None, padding=self.conv0.padding)
        cond = self.affine_t(emb_t) + self.affine_s(emb_s)
        if self.adaptive_scale:
            scale, shift = cond[:, :, None, None].to(h.dtype).chunk(2, dim=1)
            bias = self.conv0.bias.to(h.dtype).expand(h.shape[0], -1)
            h = F.silu(torch.addcmul(shift, self.norm1(h, shift=bias), scale + 1))
        else:
            h = self.norm1(h, shift=(cond + self.conv0.bias).to(h.dtype))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        skip = x if self.skip is None else self.skip(_resample(x, self.resample))
        x = (h + skip) * _SQRT_HALF
        if self.attn is not None:
            x = (x + self.attn(x)) * _SQRT_HALF
        return x


class UNetBackbone(CompilableTrunk, nn.Module):
    """F_theta(x_in, c_noise(t), c_noise(s)[, label]) for images (B, C, H, W), H = W = img_resolution.

    Defaults are the CIFAR-10 DDPM++ setting used by CTM (about 60M parameters with the extra
    s-layers). The output conv is zero-initialised, so a fresh model returns F = 0.
    The output has x_in's dtype (also under autocast), so losses are computed in full precision.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.13,
        num_classes: int = 0,
        channel_mult_emb: int = 4,
        num_heads: int = 1,
        adaptive_scale: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value in (
            ("img_resolution", img_resolution), ("in_channels", in_channels), ("out_channels", out_channels),
            ("model_channels", model_channels), ("num_blocks", num_blocks), ("channel_mult_emb", channel_mult_emb),
            ("num_heads", num_heads),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        channel_mult = tuple(channel_mult)
        if not channel_mult or any(not isinstance(m, int) or m < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult!r}")
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(
                f"img_resolution={img_resolution} must be divisible by 2**(len(channel_mult)-1)="
                f"{2 ** (len(channel_mult) - 1)}"
            )
        if model_channels % 2:
            raise ValueError(f"model_channels must be even (sin/cos pairs), got {model_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")

        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        emb_channels = model_channels * channel_mult_emb
        attn_resolutions = set(attn_resolutions)
        block = dict(emb_channels=emb_channels, num_heads=num_heads, dropout=dropout, eps=eps,
                     adaptive_scale=adaptive_scale)

        self.embed = TimeEmbedding(noise_channels=model_channels, emb_channels=emb_channels, num_classes=num_classes)

        # Encoder: input conv, then per level an optional down block and `num_blocks` blocks.
        # Every encoder output (conv_in included) is kept as a skip for the decoder.
        self.conv_in = nn.Conv2d(in_channels, model_channels, kernel_size=3, padding=1)
        _init_xavier(self.conv_in)
        self.enc = nn.ModuleList()
        skip_channels = [model_channels]
        cout = model_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(UNetBlock(cout, cout, resample="down", **block))
                skip_channels.append(cout)
            for _ in range(num_blocks):
                self.enc.append(UNetBlock(cout, model_channels * mult, attention=res in attn_resolutions, **block))
                cout = model_channels * mult
                skip_channels.append(cout)

        # Decoder: at the bottom two middle blocks (the first with attention), elsewhere an up
        # block; then `num_blocks + 1` blocks per level, each eating one skip.
        self.dec = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec.append(UNetBlock(cout, cout, attention=True, **block))
                self.dec.append(UNetBlock(cout, cout, **block))
            else:
                self.dec.append(UNetBlock(cout, cout, resample="up", **block))
            for idx in range(num_blocks + 1):
                cin = cout + skip_channels.pop()
                cout = model_channels * channel_mult[level]
                attn = idx == num_blocks and res in attn_resolutions
                self.dec.append(UNetBlock(cin, cout, attention=attn, takes_skip=True, **block))
        assert not skip_channels, "every encoder skip must be consumed exactly once"

        self.norm_out = _group_norm(cout, eps, silu=True)
        self.conv_out = nn.Conv2d(cout, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def last_layer_weight(self) -> nn.Parameter:
        """Weight of the final output conv (for VQGAN-style adaptive loss weights)."""
        return self.conv_out.weight

    def forward(
        self,
        x_in: torch.Tensor,
        noise_t: torch.Tensor,
        noise_s: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_inputs(
            x_in, noise_t, noise_s, class_labels, self.num_classes,
            (self.in_channels, self.img_resolution, self.img_resolution),
        )
        return self.conv_out(self._trunk(x_in, noise_t, noise_s, class_labels)).to(x_in.dtype)

    def _trunk(self, x_in: torch.Tensor, noise_t: torch.Tensor, noise_s: torch.Tensor,
               class_labels: torch.Tensor | None) -> torch.Tensor:
        """All but the output conv (CompilableTrunk)."""
        emb_t, emb_s = self.embed(noise_t, noise_s, class_labels)

        x = self.conv_in(x_in.to(self.conv_in.weight.dtype))
        skips = [x]
        for blk in self.enc:
            x = blk(x, emb_t, emb_s)
            skips.append(x)
        for blk in self.dec:
            if blk.takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb_t, emb_s)
        return self.norm_out(x)
