"""No-grad network calls of the CTM step replayed as CUDA graphs.

Why: the teacher's Heun solver is the largest part of a CTM step (up to 2K-1 = 33 U-Net calls per
microbatch) and each call is hundreds of small kernels; on an H100 the launches, not the math,
bound it. The teacher is frozen, called without grad and with one shape per microbatch size, so a
graph captured once per (shape, dtype, layout, autocast) and replayed is exact
(benchmarks/train_step.py checks it against fp32 and measures it). The target branch's two jumps
(the online student's and the EMA target's, both without grad) are the same kind of call; their
weights change every step, but in place (fused Adam, the EMA's lerp), so the graphs read the new
values; dropout in them draws from the CUDA generator at each replay.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from .parameterization import CTMModel
from .process import broadcast_time


class GraphReplay:
    """`fn(*args)` without grad on CUDA, one graph per signature (tensor shapes, dtypes and layouts,
    other arguments by value, autocast, `mode()`), captured at its first call and replayed after.

    Capturing runs `fn` a few times first (cuDNN autotuning, torch.compile); the CUDA generator's
    state is put back afterwards, so a run that captures at a resume draws what a run that never
    stopped draws."""

    def __init__(self, fn: Callable[..., torch.Tensor], mode: Callable[[], Any] = lambda: None):
        self.fn = fn
        self.mode = mode  # what else a graph depends on, e.g. a module's training flag (dropout)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, torch.Tensor]] = {}
        self._pool = None

    def __call__(self, *args: Any) -> torch.Tensor:
        amp = torch.is_autocast_enabled("cuda")
        key = (amp, self.mode()) + tuple(_signature(a) for a in args)
        if key not in self._graphs:
            self._graphs[key] = self._capture(args, amp)
        graph, statics, output = self._graphs[key]
        for static, value in zip(statics, args):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        graph.replay()
        return output.clone()  # the static output is overwritten by the next replay

    def _capture(self, args: tuple, amp: bool):
        statics = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if amp \
            else contextlib.nullcontext
        rng = torch.cuda.get_rng_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast():
            for _ in range(3):  # warm-up: cuDNN autotuning and torch.compile happen outside the capture
                self.fn(*statics)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool), autocast():
            output = self.fn(*statics)
        torch.cuda.set_rng_state(rng)
        return graph, statics, output


def _signature(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return (tuple(arg.shape), arg.dtype, arg.is_contiguous(memory_format=torch.channels_last))
    return arg


def _replayable(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and not torch.is_grad_enabled()


class GraphedTeacher:
    """Stands in for a frozen CTMModel: ``denoiser`` replays a CUDA graph, everything else is the model's."""

    def __init__(self, teacher: CTMModel):
        if any(p.requires_grad for p in teacher.parameters()):
            raise ValueError("GraphedTeacher needs a frozen teacher (requires_grad_(False))")
        self.teacher = teacher
        self._denoiser = GraphReplay(teacher.denoiser)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.teacher, name)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if not _replayable(x) or self.teacher.training:
            return self.teacher.denoiser(x, t, class_labels)
        return self._denoiser(x, t, class_labels)


class GraphedJumps:
    """Stands in for a CTMModel whose ``jump`` is replayed as a CUDA graph where it runs without grad
    (the target branch); with grad, and everything else, it is the model itself."""

    def __init__(self, model: CTMModel):
        self.model = model
        self._jump = GraphReplay(model.jump, mode=lambda: model.training)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def jump(self, x: torch.Tensor, t: torch.Tensor | float, s: torch.Tensor | float,
             class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if not _replayable(x):
            return self.model.jump(x, t, s, class_labels)
        # Times given as numbers become tensors here, by a fill: a copy from pageable host memory would
        # make the host wait for the GPU, and a capture refuses one.
        t, s = (broadcast_time(v, x).reshape(-1) for v in (t, s))
        return self._jump(x, t, s, class_labels)
