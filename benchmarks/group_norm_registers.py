"""Registers, spills and occupancy of the Triton GroupNorm kernels under each candidate launch plan,
compiled for a GPU architecture on a machine without one (Triton compiles to a cubin offline; the
cuobjdump that Triton's wheel ships reads its resource usage).

    python3 benchmarks/group_norm_registers.py [--arch 90] [--batch 256]

Why: a plan's tile sets how many elements each thread holds, and so its registers, and the registers
bound how many programs an SM keeps resident: the warps there to hide memory latency. A kernel that
moves a few bytes per FLOP is latency-bound when too few warps are resident. This says which plans
can be fast before any GPU time is spent; FastestPlan still times them on the GPU.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctm_core.networks import group_norm_nhwc as gn  # noqa: E402

# The CIFAR-10 U-Net's norms (C, H, W, shift): norm0 of the first block, a block at 32x32 with the time
# shift, a decoder block's concatenated input, and the 16x16 and 8x8 levels
SHAPES = [(128, 32, 32, False), (256, 32, 32, True), (512, 32, 32, False), (512, 16, 16, False), (256, 8, 8, True)]
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM = 65536, 64, 32  # sm_80 and sm_90 alike

FORWARD = dict(X="*bf16", Shift="*bf16", Weight="*fp32", Bias="*fp32", Y="*bf16", Mean="*fp32", Rstd="*fp32",
               HW="i32", C="i32", G="i32", cg="i32", CPP="i32", eps="fp32")
BACKWARD = dict(DY="*bf16", X="*bf16", Shift="*bf16", Weight="*fp32", Bias="*fp32", Mean="*fp32", Rstd="*fp32",
                DX="*bf16", DShift="*fp32", DWeight="*fp32", DBias="*fp32", HW="i32", C="i32", G="i32", cg="i32",
                CPP="i32")


def resources(kernel, signature: dict, constants: dict, warps: int, target: GPUTarget) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread: spills) of the kernel compiled for target."""
    source = ASTSource(fn=kernel, signature={**signature, **{name: "constexpr" for name in constants}},
                       constexprs=constants)
    compiled = triton.compile(source, target=target, options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"LOCAL:(\d+)", usage).group(1))


def plan_resources(x: torch.Tensor, groups: int, plan: gn.LaunchPlan, silu: bool, shift: bool,
                   target: GPUTarget) -> tuple[tuple[int, int], dict, list[tuple[int, int]]]:
    """(grid, launch options, [(registers, spilled bytes) of the forward, of the backward]) for x cut by
    `plan`, exactly as the operators launch it."""
    grid, _, _, options = gn._launch_plan(x, groups, plan)
    constants = dict(options, SILU=silu, HAS_SHIFT=shift)
    warps = constants.pop("num_warps")
    return grid, options, [resources(kernel, signature, constants, warps, target)
                     for kernel, signature in ((gn._forward_kernel, FORWARD), (gn._backward_kernel, BACKWARD))]


def resident_warps(registers: int, warps: int) -> int:
    """Warps an SM keeps resident for programs of `warps` warps at `registers` per thread (allocation
    granularity ignored)."""
    programs = min(REGISTERS_PER_SM // (registers * 32 * warps), MAX_WARPS_PER_SM // warps, MAX_PROGRAMS_PER_SM)
    return programs * warps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 (A100), 90 (H100)")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    print(f"sm_{args.arch}, Triton {triton.__version__}, batch {args.batch}")
    print("| shape (B, C, H, W) | shift | plan (channels, tile, warps) | programs | elements per thread "
          "| forward: registers / spilled bytes / resident warps | backward: the same |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for channels, height, width, with_shift in SHAPES:
        x = torch.empty(args.batch, channels, height, width)
        for plan in gn.CANDIDATE_PLANS:
            grid, options, usage = plan_resources(x, 32, plan, True, with_shift, target)
            row = [f"{registers} / {spilled} / {resident_warps(registers, plan.warps)}" for registers, spilled in usage]
            per_thread = options["BLOCK_HW"] * options["BLOCK_C"] // (32 * plan.warps)
            print(f"| {(args.batch, channels, height, width)} | {'yes' if with_shift else 'no'} "
                  f"| {(plan.channels, plan.tile, plan.warps)} | {grid[0] * grid[1]} | {per_thread} "
                  f"| {row[0]} | {row[1]} |", flush=True)


if __name__ == "__main__":
    main()
