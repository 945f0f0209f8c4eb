"""GroupNorm (+ SiLU) that reads and writes channels_last activations directly, as two Triton kernels.

Why: PyTorch's CUDA GroupNorm wants NCHW, so on the channels_last U-Net every eager norm pays a
layout copy in and out, in the forward and in the backward (~85 ms of an H100 step's ~600 ms of
kernels, benchmarks/RESULTS.md), and SiLU is one more pass over the activation each way.
torch.compile fuses the norm but meets more shapes than its recompile limit allows (the same
RESULTS.md, fifth session). The one maintained channels_last GroupNorm we know of (NVIDIA Apex's
contrib group_norm) has to be built from source against the local CUDA; no installable wheel has one.

Layout: x is (B, C, H, W) in channels_last memory, i.e. (B, H*W, C) row-major. One program owns
one sample and a block of whole groups: it walks the H*W rows in tiles whose rows are contiguous
runs of channels, accumulates sums in fp32 (shifted by the first row, so that a large mean does
not cancel the variance) elementwise over the tile, reduces them to per-channel sums once after
the walk (a reduction across threads in every step of the walk would stall its loads), merges
them into group statistics, and walks the rows again to write the output. The backward
recomputes the normalised input and the SiLU from x rather than storing them, so the autograd
graph keeps x and two (B, G) vectors, not the norm's output. How many channels a program owns,
its tile and its warps are a LaunchPlan, timed on the GPU per shape at the first call (FastestPlan).

Importing this module needs Triton (bundled with PyTorch's Linux wheels); the U-Net imports it
only on CUDA, and uses it on Ampere or newer (sm_80: Triton's bf16 conversions). With
TRITON_INTERPRET=1 set before the import, the kernels run on CPU tensors, which is how the tests
check them without a GPU.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _program_block(Shift, HW, C, G, cg, CPP, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """This program's sample and block of whole groups: (sample, the sample's offset, the block's channels and
    their mask, the (channel, group) one-hot, the block's groups and their mask, the per-channel shift)."""
    sample = tl.program_id(0)
    block = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    channels = block * CPP + offs_c
    cmask = (offs_c < CPP) & (channels < C)
    offs_g = tl.arange(0, BLOCK_G)
    onehot = ((offs_c // cg)[:, None] == offs_g[None, :]) & cmask[:, None]
    groups = block * (CPP // cg) + offs_g
    gmask = (offs_g < CPP // cg) & (groups < G)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_SHIFT:
        shift = tl.load(Shift + sample * C + channels, mask=cmask, other=0.0).to(tl.float32)
    return sample, sample.to(tl.int64) * HW * C, channels, cmask, onehot, groups, gmask, shift


@triton.jit
def _group_sums(per_channel, onehot):
    """Sums over each group's channels: (BLOCK_C,) -> (BLOCK_G,)."""
    return tl.sum(tl.where(onehot, per_channel[:, None], 0.0), axis=0)


@triton.jit
def _per_channel(per_group, onehot):
    """Each channel's group value: (BLOCK_G,) -> (BLOCK_C,)."""
    return tl.sum(tl.where(onehot, per_group[None, :], 0.0), axis=1)


@triton.jit
def _tile(start, HW, C, base, channels, cmask, BLOCK_HW: tl.constexpr):
    """Offsets and mask of the rows start..start+BLOCK_HW of the block's channels."""
    rows = start + tl.arange(0, BLOCK_HW)
    return base + rows[:, None] * C + channels[None, :], (rows < HW)[:, None] & cmask[None, :]


@triton.jit
def _forward_kernel(X, Shift, Weight, Bias, Y, Mean, Rstd, HW, C, G, cg, CPP, eps, BLOCK_HW: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, SILU: tl.constexpr, HAS_SHIFT: tl.constexpr):
    sample, base, channels, cmask, onehot, groups, gmask, shift = _program_block(
        Shift, HW, C, G, cg, CPP, BLOCK_C, BLOCK_G, HAS_SHIFT)
    pivot = tl.load(X + base + channels, mask=cmask, other=0.0).to(tl.float32)
    acc1 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):  # elementwise sums: no reduction across threads inside the loop
        pointers, mask = _tile(start, HW, C, base, channels, cmask, BLOCK_HW)
        x = tl.load(X + pointers, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - pivot[None, :], 0.0)
        acc1 += d
        acc2 += d * d
    s1 = tl.sum(acc1, axis=0)
    s2 = tl.sum(acc2, axis=0)

    # per channel: mean and sum of squared deviations; per group: Chan et al.'s pairwise merge
    channel_mean = pivot + shift + s1 / HW
    channel_m2 = s2 - s1 * s1 / HW
    group_mean = _group_sums(channel_mean, onehot) / cg
    mean = _per_channel(group_mean, onehot)
    spread = channel_mean - mean
    group_m2 = _group_sums(channel_m2 + HW * spread * spread, onehot)
    group_rstd = 1.0 / tl.sqrt(tl.maximum(group_m2, 0.0) / (HW * cg) + eps)
    rstd = _per_channel(group_rstd, onehot)

    tl.store(Mean + sample * G + groups, group_mean, mask=gmask)
    tl.store(Rstd + sample * G + groups, group_rstd, mask=gmask)

    weight = tl.load(Weight + channels, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(Bias + channels, mask=cmask, other=0.0).to(tl.float32)
    scale = rstd * weight
    offset = bias + (shift - mean) * scale
    for start in range(0, HW, BLOCK_HW):
        pointers, mask = _tile(start, HW, C, base, channels, cmask, BLOCK_HW)
        x = tl.load(X + pointers, mask=mask, other=0.0).to(tl.float32)
        z = x * scale[None, :] + offset[None, :]
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(Y + pointers, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _tile_grad(X, DY, pointers, mask, mean, rstd, weight, bias, SILU: tl.constexpr):
    """(dL/dz of the affine output z, the normalised input) for one tile, recomputed from x."""
    x = tl.load(X + pointers, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + pointers, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean[None, :]) * rstd[None, :]
    if SILU:
        z = xhat * weight[None, :] + bias[None, :]
        s = tl.sigmoid(z)
        dy = dy * s * (1.0 + z * (1.0 - s))
    return dy, xhat


@triton.jit
def _backward_kernel(DY, X, Shift, Weight, Bias, Mean, Rstd, DX, DShift, DWeight, DBias, HW, C, G, cg, CPP,
                     BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, SILU: tl.constexpr,
                     HAS_SHIFT: tl.constexpr):
    sample, base, channels, cmask, onehot, groups, gmask, shift = _program_block(
        Shift, HW, C, G, cg, CPP, BLOCK_C, BLOCK_G, HAS_SHIFT)
    mean = _per_channel(tl.load(Mean + sample * G + groups, mask=gmask, other=0.0), onehot)
    rstd = _per_channel(tl.load(Rstd + sample * G + groups, mask=gmask, other=0.0), onehot)
    mean = mean - shift  # the shift enters as x + shift - mean
    weight = tl.load(Weight + channels, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(Bias + channels, mask=cmask, other=0.0).to(tl.float32)

    acc_dz = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc_dz_xhat = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        pointers, mask = _tile(start, HW, C, base, channels, cmask, BLOCK_HW)
        dz, xhat = _tile_grad(X, DY, pointers, mask, mean, rstd, weight, bias, SILU)
        dz = tl.where(mask, dz, 0.0)
        acc_dz += dz
        acc_dz_xhat += dz * xhat
    sum_dz = tl.sum(acc_dz, axis=0)
    sum_dz_xhat = tl.sum(acc_dz_xhat, axis=0)
    tl.store(DWeight + sample * C + channels, sum_dz_xhat, mask=cmask)
    tl.store(DBias + sample * C + channels, sum_dz, mask=cmask)

    # dx = rstd (w dz - mean_group(w dz) - xhat mean_group(w dz xhat))
    count = HW * cg
    mean_wdz = _per_channel(_group_sums(weight * sum_dz, onehot) / count, onehot)
    mean_wdz_xhat = _per_channel(_group_sums(weight * sum_dz_xhat, onehot) / count, onehot)
    acc_dx = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        pointers, mask = _tile(start, HW, C, base, channels, cmask, BLOCK_HW)
        dz, xhat = _tile_grad(X, DY, pointers, mask, mean, rstd, weight, bias, SILU)
        dx = rstd[None, :] * (dz * weight[None, :] - mean_wdz[None, :] - xhat * mean_wdz_xhat[None, :])
        tl.store(DX + pointers, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_SHIFT:
            acc_dx += tl.where(mask, dx, 0.0)
    if HAS_SHIFT:
        tl.store(DShift + sample * C + channels, tl.sum(acc_dx, axis=0), mask=cmask)


@dataclass(frozen=True)
class LaunchPlan:
    """How one call is cut into programs: `channels` per program (rounded down to whole groups, at least
    one), `tile` elements (rows x channel block) per loop step, and `warps` per program. More, smaller
    programs keep more loads in flight and keep a program's second pass over its rows in cache; larger
    tiles give each program more loads at once. Which wins depends on the shape and the GPU."""

    channels: int
    tile: int
    warps: int


# The plan used before plans were measured per shape, kept first: off CUDA (Triton's interpreter), inside
# a CUDA-graph capture (no timing there), and as the fallback of a tie. Compiled for sm_90 it holds 32
# elements per thread in 168 (forward) and 202 (backward) registers, so an SM keeps only 12 or 8 warps of it
# resident (benchmarks/group_norm_registers.py); most candidates hold 4-16 elements per thread.
DEFAULT_PLAN = LaunchPlan(channels=64, tile=4096, warps=4)
CANDIDATE_PLANS = (DEFAULT_PLAN, LaunchPlan(64, 2048, 4), LaunchPlan(64, 2048, 8), LaunchPlan(64, 1024, 4),
                   LaunchPlan(64, 512, 4), LaunchPlan(32, 1024, 4), LaunchPlan(32, 2048, 8), LaunchPlan(16, 1024, 4))


def _launch_plan(x: torch.Tensor, groups: int, plan: LaunchPlan) -> tuple[tuple[int, int], int, int, dict[str, int]]:
    """(grid, H*W, channels per program, launch options) for either kernel on x under `plan`."""
    batch, channels, height, width = x.shape
    per_group = channels // groups
    groups_per_program = max(1, min(groups, plan.channels // per_group))
    per_program = groups_per_program * per_group
    block_c = triton.next_power_of_2(per_program)
    block_hw = max(1, min(triton.next_power_of_2(height * width), plan.tile // block_c))
    options = dict(BLOCK_HW=block_hw, BLOCK_C=block_c, BLOCK_G=triton.next_power_of_2(groups_per_program),
                   num_warps=plan.warps)
    return (batch, triton.cdiv(groups, groups_per_program)), height * width, per_program, options


def _gpu_ms(run: Callable[[], object]) -> float:
    """Mean GPU time of `run` in ms, with the L2 cache flushed before each run (Triton's benchmark helper),
    as the step meets these tensors: written by an earlier layer, not still in cache from a repeat."""
    return triton.testing.do_bench(run, warmup=5, rep=20)


class FastestPlan:
    """The fastest of `plans` for each call signature, measured on the GPU at its first call and kept.

    Why: a fixed plan was measured far from the memory bandwidth on an H100 (benchmarks/RESULTS.md), and
    the best cut differs between shapes (32x32 activations do not fit in L2, 8x8 ones give few programs)
    and between GPUs. This is what `torch.backends.cudnn.benchmark` does for the convolutions. Off CUDA,
    and inside a CUDA-graph capture (where nothing can be timed), DEFAULT_PLAN runs."""

    def __init__(self, plans: tuple[LaunchPlan, ...] = CANDIDATE_PLANS, time_ms: Callable[[Callable], float] = _gpu_ms):
        self.plans = plans
        self._time_ms = time_ms
        self._chosen: dict[tuple, LaunchPlan] = {}

    def __call__(self, signature: tuple, run: Callable[[LaunchPlan], object],
                 may_time: Callable[[], bool]) -> LaunchPlan:
        """The plan for calls of this signature; `run(plan)` launches one such call, and is timed only where
        `may_time()` says so (asked only for a signature not yet measured: see _may_time)."""
        chosen = self._chosen.get(signature)
        if chosen is not None:
            return chosen
        if not may_time():
            return DEFAULT_PLAN
        times = [self._time_ms(functools.partial(run, candidate)) for candidate in self.plans]
        chosen = self._chosen[signature] = self.plans[times.index(min(times))]  # a tie keeps the earlier plan
        return chosen

    def chosen(self) -> dict[tuple, LaunchPlan]:
        """Every signature measured so far and its plan (for benchmarks and logs)."""
        return dict(self._chosen)


def _may_time(x: torch.Tensor) -> Callable[[], bool]:
    return lambda: x.is_cuda and not torch.cuda.is_current_stream_capturing()


def _signature(x: torch.Tensor, shift: torch.Tensor | None, groups: int, silu: bool) -> tuple:
    return (x.device.index, tuple(x.shape), x.dtype, None if shift is None else shift.dtype, groups, silu)


def forward_with_plan(x, shift, weight, bias, groups, eps, silu, plan: LaunchPlan):
    """(output, per-(sample, group) mean, rstd) under an explicit plan: what the operator runs, with the plan
    it chose (benchmarks time each plan through this)."""
    grid, hw, per_program, options = _launch_plan(x, groups, plan)
    batch, channels = x.shape[:2]
    y = torch.empty_like(x)
    mean = torch.empty(batch, groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _forward_kernel[grid](
        x, x if shift is None else shift, weight, bias, y, mean, rstd, hw, channels, groups,
        channels // groups, per_program, eps, SILU=silu, HAS_SHIFT=shift is not None, **options)
    return y, mean, rstd


def backward_with_plan(dy, x, shift, weight, bias, mean, rstd, groups, silu, plan: LaunchPlan):
    """(dx, dshift, dweight, dbias) under an explicit plan; the last three per sample (B, C) in fp32, dshift
    empty without a shift."""
    grid, hw, per_program, options = _launch_plan(x, groups, plan)
    batch, channels = x.shape[:2]
    dx = torch.empty_like(x)
    dweight = torch.empty(batch, channels, device=x.device, dtype=torch.float32)
    dbias = torch.empty_like(dweight)
    dshift = dweight.new_empty(0) if shift is None else torch.empty_like(dweight)
    _backward_kernel[grid](
        dy, x, x if shift is None else shift, weight, bias, mean, rstd, dx,
        dweight if shift is None else dshift, dweight, dbias, hw, channels, groups,
        channels // groups, per_program, SILU=silu, HAS_SHIFT=shift is not None, **options)
    return dx, dshift, dweight, dbias


FORWARD_PLANS = FastestPlan()
BACKWARD_PLANS = FastestPlan()


# The kernels as PyTorch operators (torch.library), so that torch.compile keeps them in its graphs as
# opaque calls: the compiled teacher uses them too, instead of inductor's GroupNorm, which on
# channels_last activations moves them through layout copies (benchmarks/RESULTS.md, twelfth session).
@torch.library.custom_op("ctm_lab::group_norm_nhwc", mutates_args=(), schema=(
    "(Tensor x, Tensor? shift, Tensor weight, Tensor bias, int groups, float eps, bool silu) -> (Tensor, Tensor, Tensor)"))
def _forward(x, shift, weight, bias, groups, eps, silu):
    """(output, per-(sample, group) mean, rstd): the statistics are what the backward reuses."""
    args = (x, shift, weight, bias, groups, eps, silu)
    plan = FORWARD_PLANS(_signature(x, shift, groups, silu), lambda plan: forward_with_plan(*args, plan), _may_time(x))
    return forward_with_plan(*args, plan)


@_forward.register_fake
def _(x, shift, weight, bias, groups, eps, silu):
    stats = x.new_empty(x.shape[0], groups, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("ctm_lab::group_norm_nhwc_backward", mutates_args=(), schema=(
    "(Tensor dy, Tensor x, Tensor? shift, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, int groups, "
    "bool silu) -> (Tensor, Tensor, Tensor, Tensor)"))
def _backward(dy, x, shift, weight, bias, mean, rstd, groups, silu):
    """(dx, dshift, dweight, dbias): see backward_with_plan."""
    args = (dy, x, shift, weight, bias, mean, rstd, groups, silu)
    plan = BACKWARD_PLANS(_signature(x, shift, groups, silu), lambda plan: backward_with_plan(*args, plan),
                          _may_time(x))
    return backward_with_plan(*args, plan)


@_backward.register_fake
def _(dy, x, shift, weight, bias, mean, rstd, groups, silu):
    per_sample = x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32)
    return (torch.empty_like(x), per_sample.new_empty(0) if shift is None else torch.empty_like(per_sample),
            per_sample, torch.empty_like(per_sample))


def _keep_for_backward(ctx, inputs, output):
    x, shift, weight, bias, groups, _, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, shift, weight, bias, mean, rstd)
    ctx.groups, ctx.silu = groups, silu
    ctx.mark_non_differentiable(mean, rstd)


def _gradients(ctx, dy, _dmean, _drstd):
    x, shift, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dshift, dweight, dbias = _backward(dy.contiguous(memory_format=torch.channels_last), x, shift, weight, bias,
                                           mean, rstd, ctx.groups, ctx.silu)
    dshift = None if shift is None else dshift.to(shift.dtype)
    return dx, dshift, dweight.sum(0).to(weight.dtype), dbias.sum(0).to(bias.dtype), None, None, None


_forward.register_autograd(_gradients, setup_context=_keep_for_backward)


@torch.compiler.assume_constant_result  # a fact of the machine: torch.compile bakes it in, no graph break
@functools.lru_cache(maxsize=None)
def ampere_or_newer(device_index: int) -> bool:
    """Whether the kernels run on this GPU: Triton's bf16 conversions need sm_80; older GPUs (V100) keep
    PyTorch's kernels."""
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def supports(x: torch.Tensor) -> bool:
    """Inputs the kernels are written for: 4-d channels_last activations in fp32, bf16 or fp16, on an
    Ampere or newer GPU (or on the CPU, under Triton's interpreter)."""
    return (x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and x.is_contiguous(memory_format=torch.channels_last) and x.numel() > 0
            and (not x.is_cuda or ampere_or_newer(x.device.index)))


def group_norm_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                    silu: bool, shift: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm(x + shift) (then SiLU if `silu`) for channels_last x, in x's dtype and layout.

    `shift` (B, C) is a per-sample, per-channel offset added before the norm (the U-Net's time
    conditioning), so that x + shift is never written out. Statistics, affine and SiLU are computed
    in fp32 and rounded once; the gradients come back in their inputs' dtypes."""
    if not supports(x):
        raise ValueError(f"group_norm_nhwc needs a 4-d channels_last fp32/bf16/fp16 tensor (on CUDA: sm_80 or "
                         f"newer), got {tuple(x.shape)} {x.dtype} with strides {x.stride()} on {x.device}")
    if x.shape[1] % groups:
        raise ValueError(f"groups={groups} must divide the channel count {x.shape[1]}")
    if shift is not None:
        if shift.shape != x.shape[:2]:
            raise ValueError(f"shift must be (batch, channels) = {tuple(x.shape[:2])}, got {tuple(shift.shape)}")
        shift = shift.contiguous()
    return _forward(x, shift, weight, bias, groups, eps, silu)[0]
