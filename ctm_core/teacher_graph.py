"""The frozen teacher's denoiser replayed as a CUDA graph.

Why: the teacher's Heun solver is the largest part of a CTM step (up to 2K-1 = 33 U-Net calls per
microbatch) and each call is hundreds of small kernels; on an H100 the launches, not the math,
bound it. The teacher is frozen, called without grad and with one shape per microbatch size, so a
graph captured once per (shape, dtype, layout, autocast) and replayed is exact
(benchmarks/train_step.py checks it against fp32 and measures it).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from .parameterization import CTMModel


class GraphedTeacher:
    """Stands in for a frozen CTMModel: ``denoiser`` replays a CUDA graph, everything else is the model's."""

    def __init__(self, teacher: CTMModel):
        if any(p.requires_grad for p in teacher.parameters()):
            raise ValueError("GraphedTeacher needs a frozen teacher (requires_grad_(False))")
        self.teacher = teacher
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._pool = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.teacher, name)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cuda" or self.teacher.training:
            return self.teacher.denoiser(x, t, class_labels)
        amp = torch.is_autocast_enabled("cuda")
        key = (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last), amp,
               None if class_labels is None else (tuple(class_labels.shape), class_labels.dtype))
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, t, class_labels, amp)
        graph, inputs, output = self._graphs[key]
        for static, value in zip(inputs, (x, t, class_labels)):
            static.copy_(value)
        graph.replay()
        return output.clone()  # the static output is overwritten by the next replay

    def _capture(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None, amp: bool):
        inputs = tuple(v.clone() for v in (x, t, class_labels) if v is not None)
        labels = inputs[2] if class_labels is not None else None
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if amp \
            else contextlib.nullcontext
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast():
            for _ in range(3):  # warm-up: cuDNN autotuning and torch.compile happen outside the capture
                self.teacher.denoiser(inputs[0], inputs[1], labels)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool), autocast():
            output = self.teacher.denoiser(inputs[0], inputs[1], labels)
        return graph, inputs, output
