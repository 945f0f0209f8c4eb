"""How the backbones are compiled: the trunk apart from the output layer, with eager's bf16 rounding."""
from __future__ import annotations

import torch

# Inductor's options that keep eager's rounding to bf16 between the ops it fuses.
EAGER_ROUNDING = {"emulate_precision_casts": True}


def compile_options(**options) -> dict:
    """torch.compile's keyword arguments for a backbone: `options`, plus EAGER_ROUNDING where inductor
    compiles (the default backend).

    Why: CTM's loss compares the student's jump with a target built from the teacher's solve, two passes
    of nearly the same network. Their bf16 rounding errors largely cancel in the difference when both
    round alike. Inductor drops the round trip to bf16 between the ops it fuses, so a compiled teacher
    against an eager student no longer rounds alike. On an H100 the CTM term's gradient then moved from
    7.6e-3 to 1.1e-2 relative to fp32; with eager's rounding kept it is 7.3e-3, at no measurable cost
    (benchmarks/RESULTS.md, fourteenth session).
    """
    if options.get("backend", "inductor") != "inductor":
        return options
    return {**options, "options": {**EAGER_ROUNDING, **options.get("options", {})}}


class CompilableTrunk:
    """Mixin for a backbone whose forward is `output layer(self._trunk(...))`.

    `compile_trunk` compiles `_trunk` and leaves the output layer eager. A compiled graph's backward
    computes the gradients of all its inputs in one call. The adaptive loss weights ask for the output
    layer's weight gradient two or three times per step (losses.last_layer_grad_norm). With the whole
    network compiled, each of those asks would run the student's full backward. With the output layer
    outside the graph, they cost one small convolution's weight gradient each.
    """

    def compile_trunk(self, **options) -> None:
        self._trunk = torch.compile(self._trunk, **compile_options(**options))
