"""Isotropic Gaussian mixtures: data whose denoiser and PF-ODE flow are known in closed form.

They are the oracle that makes solvers, G and the losses testable exactly, and a teacher that
needs no training. Components (w_k, mu_k, s_k^2 I); under x_t = x_0 + t eps the posterior is

    D(x, t) = sum_k r_k(x, t) [mu_k + s_k^2 / (s_k^2 + t^2) (x - mu_k)],
    r_k proportional to w_k N(x; mu_k, (s_k^2 + t^2) I).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianMixture:
    weights: tuple[float, ...]
    means: tuple[tuple[float, ...], ...]
    stds: tuple[float, ...]

    def __post_init__(self) -> None:
        w, m, s = np.asarray(self.weights, float), np.asarray(self.means, float), np.asarray(self.stds, float)
        if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or not np.isclose(w.sum(), 1.0):
            raise ValueError(f"weights must be a non-empty 1-D probability vector, got {self.weights}")
        if m.ndim != 2 or m.shape[0] != len(w):
            raise ValueError(f"means must have shape (K={len(w)}, D), got {m.shape}")
        if s.shape != w.shape or np.any(s <= 0):
            raise ValueError(f"stds must be {len(w)} positive numbers, got {self.stds}")

    @property
    def dim(self) -> int:
        return len(self.means[0])

    def _params(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        kw = dict(dtype=torch.float64, device=like.device)
        return (torch.tensor(self.weights, **kw), torch.tensor(self.means, **kw), torch.tensor(self.stds, **kw))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples (float32) drawn with the given generator."""
        w, m, s = self._params(torch.empty(0))
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return (m[k] + s[k, None] * eps).float()

    def _posterior(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Per component: posterior probability r (B,K), mean (B,K,D) and per-dimension variance (B,K)."""
        x64 = x.double()
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        w, m, s = self._params(x)
        var = s[None, :] ** 2 + t64[:, None] ** 2
        sq = ((x64[:, None, :] - m[None]) ** 2).sum(-1)
        r = torch.softmax(w.log()[None] - 0.5 * sq / var - 0.5 * self.dim * var.log(), dim=1)
        shrink = s[None, :] ** 2 / var
        means = m[None] + shrink[..., None] * (x64[:, None, :] - m[None])
        return r, means, shrink * t64[:, None] ** 2

    def denoiser(self, x: Tensor, t: Tensor | float) -> Tensor:
        """E[x_0 | x_t = x] for x (B, D) at per-sample times t (B,) or a scalar."""
        r, means, _ = self._posterior(x, t)
        return (r[..., None] * means).sum(1).to(x.dtype)

    def posterior_variance(self, x: Tensor, t: Tensor | float) -> Tensor:
        """tr Var[x_0 | x_t = x] per sample (B,): the irreducible DSM error at x."""
        r, means, var = self._posterior(x, t)
        second = (r * (self.dim * var + (means ** 2).sum(-1))).sum(1)
        return second - ((r[..., None] * means).sum(1) ** 2).sum(-1)

    def flow(self, x: Tensor, t: Tensor | float, u: Tensor | float, rtol: float = 1e-10, atol: float = 1e-10) -> Tensor:
        """The exact PF-ODE map x_t -> x_u (u <= t, u > 0), integrated in log-time with scipy.

        Each sample has its own (t, u): in tau in [0, 1], t(tau) = t^(1-tau) u^tau, so all samples
        share one integration interval and one solve_ivp call.
        """
        from scipy.integrate import solve_ivp

        x64 = x.detach().double().cpu()
        b = x64.shape[0]
        t64 = torch.as_tensor(t, dtype=torch.float64).expand(b).clone()
        u64 = torch.as_tensor(u, dtype=torch.float64).expand(b).clone()
        if torch.any(u64 <= 0) or torch.any(u64 > t64):
            raise ValueError("flow needs 0 < u <= t for every sample")
        log_ratio = (u64 / t64).log()

        def rhs(tau: float, y: np.ndarray) -> np.ndarray:
            xs = torch.from_numpy(y).reshape(b, -1)
            times = t64 ** (1 - tau) * u64 ** tau
            dx_dlogt = xs - self.denoiser(xs, times)
            return (dx_dlogt * log_ratio[:, None]).reshape(-1).numpy()

        sol = solve_ivp(rhs, (0.0, 1.0), x64.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"exact flow integration failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1]).reshape(x.shape).to(dtype=x.dtype, device=x.device)
