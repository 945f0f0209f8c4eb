"""Exponential moving averages of the student at several rates at once.

One training run then serves a whole mu ablation: every rate's average is evaluated and
checkpointed. The CTM target network (the stop-grad G_sg) is one of these averages.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn


def _check_rate(rate: float) -> float:
    if not (isinstance(rate, (int, float)) and 0 <= rate < 1):
        raise ValueError(f"mu (EMA rate) must lie in [0, 1), got {rate!r}")
    return float(rate)


class EMABank(nn.Module):
    """Frozen copies of a model, one per rate mu: theta_mu <- mu theta_mu + (1 - mu) theta."""

    def __init__(self, model: nn.Module, rates: Iterable[float]):
        super().__init__()
        self.rates = tuple(sorted({_check_rate(r) for r in rates}))
        if not self.rates:
            raise ValueError("rates must name at least one EMA rate mu")
        self.averages = nn.ModuleList(copy.deepcopy(model).requires_grad_(False) for _ in self.rates)

    def __getitem__(self, rate: float) -> nn.Module:
        try:
            return self.averages[self.rates.index(float(rate))]
        except ValueError:
            raise KeyError(f"no EMA with rate {rate}; rates are {self.rates}") from None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        for rate, average in zip(self.rates, self.averages):
            torch._foreach_lerp_(list(average.parameters()), params, 1.0 - rate)
            for b_avg, b in zip(average.buffers(), model.buffers()):
                b_avg.copy_(b)

    @torch.no_grad()
    def reset_to(self, model: nn.Module) -> None:
        """Copy the model into every average (start of training, student initialised from a teacher)."""
        for average in self.averages:
            average.load_state_dict(model.state_dict())
