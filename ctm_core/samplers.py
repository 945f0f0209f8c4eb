"""Samplers: the teacher's Heun solver, CTM gamma-sampling, and CM multistep for CD models.

All take the starting noise z ~ N(0, I) explicitly (x_T = sigma_max z) and a generator for any
fresh noise, so two samplers fed the same z and seed are directly comparable.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .parameterization import CTMModel
from .process import VEProcess, karras_grid
from .solvers import Denoiser, SolverName, solve_path

ConsistencyFn = Callable[[Tensor, Tensor], Tensor]  # f(x_t, t) -> x at the end time


def _check_steps(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def heun_sample(denoiser: Denoiser, z: Tensor, num_steps: int, process: VEProcess,
                method: SolverName = "heun") -> Tensor:
    """EDM's deterministic sampler: the num_steps-point Karras grid then 0; the last step is Euler.

    NFE = 2 num_steps - 1 for Heun (CIFAR-10's 18 steps: NFE 35).
    """
    _check_steps("num_steps", num_steps)
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 for the Karras grid, got {num_steps}")
    times = torch.cat([karras_grid(num_steps, process), torch.zeros(1, dtype=torch.float64)]).to(z.device, z.dtype)
    path = times[:, None].expand(-1, z.shape[0])
    return solve_path(denoiser, z * process.sigma_max, path, method)


def heun_nfe(num_steps: int, method: SolverName = "heun") -> int:
    """Network evaluations heun_sample spends."""
    return 2 * num_steps - 1 if method == "heun" else num_steps


def gamma_sample(model: CTMModel, z: Tensor, nfe: int, gamma: float = 0.0,
                 generator: torch.Generator | None = None, class_labels: Tensor | None = None) -> Tensor:
    """CTM gamma-sampling on the (nfe+1)-point grid sigma_max -> sigma_min, one network call per step.

    At each step jump to s = sqrt(1 - gamma^2) (t_next - sigma_min) + sigma_min, then add noise of
    std sqrt(t_next^2 - s^2) to return to t_next (the official code's form). gamma = 0 is
    deterministic long jumps; gamma = 1 is the CM multistep sampler. The last step lands on
    sigma_min with no noise.
    """
    _check_steps("nfe", nfe)
    if not (isinstance(gamma, (int, float)) and 0 <= gamma <= 1):
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    process = model.process
    times = karras_grid(nfe + 1, process).tolist()
    x = z * process.sigma_max
    keep = math.sqrt(1 - gamma ** 2)
    for i in range(nfe):
        t, t_next = times[i], times[i + 1]
        if i == nfe - 1:
            return model.jump(x, t, t_next, class_labels)
        s = keep * (t_next - process.sigma_min) + process.sigma_min
        x = model.jump(x, t, s, class_labels)
        if gamma > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
            x = x + math.sqrt(max(t_next ** 2 - s ** 2, 0.0)) * noise
    return x


def cm_multistep_sample(consistency_fn: ConsistencyFn, z: Tensor, times: list[float], process: VEProcess,
                        generator: torch.Generator | None = None) -> Tensor:
    """Consistency-model multistep sampling (Song et al. 2023, Alg. 1) for CD baselines.

    x = f(sigma_max z, times[0]); then for each later time: re-noise to it and apply f again.
    """
    if not times or any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be a non-empty, strictly decreasing list, got {times}")
    x = consistency_fn(z * process.sigma_max, torch.full((z.shape[0],), times[0], dtype=z.dtype, device=z.device))
    for t in times[1:]:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        x = x + math.sqrt(t ** 2 - process.sigma_min ** 2) * noise
        x = consistency_fn(x, torch.full((z.shape[0],), t, dtype=z.dtype, device=z.device))
    return x


def ctm_consistency_fn(model: CTMModel, class_labels: Tensor | None = None) -> ConsistencyFn:
    """A CTM (or CD-trained) network as a consistency function f(x, t) = G(x, t, sigma_min)."""
    return lambda x, t: model.jump(x, t, model.process.sigma_min, class_labels)
