"""CTM losses as pure functions of networks, data, noise and sampled times.

Each loss returns a per-sample value (B,) so callers choose the reduction and can log spreads.
Randomness comes in through explicit torch.Generator arguments, never global state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from .data import to_device
from .parameterization import CTMModel
from .process import VEProcess, broadcast_time, karras_time

Distance = Callable[[Tensor, Tensor], Tensor]  # (B,...), (B,...) -> (B,)
Solver = Callable[[Tensor, Tensor, Tensor], Tensor]  # x_t, t_idx, u_idx -> x_u


# ----------------------------------------------------------------------------------------------
# Distances d(x, y) -> (B,)

def l2_distance(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per sample."""
    return (x - y).square().flatten(1).mean(1)


def l1_distance(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute error per sample."""
    return (x - y).abs().flatten(1).mean(1)


def pseudo_huber_distance(x: Tensor, y: Tensor, c: float | None = None) -> Tensor:
    """sqrt(||x - y||^2 + c^2) - c; c defaults to 0.00054 sqrt(dim) (Song & Dhariwal 2023, iCT)."""
    diff = (x - y).flatten(1)
    c = 0.00054 * diff.shape[1] ** 0.5 if c is None else c
    return (diff.square().sum(1) + c * c).sqrt() - c


DISTANCES: dict[str, Distance] = {"l2": l2_distance, "l1": l1_distance, "pseudo_huber": pseudo_huber_distance}


def make_distance(name: str, lpips: Distance | None = None) -> Distance:
    """The distance by name; 'lpips' needs the LPIPS module (built from the local weight cache)."""
    if name == "lpips":
        if lpips is None:
            raise ValueError("distance 'lpips' needs an LPIPS module (ctm_core.lpips_distance.LPIPSDistance)")
        return lpips
    if name not in DISTANCES:
        raise ValueError(f"distance must be one of {sorted(DISTANCES) + ['lpips']}, got {name!r}")
    return DISTANCES[name]


# ----------------------------------------------------------------------------------------------
# Denoising score matching on the diagonal g(x_t, t, t)

def dsm_uniform_rows(batch: int, uniform_fraction: float) -> Tensor:
    """Which rows of a DSM batch take rho-schedule times: spread evenly, not the last block of the batch.

    The official code draws its half/half mixture inside each microbatch, so each microbatch's adaptive
    lambda_DSM sees both halves. Our times are drawn once for the global batch and then sliced per rank
    and microbatch; with evenly spread rows every contiguous slice of m rows holds floor or ceil of
    m * uniform_fraction of them, whatever the GPU count or microbatch.
    """
    index = torch.arange(batch, dtype=torch.float64)
    return torch.floor((index + 1) * uniform_fraction) > torch.floor(index * uniform_fraction)


def sample_dsm_times(batch: int, process: VEProcess, generator: torch.Generator | None = None,
                     p_mean: float = -1.2, p_std: float = 1.2, uniform_fraction: float = 0.5,
                     xi_max: float = 0.7, device: torch.device | str = "cpu") -> Tensor:
    """The paper's DSM times: log-normal(p_mean, p_std^2) on a (1 - uniform_fraction) share of the rows,
    the rho-schedule at xi ~ U[0, xi_max] (biased towards large noise) on the rows `dsm_uniform_rows`
    picks. Clamped to the process range so the network only sees times it is defined on."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0 <= uniform_fraction <= 1:
        raise ValueError(f"uniform_fraction must lie in [0, 1], got {uniform_fraction}")
    if not 0 < xi_max <= 1:
        raise ValueError(f"xi_max must lie in (0, 1], got {xi_max}")
    uniform_rows = dsm_uniform_rows(batch, uniform_fraction)
    n_uniform = int(uniform_rows.sum())
    t = torch.empty(batch, dtype=torch.float64)
    t[~uniform_rows] = (p_mean + p_std * torch.randn(batch - n_uniform, generator=generator,
                                                     dtype=torch.float64)).exp()
    t[uniform_rows] = karras_time(torch.rand(n_uniform, generator=generator, dtype=torch.float64) * xi_max,
                                  process)
    return t.clamp(process.sigma_min, process.sigma_max).to(device=device, dtype=torch.float32)


def edm_loss_weight(t: Tensor, sigma_data: float) -> Tensor:
    """lambda(t) = (t^2 + sd^2) / (t sd)^2: makes the EDM-preconditioned loss unit-scale at every t."""
    return (t ** 2 + sigma_data ** 2) / (t * sigma_data) ** 2


def dsm_loss(denoiser: Callable[[Tensor, Tensor], Tensor], x0: Tensor, t: Tensor, noise: Tensor,
             weighting: Literal["edm", "uniform"] = "edm", sigma_data: float = 0.5) -> Tensor:
    """L_DSM = w(t) mean_dims (D(x0 + t noise, t) - x0)^2, per sample.

    With weighting='uniform' its expectation at the exact denoiser is E[tr Var(x0 | x_t)] / dim:
    the irreducible error, which the tests check against the closed-form mixture posterior.
    """
    return dsm_error(denoiser(x0 + broadcast_time(t, x0) * noise, t), x0, t, weighting, sigma_data)


def dsm_error(denoised: Tensor, x0: Tensor, t: Tensor, weighting: Literal["edm", "uniform"] = "edm",
              sigma_data: float = 0.5) -> Tensor:
    """dsm_loss from the denoiser's output D(x0 + t noise, t), for callers that computed it themselves
    (the CTM objective runs it in one network call with the student's jump)."""
    if weighting not in ("edm", "uniform"):
        raise ValueError(f"weighting must be 'edm' or 'uniform', got {weighting!r}")
    err = l2_distance(denoised, x0)
    return err * edm_loss_weight(t, sigma_data).to(err.dtype) if weighting == "edm" else err


# ----------------------------------------------------------------------------------------------
# Soft consistency (CTM) and consistency distillation (CD)

@dataclass(frozen=True)
class GridTimes:
    """Grid indices of one CTM draw: t = grid[t_idx] > u = grid[u_idx] >= s = grid[s_idx].

    s_at_end: every s is the grid's last point, sigma_min (s_strategy 'min', CD). Known when the
    indices are drawn on the host, so the loss can skip the outer jump s -> sigma_min, the identity
    G(x, s, s) = x, without reading the indices back from the device.
    steps: the solver's step count u_idx - t_idx, the same for every sample of a draw (k; CD: 1),
    so the teacher's solver need not read the indices back either (None: not known).
    """

    t_idx: Tensor
    u_idx: Tensor
    s_idx: Tensor
    s_at_end: bool = False
    steps: int | None = None

    def rows(self, lo: int, hi: int, device: torch.device | str) -> "GridTimes":
        """A microbatch's slice, on its device."""
        return GridTimes(to_device(self.t_idx[lo:hi], device), to_device(self.u_idx[lo:hi], device),
                         to_device(self.s_idx[lo:hi], device), self.s_at_end, self.steps)


def solver_step_weights(num_points: int, max_steps: int, step_weight_power: float = 1.0) -> Tensor:
    """Unnormalised P(k) of the teacher's solver step count k = 1..min(K, N-1): k^power (official code)."""
    return torch.arange(1, min(max_steps, num_points - 1) + 1, dtype=torch.float64) ** step_weight_power


def sample_ctm_times(batch: int, num_points: int, max_steps: int, generator: torch.Generator | None = None,
                     step_weight_power: float = 1.0, s_strategy: Literal["uniform", "min"] = "uniform",
                     device: torch.device | str = "cpu") -> tuple[GridTimes, int]:
    """The official code's draw: one solver step count k per iteration with P(k) ~ k^power on
    1..min(K, N-1); per sample n ~ U{0..N-1-k}, u = n + k, and s ~ U{n+k..N-1} ('min': s = sigma_min).
    Returns the indices and k (all ranks must use the same k: the trainer broadcasts the generator seed)."""
    if num_points < 2:
        raise ValueError(f"num_points (N) must be >= 2, got {num_points}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if s_strategy not in ("uniform", "min"):
        raise ValueError(f"s_strategy must be 'uniform' or 'min', got {s_strategy!r}")
    weights = solver_step_weights(num_points, max_steps, step_weight_power)
    k = int(torch.multinomial(weights, 1, generator=generator).item()) + 1
    n = torch.randint(0, num_points - k, (batch,), generator=generator)
    u = n + k
    if s_strategy == "min":
        s = torch.full_like(u, num_points - 1)
    else:
        s = u + (torch.rand(batch, generator=generator, dtype=torch.float64) * (num_points - u)).long()
    return GridTimes(n.to(device), u.to(device), s.to(device), s_strategy == "min", k), k


def sample_cd_times(batch: int, num_points: int, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> GridTimes:
    """Consistency distillation: adjacent grid points t_n > t_{n+1}, jump target fixed at sigma_min."""
    if num_points < 2:
        raise ValueError(f"num_points (N) must be >= 2, got {num_points}")
    n = torch.randint(0, num_points - 1, (batch,), generator=generator)
    return GridTimes(n.to(device), (n + 1).to(device), torch.full_like(n, num_points - 1).to(device), True, 1)


class CTMTerms(NamedTuple):
    """What the CTM loss computes: the per-sample distance, the estimate x_est the GAN term judges,
    and the student's jump G_student(x_t, t, s), the only place where gradients enter the student."""

    distance: Tensor
    x_est: Tensor
    jump: Tensor


def ctm_loss(student: CTMModel, target: CTMModel, solver: Solver, x0: Tensor, noise: Tensor,
             times: GridTimes, grid: Tensor, distance: Distance = l2_distance,
             target_inner: Literal["student", "target"] = "student", end_time: float | None = None,
             class_labels: Tensor | None = None,
             student_jump: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> CTMTerms:
    """Soft consistency matching, built as the official code builds it.

        x_est    = G_target(G_student(x_t, t, s), s, end)               (gradient through both calls,
                                                                         target parameters frozen)
        x_target = G_target(G_inner(Solver(x_t, t -> u), u, s), s, end)  (no gradient)

    G_inner is the online student under stop-grad (official code, target_inner='student') or the
    EMA target (the paper's text, target_inner='target'). `end` defaults to sigma_min as in the
    code (the paper writes 0). With s = end and u = the next grid point and target_inner='target'
    this is consistency distillation. Returns d(x_est, x_target) per sample, x_est and the student's
    jump (CTMTerms). `student_jump(x_t, t, s)` replaces the student's own jump (labels included)
    where a caller computes it with more in the same network call. Where every s is sigma_min
    (times.s_at_end) and `end` is sigma_min too, the outer jumps are the identity G(x, s, s) = x and
    are skipped: the same numbers, two target network calls (and a backward through one) fewer per step.
    """
    if target_inner not in ("student", "target"):
        raise ValueError(f"target_inner must be 'student' or 'target', got {target_inner!r}")
    if any(p.requires_grad for p in target.parameters()):
        raise ValueError("target must be frozen (requires_grad=False): it is the stop-grad network")
    end = student.process.sigma_min if end_time is None else end_time
    grid = grid.to(device=x0.device, dtype=x0.dtype)
    t, u, s = grid[times.t_idx], grid[times.u_idx], grid[times.s_idx]
    x_t = x0 + broadcast_time(t, x0) * noise
    outer_is_identity = times.s_at_end and end == student.process.sigma_min
    to_end = (lambda x: x) if outer_is_identity else (lambda x: target.jump(x, s, end, class_labels))
    # The solver first: on a GPU its teacher calls are replayed graphs that take the host almost no time,
    # so the GPU has them queued while the host launches the student's eager passes one by one.
    with torch.no_grad(), record_function("ctm/solver"):
        x_u = solver(x_t, times.t_idx, times.u_idx)
    with record_function("ctm/estimate"):
        jump = student.jump(x_t, t, s, class_labels) if student_jump is None else student_jump(x_t, t, s)
        x_est = to_end(jump)
    with torch.no_grad():
        with record_function("ctm/target"):
            inner = student if target_inner == "student" else target
            x_target = to_end(inner.jump(x_u, u, s, class_labels))
    with record_function("ctm/distance"):
        return CTMTerms(distance(x_est, x_target), x_est, jump)


# ----------------------------------------------------------------------------------------------
# GAN (the official code's form: hinge discriminator, -logit generator)

def gan_generator_loss(fake_logits: Sequence[Tensor]) -> Tensor:
    """Mean of -logit over every head and patch (scalar)."""
    if not fake_logits:
        raise ValueError("fake_logits must hold at least one head's logits")
    return torch.stack([(-logits).mean() for logits in fake_logits]).mean()


def gan_discriminator_loss(real_logits: Sequence[Tensor], fake_logits: Sequence[Tensor]) -> Tensor:
    """Hinge loss: relu(1 - D(real)) + relu(1 + D(fake)), averaged over heads (scalar)."""
    if len(real_logits) != len(fake_logits) or not real_logits:
        raise ValueError("real_logits and fake_logits must hold the same (non-zero) number of heads")
    per_head = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits)]
    return torch.stack(per_head).mean()


# ----------------------------------------------------------------------------------------------
# Weighting

def last_layer_grad_norm(output: Tensor, last_layer: Tensor, grad_output: Tensor | None = None) -> Tensor:
    """||d <output, grad_output> / d W|| at the last layer W: of a scalar loss (grad_output None), or of
    a term whose gradient grad_output at an intermediate output is already known (the graph is kept
    for the real backward pass)."""
    grad, = torch.autograd.grad(output, last_layer, grad_output, retain_graph=True)
    return grad.norm()


def adaptive_weight(reference_norm: Tensor, term_norm: Tensor, min_value: float = 0.0, max_value: float = 1e4,
                    eps: float = 1e-4) -> Tensor:
    """reference_norm / (term_norm + eps), clamped and detached: both norms are last-layer gradient
    norms (last_layer_grad_norm), the reference the CTM term's, computed once per step.

    Balances a term against the CTM loss without tuning its scale (VQGAN; the official code).
    """
    return (reference_norm / (term_norm + eps)).clamp(min_value, max_value).detach()


def discriminator_loss(discriminator: Callable[[Tensor], Sequence[Tensor]], real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's step: fake is detached, so this loss never reaches the generator. A
    discriminator with `real_and_fake_logits` (the projected one) computes both sides' logits in one
    pass through its frozen feature networks."""
    pair = getattr(discriminator, "real_and_fake_logits", None)
    if pair is not None:
        return gan_discriminator_loss(*pair(real, fake.detach()))
    return gan_discriminator_loss(discriminator(real), discriminator(fake.detach()))


def generator_adversarial_loss(discriminator: torch.nn.Module, fake: Tensor) -> Tensor:
    """The generator's GAN term with the discriminator's parameters frozen for the call, so the
    generator's backward pass leaves the discriminator untouched (gradients flow only to `fake`)."""
    flags = [p.requires_grad for p in discriminator.parameters()]
    discriminator.requires_grad_(False)
    try:
        return gan_generator_loss(discriminator(fake))
    finally:
        for p, flag in zip(discriminator.parameters(), flags):
            p.requires_grad_(flag)
