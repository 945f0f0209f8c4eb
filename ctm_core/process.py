"""The EDM variance-exploding process and its Karras time grid.

x_t = x_0 + t * eps, so the noise level *is* the time. Index 0 of the grid is sigma_max and
index N-1 is sigma_min, as in the official CTM code: a larger index means less noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_TIME_RTOL = 1e-5  # float32 grid values may sit a hair outside [sigma_min, sigma_max]


@dataclass(frozen=True)
class VEProcess:
    """Noise range, grid curvature and data scale shared by every CTM component."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if not self.sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got {self.sigma_min}")
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min ({self.sigma_min}), got {self.sigma_max}")
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")


def karras_time(xi: Tensor, process: VEProcess) -> Tensor:
    """Continuous rho-schedule: xi = 0 gives sigma_max, xi = 1 gives sigma_min."""
    lo, hi = process.sigma_min ** (1 / process.rho), process.sigma_max ** (1 / process.rho)
    return (hi + xi * (lo - hi)) ** process.rho


def karras_grid(num_points: int, process: VEProcess, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> Tensor:
    """The N-point grid t_0 = sigma_max > ... > t_{N-1} = sigma_min (float64 by default for exactness)."""
    if not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points (N) must be an int >= 2, got {num_points!r}")
    xi = torch.arange(num_points, dtype=torch.float64) / (num_points - 1)
    grid = karras_time(xi, process)
    grid[0], grid[-1] = process.sigma_max, process.sigma_min  # exact end points
    return grid.to(dtype=dtype, device=device)


def broadcast_time(t: Tensor | float, x: Tensor) -> Tensor:
    """A per-sample time (B,) or scalar as a tensor broadcastable against x (B, ...).

    A number becomes a fill on x's device: as_tensor would copy it from pageable host memory,
    which on a GPU makes the host wait until all queued work has run."""
    if isinstance(t, Tensor):
        t = t.to(dtype=x.dtype, device=x.device)
    else:
        t = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"time must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def check_time_range(t: Tensor, process: VEProcess, name: str) -> None:
    """Refuse times outside [sigma_min, sigma_max]: the networks never saw them."""
    lo = process.sigma_min * (1 - _TIME_RTOL)
    hi = process.sigma_max * (1 + _TIME_RTOL)
    if torch.any(~torch.isfinite(t)) or torch.any(t < lo) or torch.any(t > hi):
        raise ValueError(f"{name} must lie in [sigma_min={process.sigma_min}, sigma_max={process.sigma_max}], "
                         f"got values in [{t.min().item():.6g}, {t.max().item():.6g}]")


def check_jump_times(t: Tensor, s: Tensor, process: VEProcess) -> None:
    """A jump goes from t to an earlier (less noisy) time s in {0} U [sigma_min, t]."""
    check_time_range(t, process, "t")
    if torch.any(s < 0) or torch.any(s > t * (1 + _TIME_RTOL)):
        raise ValueError("s must satisfy 0 <= s <= t (CTM jumps only go towards the data); "
                         f"got s in [{s.min().item():.6g}, {s.max().item():.6g}]")
    inside = (s > 0) & (s < process.sigma_min * (1 - _TIME_RTOL))
    if torch.any(inside):
        raise ValueError(f"s must be 0 or >= sigma_min={process.sigma_min}; got {s[inside].min().item():.6g}")
