"""Shared fixtures: a Gaussian-mixture oracle and tiny networks built here (no downloads)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ctm_core import CTMModel, GaussianMixture, VEProcess


class TinyBackbone(nn.Module):
    """A small conditioned MLP: enough to test wiring without the real networks."""

    def __init__(self, dim: int = 2, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, noise_t, noise_s, class_labels=None):
        flat = x.flatten(1)
        h = self.net(torch.cat([flat, noise_t[:, None].to(x.dtype), noise_s[:, None].to(x.dtype)], 1))
        return self.out(h).reshape(x.shape)

    def last_layer_weight(self):
        return self.out.weight


class ExactFlow(nn.Module):
    """G = the mixture's exact PF-ODE flow: the ideal CTM network, parameter-free."""

    def __init__(self, mixture: GaussianMixture, process: VEProcess):
        super().__init__()
        self.mixture, self.process = mixture, process

    def jump(self, x, t, s, class_labels=None):
        return self.mixture.flow(x, t, s)


@pytest.fixture(scope="session")
def process() -> VEProcess:
    return VEProcess()


@pytest.fixture(scope="session")
def mixture() -> GaussianMixture:
    return GaussianMixture(weights=(0.5, 0.3, 0.2), means=((-1.0, 0.0), (1.0, 0.5), (0.0, -1.2)),
                           stds=(0.15, 0.25, 0.1))


def make_tiny_model(process: VEProcess, dim: int = 2, seed: int = 0) -> CTMModel:
    torch.manual_seed(seed)
    backbone = TinyBackbone(dim)
    nn.init.normal_(backbone.out.weight, std=0.1)
    return CTMModel(backbone, process)
