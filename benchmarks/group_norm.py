"""GPU time of GroupNorm + SiLU (forward and backward) on the CIFAR-10 U-Net's activation shapes,
channels_last bf16: the eager path the U-Net takes (native kernel, which wants NCHW, plus the layout
copies around it) against the same function through torch.compile. Kernel time is summed from the
profiler, so the host's launch overhead does not count. Needs a CUDA GPU.

    python3 benchmarks/group_norm.py [--iters 20]

Why: the step's profile (RESULTS.md, "Where the step's time goes") charges ~150 ms of its ~600 ms
of kernels to GroupNorm, SiLU and their layout copies.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from train_step import rel_err

SHAPES = [(128, 128, 32, 32), (128, 256, 16, 16), (128, 256, 8, 8), (64, 128, 32, 32), (64, 256, 16, 16)]


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """As networks.unet runs it under autocast: in the input's precision, then SiLU."""
    with torch.autocast("cuda", enabled=False):
        return F.silu(F.group_norm(x, 32, weight, bias, 1e-6))


def kernel_us(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, iters: int) -> float:
    grad = torch.randn_like(x)
    for _ in range(3):
        fn(x, weight, bias).backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn(x, weight, bias).backward(grad)
        torch.cuda.synchronize()
    return sum(e.device_time for e in prof.events() if e.device_type.name == "CUDA") / iters


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/group_norm.py needs a CUDA GPU")
    compiled = torch.compile(group_norm_silu, dynamic=False)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape (B, C, H, W) | MB | eager us | compiled us | speed-up | rel. err out / grad x |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        x.requires_grad_()
        weight = torch.randn(shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        bias = torch.randn(shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out_err = rel_err(compiled(x, weight, bias).float(), group_norm_silu(x, weight, bias).float())
        grads = [torch.autograd.grad(fn(x, weight, bias).float().square().sum(), x)[0].float()
                 for fn in (compiled, group_norm_silu)]
        eager_us = kernel_us(group_norm_silu, x, weight, bias, args.iters)
        compiled_us = kernel_us(compiled, x, weight, bias, args.iters)
        print(f"| {shape} | {x.numel() * 2 / 1e6:.0f} | {eager_us:.1f} | {compiled_us:.1f} | "
              f"{eager_us / compiled_us:.2f}x | {out_err:.1e} / {rel_err(*grads):.1e} |", flush=True)


if __name__ == "__main__":
    main()
