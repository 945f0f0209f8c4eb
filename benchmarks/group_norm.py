"""GPU time of the U-Net's GroupNorm + SiLU (forward and backward) on the CIFAR-10 U-Net's activation
shapes, channels_last bf16 under autocast, fp32 weights, as the trainer runs it: the eager path
(networks.unet.group_norm_silu: torch's kernel, which wants NCHW, plus the layout copies around it)
against the same function through torch.compile with dynamic shapes (UNetBackbone.compile_norms, the
trainer's GPU default). Kernel time is summed from the profiler, so launch overhead does not count
there; wall time per call (CUDA events over a loop) includes it. Needs a CUDA GPU.

    python3 benchmarks/group_norm.py [--iters 20]

Why: the step's profile (RESULTS.md, "Where the step's time goes") charges ~150 ms of its ~600 ms
of kernels to GroupNorm, SiLU and their layout copies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_step import rel_err  # noqa: E402
from ctm_core.networks.unet import group_norm_silu  # noqa: E402

SHAPES = [(128, 128, 32, 32), (128, 256, 16, 16), (128, 512, 16, 16), (128, 256, 8, 8),
          (64, 128, 32, 32), (64, 384, 32, 32), (64, 256, 16, 16)]


def _step(fn, x, weight, bias, grad):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fn(x, weight, bias, 32, 1e-6)
    out.backward(grad)


def timings_us(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, iters: int) -> tuple[float, float]:
    """(kernel us, wall us) per forward + backward."""
    grad = torch.randn_like(x)
    for _ in range(3):
        _step(fn, x, weight, bias, grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            _step(fn, x, weight, bias, grad)
        torch.cuda.synchronize()
    kernel = sum(e.device_time for e in prof.events() if e.device_type.name == "CUDA") / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        _step(fn, x, weight, bias, grad)
    end.record()
    torch.cuda.synchronize()
    return kernel, start.elapsed_time(end) * 1e3 / iters


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/group_norm.py needs a CUDA GPU")
    compiled = torch.compile(group_norm_silu, dynamic=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape (B, C, H, W) | MB | eager kernel us | compiled kernel us | speed-up | eager wall us | "
          "compiled wall us | rel. err out / grad x |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        x.requires_grad_()
        weight = (1 + 0.1 * torch.randn(shape[1], device="cuda")).requires_grad_()
        bias = (0.1 * torch.randn(shape[1], device="cuda")).requires_grad_()
        outs, grads = [], []
        for fn in (compiled, group_norm_silu):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(x, weight, bias, 32, 1e-6)
            outs.append(out.float())
            grads.append(torch.autograd.grad(out.float().square().sum(), x)[0].float())
        eager_k, eager_w = timings_us(group_norm_silu, x, weight, bias, args.iters)
        comp_k, comp_w = timings_us(compiled, x, weight, bias, args.iters)
        print(f"| {shape} | {x.numel() * 2 / 1e6:.0f} | {eager_k:.1f} | {comp_k:.1f} | {eager_k / comp_k:.2f}x | "
              f"{eager_w:.1f} | {comp_w:.1f} | {rel_err(*outs):.1e} / {rel_err(*grads):.1e} |", flush=True)


if __name__ == "__main__":
    main()
