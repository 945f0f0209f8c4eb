"""GPU time of the U-Net's GroupNorm + SiLU (forward and backward) on the CIFAR-10 U-Net's activation
shapes, channels_last bf16, three ways: PyTorch's eager path (native kernel, which wants NCHW,
plus the layout copies around it and a separate SiLU), the same function through torch.compile,
and the Triton kernels of ctm_core.networks.group_norm_nhwc that the U-Net uses on CUDA. Kernel
time is summed from the profiler, so the host's launch overhead does not count; "call us" is the
wall time of one forward+backward launched back to back (what the eager step pays).

Precision: each path's output and input gradient against float64 on the same bf16 input.

    python3 benchmarks/group_norm.py [--iters 20] [--batch B] [--plans]

The Triton column is what the U-Net runs: each shape's launch plan measured at its first call
(group_norm_nhwc.FastestPlan). `--plans` adds a table of every candidate plan's forward and
backward kernel time per shape (triton.testing.do_bench, L2 flushed before each run) against a
device copy of the same tensor, the least traffic a forward can have (read once, write once).

Why: the step's profile (RESULTS.md) charges ~85 ms of its ~600 ms of kernels to the layout
copies around GroupNorm alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctm_core.networks.unet import GroupNorm  # noqa: E402

# (B, C, H, W, shift): the student's stacked jump+DSM batch (128) and the per-call batch (64);
# shift=True is norm1, which adds the time conditioning before the norm
SHAPES = [(128, 128, 32, 32, False), (128, 256, 32, 32, True), (128, 512, 16, 16, False),
          (128, 256, 16, 16, True), (128, 256, 8, 8, True), (64, 256, 32, 32, True), (64, 384, 16, 16, False)]


def kernel_and_call_us(fn, x: torch.Tensor, shift, iters: int) -> tuple[float, float]:
    grad = torch.randn_like(x)
    for _ in range(3):
        fn(x, shift).backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn(x, shift).backward(grad)
        torch.cuda.synchronize()
    kernel_us = sum(e.device_time for e in prof.events() if e.device_type.name == "CUDA") / iters
    start = time.perf_counter()
    for _ in range(iters):
        fn(x, shift).backward(grad)
    torch.cuda.synchronize()
    return kernel_us, (time.perf_counter() - start) / iters * 1e6


def errors(fn, x: torch.Tensor, shift, reference) -> str:
    out = fn(x, shift)
    grad_out = torch.randn(out.shape, device=x.device, generator=torch.Generator(x.device).manual_seed(1))
    grad_x, = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    x64 = x.detach().double().requires_grad_()
    ref_out = reference(x64, None if shift is None else shift.double())
    ref_grad, = torch.autograd.grad(ref_out, x64, grad_out.to(out.dtype).double())
    return f"{rel_err(out.double(), ref_out):.1e} / {rel_err(grad_x.double(), ref_grad):.1e}"


def plans_table(shapes) -> None:
    """Every candidate launch plan's kernel time per shape; the plan with the least forward + backward time
    in bold. FastestPlan chooses the forward's and the backward's plans apart, so read those columns for what
    it keeps."""
    from triton.testing import do_bench

    from ctm_core.networks import group_norm_nhwc as gn

    print("\n| shape (B, C, H, W) | shift | plan (channels, tile, warps) | forward us | backward us "
          "| forward / copy | fwd+bwd against the default plan |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch, channels, height, width, with_shift in shapes:
        gen = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(batch, channels, height, width, device="cuda", generator=gen).to(torch.bfloat16)
        x = x.to(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        weight, bias = torch.randn(channels, device="cuda"), torch.randn(channels, device="cuda")
        shift = torch.randn(batch, channels, device="cuda", dtype=torch.bfloat16) if with_shift else None
        _, mean, rstd = gn.forward_with_plan(x, shift, weight, bias, 32, 1e-6, True, gn.DEFAULT_PLAN)
        copy_us = do_bench(lambda: torch.empty_like(x).copy_(x)) * 1e3
        times = {}
        for plan in gn.CANDIDATE_PLANS:
            forward = do_bench(lambda: gn.forward_with_plan(x, shift, weight, bias, 32, 1e-6, True, plan)) * 1e3
            backward = do_bench(lambda: gn.backward_with_plan(dy, x, shift, weight, bias, mean, rstd, 32, True,
                                                              plan)) * 1e3
            times[plan] = (forward, backward)
        default = sum(times[gn.DEFAULT_PLAN])
        best = min(times, key=lambda plan: sum(times[plan]))
        for plan, (forward, backward) in times.items():
            mark = "**" if plan == best else ""
            print(f"| {(batch, channels, height, width)} | {'yes' if with_shift else 'no'} "
                  f"| {mark}{(plan.channels, plan.tile, plan.warps)}{mark} | {forward:.1f} | {backward:.1f} "
                  f"| {forward / copy_us:.2f} | {default / (forward + backward):.2f}x |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=0, help="batch size for every shape (0: the list's own)")
    parser.add_argument("--plans", action="store_true", help="also time every candidate launch plan per shape")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/group_norm.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    shapes = [(args.batch or batch, *rest) for batch, *rest in SHAPES]
    print("| shape (B, C, H, W) | shift | MB | kernel us: eager / compiled / Triton | Triton speed-up (kernels) "
          "| call us: eager / Triton | rel. err out / grad x: eager | Triton |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch, channels, height, width, with_shift in shapes:
        norms = [GroupNorm(32, channels, eps=1e-6, silu=True).cuda() for _ in range(2)]
        with torch.no_grad():
            norms[0].weight.normal_(1.0, 0.2)
            norms[0].bias.normal_(0.0, 0.2)
        reference = GroupNorm(32, channels, eps=1e-6, silu=True).cuda().double()
        for other in (norms[1], reference):
            other.load_state_dict(norms[0].state_dict())
        norms[0].triton = reference.triton = False
        x = torch.randn(batch, channels, height, width, device="cuda").mul(2).add(1).to(torch.bfloat16)
        x = x.to(memory_format=torch.channels_last).requires_grad_()
        shift = torch.randn(batch, channels, device="cuda", dtype=torch.bfloat16) if with_shift else None

        def call(norm: GroupNorm):
            def fn(x, shift):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return norm(x, shift)
            return fn

        eager, fused = call(norms[0]), call(norms[1])
        compiled = torch.compile(eager, dynamic=False)
        eager_us, eager_call = kernel_and_call_us(eager, x, shift, args.iters)
        compiled_us, _ = kernel_and_call_us(compiled, x, shift, args.iters)
        triton_us, triton_call = kernel_and_call_us(fused, x, shift, args.iters)
        print(f"| {(batch, channels, height, width)} | {'yes' if with_shift else 'no'} | {x.numel() * 2 / 1e6:.0f} "
              f"| {eager_us:.1f} / {compiled_us:.1f} / {triton_us:.1f} | {eager_us / triton_us:.2f}x "
              f"| {eager_call:.0f} / {triton_call:.0f} | {errors(eager, x, shift, reference)} "
              f"| {errors(fused, x, shift, reference)} |", flush=True)
    if args.plans:
        plans_table(shapes)


if __name__ == "__main__":
    main()
