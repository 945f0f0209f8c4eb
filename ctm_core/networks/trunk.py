"""The backbones' compilable part: everything but the output layer."""
from __future__ import annotations

import torch


class CompilableTrunk:
    """Mixin for a backbone whose forward is `output layer(self._trunk(...))`.

    `compile_trunk` compiles `_trunk` and leaves the output layer eager. A compiled graph's backward
    computes the gradients of all its inputs in one call. The adaptive loss weights ask for the output
    layer's weight gradient two or three times per step (losses.last_layer_grad_norm). With the whole
    network compiled, each of those asks would run the student's full backward. With the output layer
    outside the graph, they cost one small convolution's weight gradient each.
    """

    def compile_trunk(self, **options) -> None:
        self._trunk = torch.compile(self._trunk, **options)
