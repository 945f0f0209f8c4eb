"""Frozen networks that keep none of their activations for the backward pass.

The generator's step back-propagates to its images through networks it never trains: LPIPS's VGG16
at 224x224 and the projected discriminator's feature networks (DeiT-B and EfficientNet-lite0, also
at 224). Autograd keeps their activations for that backward, ~450 MiB per image in fp32 (about half in
bf16) against the U-Net's few MiB at 32x32, so at the paper's batch of 256 they, not the student, decide
whether a step fits on an 80 GB GPU. Running their forward again in the backward adds ~17 TFLOP to a
batch-256 step (~4% of its FLOPs): the image's side of LPIPS and the discriminator's networks, not LPIPS's
target side, which gets no gradient and is computed once (lpips_distance).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint


def forward_recomputed_in_backward(net: Callable[..., Any], *inputs: torch.Tensor, **kwargs: Any) -> Any:
    """net(*inputs, **kwargs) that saves only its inputs; the backward runs net again to get the rest.

    Only where a gradient will reach an input: the discriminator's own step and the no-grad target
    branch keep nothing anyway. `net` must be deterministic (a frozen network in eval mode), so the
    random number generators' states are not saved and restored around the second run.
    """
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
        return net(*inputs, **kwargs)
    return checkpoint(net, *inputs, use_reentrant=False, preserve_rng_state=False, **kwargs)
