"""Deterministic PF-ODE solvers (EDM's Euler and Heun), batched over per-sample time paths.

The PF-ODE of the VE process is dx/dt = (x - D(x, t)) / t. A solver walks a *path* of times
(S+1, B): column b is sample b's schedule. A step whose two times are equal is an exact no-op,
so samples needing fewer steps than others simply repeat their end time. A step that ends at
t = 0 is an Euler step (Heun would divide by zero), as in EDM's sampler.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]  # D(x (B,...), t (B,)) -> E[x_0 | x_t]
SolverName = Literal["euler", "heun"]


def _expand(t: Tensor, x: Tensor) -> Tensor:
    t = t if t.dtype == torch.bool else t.to(x.dtype)
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def euler_step(denoiser: Denoiser, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One first-order step from t to t_next (both (B,))."""
    d = (x - denoiser(x, t)) / _expand(t, x)
    return x + _expand(t_next - t, x) * d


def heun_step(denoiser: Denoiser, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One second-order (trapezoidal) step from t to t_next; Euler where t_next == 0."""
    h = _expand(t_next - t, x)
    d = (x - denoiser(x, t)) / _expand(t, x)
    x_euler = x + h * d
    t_safe = torch.where(t_next > 0, t_next, torch.ones_like(t_next))
    d_next = (x_euler - denoiser(x_euler, t_safe)) / _expand(t_safe, x)
    x_heun = x + h * (0.5 * d + 0.5 * d_next)
    return torch.where(_expand(t_next > 0, x), x_heun, x_euler)


_STEPS = {"euler": euler_step, "heun": heun_step}


def solve_path(denoiser: Denoiser, x: Tensor, path: Tensor, method: SolverName = "heun",
               check_path: bool = True) -> Tensor:
    """Integrate along per-sample time paths (S+1, B), S steps in all."""
    if method not in _STEPS:
        raise ValueError(f"method must be one of {sorted(_STEPS)}, got {method!r}")
    if path.ndim != 2 or path.shape[1] != x.shape[0]:
        raise ValueError(f"path must have shape (steps+1, {x.shape[0]}), got {tuple(path.shape)}")
    if check_path and torch.any(path[1:] > path[:-1]):  # a host sync: grid paths skip it
        raise ValueError("path must be non-increasing in time (the solver integrates towards the data)")
    step = _STEPS[method]
    for i in range(path.shape[0] - 1):
        x = step(denoiser, x, path[i], path[i + 1])
    return x


def grid_path(grid: Tensor, start_idx: Tensor, end_idx: Tensor, max_steps: int | None = None,
              num_steps: int | None = None) -> Tensor:
    """Per-sample paths along the grid from index start_idx to end_idx (both (B,) long).

    Sample b takes end_idx[b] - start_idx[b] grid steps; the path is padded with its end time.
    num_steps: the largest of those, where the caller drew the indices on the host and knows it
    (GridTimes.steps); the indices are then not read back from the device to check them.
    """
    if start_idx.shape != end_idx.shape or start_idx.ndim != 1:
        raise ValueError("start_idx and end_idx must be 1-D tensors of equal shape")
    steps = end_idx - start_idx
    if num_steps is None:
        if torch.any(start_idx < 0) or torch.any(end_idx >= len(grid)):
            raise ValueError(f"grid indices must lie in [0, {len(grid) - 1}]")
        if torch.any(steps < 0):
            raise ValueError("end_idx must be >= start_idx (u must not be noisier than t)")
        num_steps = int(steps.max().item()) if steps.numel() else 0
    if max_steps is not None and num_steps > max_steps:
        raise ValueError(f"max_steps={max_steps} is exceeded: a sample needs {num_steps} solver steps")
    offsets = torch.arange(num_steps + 1, device=start_idx.device)[:, None]
    idx = start_idx[None, :] + torch.minimum(offsets, steps[None, :])
    return grid.to(start_idx.device)[idx]


def solve_on_grid(denoiser: Denoiser, x: Tensor, grid: Tensor, start_idx: Tensor, end_idx: Tensor,
                  method: SolverName = "heun", max_steps: int | None = None, num_steps: int | None = None) -> Tensor:
    """Solve each sample from grid[start_idx] to grid[end_idx]: the CTM teacher's t -> u segment.
    A grid path never increases (the grid decreases and grid_path checks the indices, or the host
    drew them), so solve_path does not check it again."""
    path = grid_path(grid, start_idx, end_idx, max_steps, num_steps).to(x.dtype)
    return solve_path(denoiser, x, path, method, check_path=False)
