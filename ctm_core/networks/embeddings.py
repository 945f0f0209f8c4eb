"""Noise-level and class embeddings shared by the CTM backbones.

A CTM network is conditioned on two noise levels: the start time t and the target time s.
Both arrive as EDM's c_noise = ln(sigma) / 4. They go through one shared sinusoidal map
(no parameters, so sharing costs nothing and keeps t and s on the same footing) and then
through two *separate* mapping MLPs, because the network must be able to tell the two roles
apart. An optional class embedding is added to both, mirroring the official CIFAR-10 CTM.
"""

from __future__ import annotations

import torch
from torch import nn


class PositionalEmbedding(nn.Module):
    """Sinusoidal features of a batch of scalars: (B,) -> (B, num_channels), laid out [sin, cos].

    Frequencies run geometrically from `scale` down to scale/max_positions. Two conventions of
    the official CTM code are covered:
    - DDPM++ / EDM (CIFAR-10 CTM): scale=1, endpoint=True on c_noise = ln(sigma)/4.
    - ADM (ImageNet CTM feeds 250 ln(sigma) = 1000 c_noise): scale=1000, endpoint=False.
    """

    def __init__(self, num_channels: int, max_positions: float = 10000.0, endpoint: bool = True,
                 scale: float = 1.0):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"num_channels must be an even number >= 2, got {num_channels}")
        half = num_channels // 2
        denom = max(half - 1, 1) if endpoint else half
        exponents = torch.arange(half, dtype=torch.float32) / denom
        # A buffer (not persistent) so that .to(device) moves it and torch.compile sees a constant.
        self.register_buffer("freqs", scale * (1.0 / max_positions) ** exponents, persistent=False)
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x.to(torch.float32)[:, None] * self.freqs[None, :].to(torch.float32)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


def _mapping_mlp(in_features: int, out_features: int) -> nn.Sequential:
    """Two-layer MLP that turns positional features into the block conditioning vector."""
    return nn.Sequential(
        nn.Linear(in_features, out_features),
        nn.SiLU(),
        nn.Linear(out_features, out_features),
        nn.SiLU(),
    )


class TimeEmbedding(nn.Module):
    """Maps (c_noise(t), c_noise(s), class label) to the pair (emb_t, emb_s).

    noise_channels: width of the sinusoidal features (and of the class embedding, which is
    added to them before the mapping MLPs, as in DDPM++).
    emb_channels: width of emb_t and emb_s.
    positional: keyword arguments of PositionalEmbedding (frequency convention).
    """

    def __init__(self, noise_channels: int, emb_channels: int, num_classes: int = 0, **positional):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.map_noise = PositionalEmbedding(noise_channels, **positional)
        self.map_label = nn.Embedding(num_classes, noise_channels) if num_classes > 0 else None
        self.map_t = _mapping_mlp(noise_channels, emb_channels)
        self.map_s = _mapping_mlp(noise_channels, emb_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for layer in (*self.map_t, *self.map_s):
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        if self.map_label is not None:
            # Unit-variance entries: the same scale as the sin/cos features they are added to.
            nn.init.normal_(self.map_label.weight)

    def forward(
        self,
        noise_t: torch.Tensor,
        noise_s: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.map_t[0].weight.dtype
        pos_t = self.map_noise(noise_t).to(dtype)
        pos_s = self.map_noise(noise_s).to(dtype)
        if self.map_label is not None and class_labels is not None:
            label = self.map_label(class_labels).to(dtype)
            pos_t = pos_t + label
            pos_s = pos_s + label
        return self.map_t(pos_t), self.map_s(pos_s)


def check_inputs(
    x_in: torch.Tensor,
    noise_t: torch.Tensor,
    noise_s: torch.Tensor,
    class_labels: torch.Tensor | None,
    num_classes: int,
    data_shape: tuple[int, ...],
) -> None:
    """Validate the backbone call; every failure is a ValueError naming the argument.

    Only shapes and dtypes are checked (static under torch.compile); label *values* are not,
    since that would need a device sync. nn.Embedding rejects out-of-range labels itself.
    """
    if not isinstance(x_in, torch.Tensor):
        raise ValueError(f"x_in must be a torch.Tensor, got {type(x_in).__name__}")
    if x_in.dim() != 1 + len(data_shape) or tuple(x_in.shape[1:]) != tuple(data_shape):
        raise ValueError(
            f"x_in must have shape (B, {', '.join(map(str, data_shape))}), got {tuple(x_in.shape)}"
        )
    if not x_in.is_floating_point():
        raise ValueError(f"x_in must be a floating-point tensor, got dtype {x_in.dtype}")
    batch = x_in.shape[0]
    for name, value in (("noise_t", noise_t), ("noise_s", noise_s)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape ({batch},), got {type(value).__name__}")
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must have shape ({batch},) to match x_in, got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if num_classes > 0:
        if class_labels is None:
            raise ValueError(f"class_labels is required: the backbone was built with num_classes={num_classes}")
        if not isinstance(class_labels, torch.Tensor):
            raise ValueError(f"class_labels must be a torch.Tensor, got {type(class_labels).__name__}")
        if class_labels.dim() != 1 or class_labels.shape[0] != batch:
            raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
            raise ValueError(f"class_labels must hold integer class indices, got dtype {class_labels.dtype}")
    elif class_labels is not None:
        raise ValueError("class_labels was given but the backbone is unconditional (num_classes=0)")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (works on meta-device modules, which allocate nothing)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["PositionalEmbedding", "TimeEmbedding", "check_inputs", "count_parameters"]
