"""Residual MLP backbone for vector data (B, dim): the workhorse for 1-D/2-D toy problems."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .embeddings import TimeEmbedding, check_inputs
from .trunk import CompilableTrunk


class FiLMResidualBlock(nn.Module):
    """x + MLP(FiLM(LayerNorm(x))), where the FiLM scale/shift is film_t(emb_t) + film_s(emb_s).

    t and s get separate affine maps (summed) so that the block can respond to each on its own,
    the same way the official CTM U-Nets condition every residual block.
    """

    def __init__(self, hidden: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.film_t = nn.Linear(emb_dim, 2 * hidden)
        self.film_s = nn.Linear(emb_dim, 2 * hidden)
        self.fc0 = nn.Linear(hidden, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, emb_t: torch.Tensor, emb_s: torch.Tensor) -> torch.Tensor:
        scale, shift = (self.film_t(emb_t) + self.film_s(emb_s)).chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm(x), scale + 1)
        h = self.fc0(F.silu(h))
        h = F.dropout(F.silu(h), p=self.dropout, training=self.training)
        return x + self.fc1(h)


class MLPBackbone(CompilableTrunk, nn.Module):
    """F_theta(x_in, c_noise(t), c_noise(s)[, label]) for data of shape (B, dim).

    The output layer starts at zero, so a fresh model returns F = 0 and the CTM wrapper's
    g = c_skip * x at initialisation (a sane, bounded start).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 128,
        num_classes: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth), ("emb_dim", emb_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if emb_dim % 2:
            raise ValueError(f"emb_dim must be even (sin/cos pairs), got {emb_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim = dim
        self.num_classes = num_classes
        # ADM-style frequencies (0.1 .. 1000 per unit of c_noise): the EDM/DDPM++ range (1e-4 .. 1)
        # leaves most features nearly constant over c_noise in [-1.6, 1.1], which a small MLP
        # cannot afford. This matches the official ImageNet CTM's 250 ln(sigma) input.
        self.embed = TimeEmbedding(noise_channels=emb_dim, emb_channels=emb_dim, num_classes=num_classes,
                                   scale=1000.0, endpoint=False)
        self.proj_in = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(FiLMResidualBlock(hidden, emb_dim, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def last_layer_weight(self) -> nn.Parameter:
        """Weight of the final output layer (for VQGAN-style adaptive loss weights)."""
        return self.proj_out.weight

    def forward(
        self,
        x_in: torch.Tensor,
        noise_t: torch.Tensor,
        noise_s: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_inputs(x_in, noise_t, noise_s, class_labels, self.num_classes, (self.dim,))
        return self.proj_out(self._trunk(x_in, noise_t, noise_s, class_labels)).to(x_in.dtype)

    def _trunk(self, x_in: torch.Tensor, noise_t: torch.Tensor, noise_s: torch.Tensor,
               class_labels: torch.Tensor | None) -> torch.Tensor:
        """All but the output layer (CompilableTrunk)."""
        emb_t, emb_s = self.embed(noise_t, noise_s, class_labels)
        x = self.proj_in(x_in.to(self.proj_in.weight.dtype))
        for block in self.blocks:
            x = block(x, emb_t, emb_s)
        return F.silu(self.norm_out(x))
