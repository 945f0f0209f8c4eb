"""The per-microbatch training objectives as modules, so DistributedDataParallel sees one
forward and one backward per microbatch however many times the student is called inside.

Frozen networks (EMA target, teacher, discriminator) are held outside the module registry:
DDP must neither broadcast nor synchronise them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from .config import TrainConfig
from .losses import (Distance, GridTimes, adaptive_weight, ctm_loss, discriminator_loss, dsm_error, dsm_loss,
                     generator_adversarial_loss, last_layer_grad_norm)
from .parameterization import CTMModel
from .process import broadcast_time
from .solvers import solve_on_grid
from .teacher_graph import GraphedJumps


@dataclass
class MicroBatch:
    """One microbatch and the randomness drawn for it (a slice of the global step's draw)."""

    x0: Tensor
    labels: Tensor | None
    noise: Tensor          # for the CTM/CD term
    times: GridTimes | None
    dsm_noise: Tensor
    dsm_t: Tensor


@dataclass
class StepWeights:
    """Schedule values at this step; zero means the term is skipped entirely."""

    ctm: float
    dsm: float
    gan: float
    dsm_adaptive: bool
    gan_adaptive: bool
    dsm_clamp: tuple[float, float]
    gan_clamp: tuple[float, float]


class GeneratorObjective(nn.Module):
    """L = lambda_CTM L_CTM + lambda_DSM w_DSM L_DSM + lambda_GAN w_GAN L_GAN (mode 'edm': L_DSM only)."""

    def __init__(self, student: CTMModel, config: TrainConfig, grid: Tensor, distance: Distance,
                 target: CTMModel, teacher: CTMModel | None, discriminator: nn.Module | None,
                 graph_jumps: bool = False):
        super().__init__()
        self.student = student
        self.config = config
        self.register_buffer("grid", grid, persistent=False)
        self.distance = distance
        # graph_jumps: the no-grad jumps of the target branch replayed as CUDA graphs (GraphedJumps); a
        # plain dict holds the student's wrapper, so the student is not registered twice.
        wrap = GraphedJumps if graph_jumps else (lambda model: model)
        self._frozen = {"target": wrap(target), "teacher": teacher, "discriminator": discriminator}
        self._no_grad_calls = {"student": wrap(student)}

    def _solver(self, labels: Tensor | None, steps: int | None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """The t -> u segment: the teacher's Heun steps (`steps` of them at most, when the draw knows
        it), or (ctm_scratch) the EMA student's own jump."""
        target, teacher = self._frozen["target"], self._frozen["teacher"]
        if teacher is None:
            return lambda x, ti, ui: target.jump(x, self.grid[ti], self.grid[ui], labels)
        method, max_steps = self.config.teacher.solver, self.config.ctm.max_steps
        denoiser = lambda x, t: teacher.denoiser(x, t, labels)
        return lambda x, ti, ui: solve_on_grid(denoiser, x, self.grid, ti, ui, method, max_steps, steps)

    def _jump_with_dsm(self, batch: MicroBatch, denoised: list[Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """The student's jump G(x_t, t, s) with the DSM denoiser D(x_dsm, t_dsm) in the same network
        call (CTMModel.jump_and_denoise); D is appended to `denoised`."""
        x_dsm = batch.x0 + broadcast_time(batch.dsm_t, batch.x0) * batch.dsm_noise

        def jump(x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
            y, d = self.student.jump_and_denoise(x_t, t, s, x_dsm, batch.dsm_t, batch.labels)
            denoised.append(d)
            return y
        return jump

    def forward(self, batch: MicroBatch, weights: StepWeights) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """Returns (a scalar whose gradient is the batch-summed objective's; detached logs; x_est for
        the discriminator). Its value is not the loss: the logs carry each term."""
        cfg, student = self.config, self.student
        logs: dict[str, Tensor] = {}
        if cfg.mode == "edm":
            l_dsm = dsm_loss(lambda x, t: student.denoiser(x, t, batch.labels), batch.x0, batch.dsm_t,
                             batch.dsm_noise, cfg.loss.dsm.weighting, student.process.sigma_data)
            logs["loss_dsm"] = l_dsm.detach().mean()
            return l_dsm.sum(), logs, None

        target_inner = "target" if cfg.mode == "cd" else cfg.ctm.target_inner
        denoised: list[Tensor] = []  # D(x_dsm, t_dsm), computed in the student's jump call
        student_jump = self._jump_with_dsm(batch, denoised) if weights.dsm > 0 else None
        solver = self._solver(batch.labels, batch.times.steps)
        terms = ctm_loss(self._no_grad_calls["student"], self._frozen["target"], solver, batch.x0, batch.noise,
                         batch.times, self.grid, self.distance, target_inner, class_labels=batch.labels,
                         student_jump=student_jump)
        l_ctm = terms.distance.mean()
        logs["loss_ctm"] = l_ctm.detach()
        with record_function("gan/generator"):
            l_gan = generator_adversarial_loss(self._frozen["discriminator"], terms.x_est) if weights.gan > 0 else None
        last = student.backbone.last_layer_weight()
        # The CTM and GAN terms reach the student only through its jump y (through the distance, the
        # target network and the discriminator). Their gradients at y are taken once each; the adaptive
        # weights need only y's last layer, and the student is back-propagated once from y by the
        # surrogate <sg(dL/dy), y>, which has the objective's gradient. The plain way walks back
        # through the frozen networks once per adaptive weight and again in the final backward.
        y = terms.jump
        with record_function("objective/grads_at_jump"):
            grad_y, ctm_norm, w_gan = _gradient_at_jump(y, last, l_ctm, l_gan, weights)
        if l_gan is not None:
            logs["loss_gan"], logs["weight_gan"] = l_gan.detach(), torch.as_tensor(weights.gan * w_gan).detach()
        total = (y * grad_y.detach()).sum()
        if weights.dsm > 0:
            l_dsm = dsm_error(denoised[0], batch.x0, batch.dsm_t, cfg.loss.dsm.weighting,
                              student.process.sigma_data).mean()
            w_dsm = 1.0
            if weights.dsm_adaptive:
                w_dsm = adaptive_weight(ctm_norm, last_layer_grad_norm(l_dsm, last), *weights.dsm_clamp)
            total = total + weights.dsm * w_dsm * l_dsm
            logs["loss_dsm"], logs["weight_dsm"] = l_dsm.detach(), torch.as_tensor(weights.dsm * w_dsm).detach()
        # the caller scales by microbatch / local batch, so this returns a batch-summed surrogate loss
        return total * batch.x0.shape[0], logs, terms.x_est.detach()


def _gradient_at_jump(y: Tensor, last: Tensor, l_ctm: Tensor, l_gan: Tensor | None,
                      weights: StepWeights) -> tuple[Tensor, Tensor | None, Tensor | float]:
    """(dL/dy of lambda_CTM L_CTM + lambda_GAN w_GAN L_GAN, ||grad_last L_CTM|| or None, w_GAN).

    ||grad_last L_CTM|| is taken only where an adaptive weight needs it; both share it."""
    if not ((weights.dsm > 0 and weights.dsm_adaptive) or (l_gan is not None and weights.gan_adaptive)):
        grad_y, = torch.autograd.grad(weights.ctm * l_ctm + (weights.gan * l_gan if l_gan is not None else 0.0), y)
        return grad_y, None, 1.0
    g_ctm, = torch.autograd.grad(l_ctm, y, retain_graph=l_gan is not None)  # x_est's graph serves l_gan too
    ctm_norm = last_layer_grad_norm(y, last, g_ctm)
    grad_y, w_gan = weights.ctm * g_ctm, 1.0
    if l_gan is not None:
        g_gan, = torch.autograd.grad(l_gan, y)
        if weights.gan_adaptive:
            w_gan = adaptive_weight(ctm_norm, last_layer_grad_norm(y, last, g_gan), *weights.gan_clamp)
        grad_y = grad_y + weights.gan * w_gan * g_gan
    return grad_y, ctm_norm, w_gan


class DiscriminatorObjective(nn.Module):
    """Hinge loss of the discriminator on data vs the student's x_est (detached)."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        return discriminator_loss(self.discriminator, real, fake) * real.shape[0]
