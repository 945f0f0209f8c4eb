"""CTM parameterisation with EDM preconditioning.

g(x_t, t, s) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t), c_noise(s))
G(x_t, t, s) = (s/t) x_t + (1 - s/t) g(x_t, t, s)

G(x, t, t) = x holds by construction, and g(x, t, t) is a denoiser, so one CTM network is also a
diffusion teacher. The scalings depend on t only, as in the official code.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .process import VEProcess, broadcast_time, check_jump_times, check_time_range


def edm_scalings(t: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of EDM: unit-variance network input and target at every noise level."""
    var = t ** 2 + sigma_data ** 2
    return sigma_data ** 2 / var, t * sigma_data / var.sqrt(), 1 / var.sqrt()


def noise_conditioning(t: Tensor) -> Tensor:
    """c_noise = ln(t) / 4 (EDM), the scalar fed to the network's time embeddings."""
    return t.log() / 4


class CTMModel(nn.Module):
    """Wraps a backbone F(x_in, c_noise(t), c_noise(s), labels) into g and G.

    s = 0 (a jump all the way to the data) is embedded as sigma_min, where the network is defined;
    the outer Euler mixing uses the true s, so G(x, t, 0) = g(x, t, sigma_min).
    """

    def __init__(self, backbone: nn.Module, process: VEProcess | None = None, check_inputs: bool = True):
        super().__init__()
        self.backbone = backbone
        self.process = process or VEProcess()
        self.check_inputs = check_inputs  # host syncs; the trainer turns them off on GPU

    def denoise(self, x: Tensor, t: Tensor | float, s: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """g(x_t, t, s): the network's estimate of the data, conditioned on the jump target s."""
        tb, sb = broadcast_time(t, x), broadcast_time(s, x)
        t1, s1 = tb.reshape(-1), sb.reshape(-1)
        if self.check_inputs:
            check_jump_times(t1, s1, self.process)
        c_skip, c_out, c_in = edm_scalings(tb, self.process.sigma_data)
        s_embed = s1.clamp(min=self.process.sigma_min)
        out = self.backbone(c_in * x, noise_conditioning(t1), noise_conditioning(s_embed), class_labels)
        return c_skip * x + c_out * out.to(x.dtype)

    def jump(self, x: Tensor, t: Tensor | float, s: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """G(x_t, t, s): the PF-ODE solution at time s, starting from x_t at time t."""
        return _euler_mix(x, t, s, self.denoise(x, t, s, class_labels))

    def jump_and_denoise(self, x: Tensor, t: Tensor | float, s: Tensor | float, x_dsm: Tensor, t_dsm: Tensor,
                         class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(G(x, t, s), g(x_dsm, t_dsm, t_dsm)) from one network call on both batches stacked.

        The CTM step needs both from the student; one call at twice the batch launches half the
        kernels, and on a GPU the step is bound by launching them. Each sample's result is the
        same as from its own call: nothing in the network mixes samples."""
        n = x.shape[0]
        times = torch.cat([broadcast_time(t, x).reshape(-1), t_dsm])
        targets = torch.cat([broadcast_time(s, x).reshape(-1), t_dsm])
        labels = None if class_labels is None else torch.cat([class_labels, class_labels])
        both = self.denoise(torch.cat([x, x_dsm]), times, targets, labels)
        return _euler_mix(x, t, s, both[:n]), both[n:]

    def denoiser(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """g(x_t, t, t): the diffusion denoiser D(x_t, t) the CTM network carries."""
        if self.check_inputs:
            check_time_range(broadcast_time(t, x).reshape(-1), self.process, "t")
        return self.denoise(x, t, t, class_labels)

    def forward(self, x: Tensor, t: Tensor | float, s: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        return self.jump(x, t, s, class_labels)


def _euler_mix(x: Tensor, t: Tensor | float, s: Tensor | float, denoised: Tensor) -> Tensor:
    """G = (s/t) x + (1 - s/t) g: the jump's outer Euler step from the network's estimate g."""
    ratio = broadcast_time(s, x) / broadcast_time(t, x)
    return ratio * x + (1 - ratio) * denoised
