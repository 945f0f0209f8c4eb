"""The Triton GroupNorm(+shift, +SiLU) kernels that the U-Net uses on CUDA, run on the CPU by Triton's
interpreter (TRITON_INTERPRET=1 must be set before the kernels are defined, hence a subprocess), against
float64 PyTorch on the same input: the output and the gradients of the input, the shift, the weight
and the bias, through the operators and under every candidate launch plan. The shapes cover several
groups per program, a group size that leaves masked lanes (12 channels), more rows than one tile, a
single group, and channels past one program's block."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # PyTorch's Linux wheels bring it (CI's install included)

REPO = Path(__file__).resolve().parents[1]

CASES = [  # (B, C, H, W, groups, silu, shift)
    (2, 12, 4, 4, 3, True, False),
    (3, 16, 5, 3, 4, False, True),
    (2, 48, 4, 4, 4, True, True),      # 12 channels per group: a 64-lane block with 4 lanes masked
    (2, 256, 10, 10, 32, True, True),  # 100 rows > the 64-row tile; four programs per sample
    (1, 8, 3, 3, 1, True, False),
    (2, 512, 3, 3, 32, False, False),
]

SCRIPT = r"""
import dataclasses, json, sys
import torch
import torch.nn.functional as F
from ctm_core.networks import group_norm_nhwc as gn

torch.manual_seed(0)
results = []
for batch, channels, height, width, groups, silu, with_shift in json.loads(sys.argv[1]):
    # an offset mean (5) against a spread of 3: a sum of squares without the shift would lose digits
    x = (5 + 3 * torch.randn(batch, channels, height, width)).to(memory_format=torch.channels_last)
    inputs = [x, torch.randn(channels), torch.randn(channels)]
    inputs += [2 * torch.randn(batch, channels)] if with_shift else []
    inputs = [t.requires_grad_() for t in inputs]
    call = lambda x, w, b, *shift: gn.group_norm_nhwc(x, w, b, groups, 1e-6, silu, *shift)
    out = call(*inputs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    # as a compiled graph sees them (the operators' fake versions at tracing time; aot_eager: forward and
    # backward traced as one autograd function, like inductor, without a C++ compiler)
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    compiled_out = compiled(*inputs)
    compiled_grads = torch.autograd.grad(compiled_out, inputs, grad_out)
    same = lambda a, b: a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    shifted = ref_in[0] + (ref_in[3][:, :, None, None] if with_shift else 0)
    ref = F.group_norm(shifted, groups, ref_in[1], ref_in[2], 1e-6)
    ref = F.silu(ref) if silu else ref
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    err = lambda a, b: float((a.double() - b).norm() / b.norm())
    # every plan FastestPlan may pick on a GPU, through the launches the operators make
    x, weight, bias, shift = [t.detach() for t in inputs] + ([] if with_shift else [None])
    plans = []
    for plan in gn.CANDIDATE_PLANS:
        y, mean, rstd = gn.forward_with_plan(x, shift, weight, bias, groups, 1e-6, silu, plan)
        dx, dshift, dweight, dbias = gn.backward_with_plan(grad_out, x, shift, weight, bias, mean, rstd, groups,
                                                           silu, plan)
        plan_grads = [dx, dweight.sum(0), dbias.sum(0)] + ([dshift] if with_shift else [])
        plans.append({"plan": dataclasses.astuple(plan), "out": err(y, ref.detach()),
                      "grads": [err(a, b) for a, b in zip(plan_grads, ref_grads, strict=True)],
                      "channels_last": y.is_contiguous(memory_format=torch.channels_last)})
    results.append({"out": err(out, ref), "grads": [err(a, b) for a, b in zip(grads, ref_grads)],
                    "channels_last": out.is_contiguous(memory_format=torch.channels_last),
                    "compiled_same": same(compiled_out, out) and all(map(same, compiled_grads, grads)),
                    "dtypes": [str(g.dtype) for g in grads], "plans": plans})
print(json.dumps(results))
"""


def test_triton_group_norm_matches_float64_in_the_interpreter():
    """The operators (eager and compiled), and every launch plan FastestPlan may pick on a GPU: how a call is
    cut into programs and tiles changes the masking and the order of the sums, never the result beyond
    fp32 rounding."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    from ctm_core.networks.group_norm_nhwc import CANDIDATE_PLANS

    for case, result in zip(CASES, results, strict=True):
        assert result["out"] < 1e-6, (case, result)  # fp32 arithmetic: ~1e-7 against float64
        assert max(result["grads"]) < 1e-6, (case, result)
        assert result["channels_last"], case
        assert result["compiled_same"], case  # torch.compile keeps the operators: bit-identical, same layout
        assert result["dtypes"] == ["torch.float32"] * len(result["grads"]), case
        assert len(result["plans"]) == len(CANDIDATE_PLANS)
        for plan in result["plans"]:
            assert plan["out"] < 1e-6 and max(plan["grads"]) < 1e-6 and plan["channels_last"], (case, plan)


CHOICE_SCRIPT = r"""
import json, time
import torch
import torch.nn.functional as F
from ctm_core.networks import group_norm_nhwc as gn

launched = []
def wall_ms(run):  # the CPU's clock for the GPU's: each candidate really launches (in the interpreter)
    start = time.perf_counter()
    launched.append(run.args[0])
    run()
    return (time.perf_counter() - start) * 1e3
gn.FORWARD_PLANS, gn.BACKWARD_PLANS = gn.FastestPlan(time_ms=wall_ms), gn.FastestPlan(time_ms=wall_ms)
gn._may_time = lambda x: (lambda: True)  # as on a GPU outside a capture

torch.manual_seed(0)
x = (5 + 3 * torch.randn(2, 32, 5, 5)).to(memory_format=torch.channels_last).requires_grad_()
weight, bias, shift = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True), torch.randn(2, 32)
out = gn.group_norm_nhwc(x, weight, bias, 8, 1e-6, True, shift.requires_grad_())
grads = torch.autograd.grad(out, [x, weight, bias, shift], torch.ones_like(out))
ref_in = [t.detach().double().requires_grad_() for t in (x, weight, bias, shift)]
ref = F.silu(F.group_norm(ref_in[0] + ref_in[3][:, :, None, None], 8, ref_in[1], ref_in[2], 1e-6))
ref_grads = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
err = lambda a, b: float((a.double() - b).norm() / b.norm())
print(json.dumps({"out": err(out, ref), "grads": [err(a, b) for a, b in zip(grads, ref_grads)],
                  "launched": len(launched), "candidates": len(gn.CANDIDATE_PLANS),
                  "chosen": [len(gn.FORWARD_PLANS.chosen()), len(gn.BACKWARD_PLANS.chosen())]}))
"""


def test_the_operators_time_every_plan_on_their_own_launches_and_keep_one():
    """The wiring between the operators and FastestPlan: where timing is allowed (a GPU outside a capture),
    the forward and the backward operator each time every candidate through their own launch closures (here
    on the interpreter with the CPU's clock), keep one plan for the signature, and still return the norm."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", CHOICE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["launched"] == 2 * result["candidates"]  # forward and backward, every plan once
    assert result["chosen"] == [1, 1]
    assert result["out"] < 1e-6 and max(result["grads"]) < 1e-6, result


@pytest.mark.parametrize("arch", [80, 90])
def test_every_candidate_plan_compiles_for_ampere_and_hopper_without_spilling(arch):
    """The interpreter runs the kernels' Python, not Triton's compiler, which refuses more (a loop-carried
    value that changes type, say) and decides the registers. Each plan's kernels are compiled offline for
    A100 and H100 (no GPU needed) on the U-Net's widest 32x32 norm, with and without shift and SiLU: all
    must compile, and none may spill registers to local memory."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from group_norm_registers import plan_resources
    from triton.backends.compiler import GPUTarget

    from ctm_core.networks.group_norm_nhwc import CANDIDATE_PLANS

    target, x = GPUTarget("cuda", arch, 32), torch.empty(256, 512, 32, 32)
    seen = set()
    for plan in CANDIDATE_PLANS:
        for flags in ((True, True), (False, False)):
            _, _, usage = plan_resources(x, 32, plan, *flags, target)
            for kernel, (registers, spilled) in zip(("forward", "backward"), usage, strict=True):
                assert spilled == 0 and registers <= 255, (plan, flags, kernel, registers, spilled)
                seen.add(registers)
    assert len(seen) > 1  # the plans differ in what they hold per thread: the reading is real


def test_launch_plans_cut_calls_into_whole_groups():
    import torch

    from ctm_core.networks.group_norm_nhwc import CANDIDATE_PLANS, LaunchPlan, _launch_plan

    x = torch.empty(3, 256, 32, 32).to(memory_format=torch.channels_last)
    for plan in CANDIDATE_PLANS:
        grid, hw, per_program, options = _launch_plan(x, 32, plan)
        assert per_program % 8 == 0 and per_program <= max(plan.channels, 8)  # whole groups of 8 channels
        assert grid == (3, 256 // per_program) and hw == 1024
        assert options["BLOCK_C"] * options["BLOCK_HW"] <= max(plan.tile, options["BLOCK_C"])
        assert options["num_warps"] == plan.warps
    # a group wider than the plan's channels still gets a program of its own
    grid, _, per_program, options = _launch_plan(torch.empty(1, 512, 2, 2), 4, LaunchPlan(16, 1024, 2))
    assert (grid, per_program, options["BLOCK_C"], options["BLOCK_HW"]) == ((1, 4), 128, 128, 4)


def test_fastest_plan_times_each_candidate_once_per_signature_and_keeps_the_fastest():
    from ctm_core.networks.group_norm_nhwc import DEFAULT_PLAN, FastestPlan, LaunchPlan

    plans = (DEFAULT_PLAN, LaunchPlan(32, 2048, 4), LaunchPlan(16, 1024, 2))
    cost = {DEFAULT_PLAN: 3.0, plans[1]: 1.0, plans[2]: 2.0}
    launched, asked = [], []

    def time_ms(run):  # a fake GPU clock: runs the call once and charges its plan's cost
        return cost[run()]

    def run(plan):
        launched.append(plan)
        return plan

    def may_time():
        asked.append(True)
        return True

    choose = FastestPlan(plans, time_ms)
    assert choose(("a",), run, may_time) == plans[1]
    assert launched == list(plans)  # every candidate, once
    assert choose(("a",), run, may_time) == plans[1] and len(launched) == 3 and len(asked) == 1  # kept
    cost[plans[2]] = 0.5
    assert choose(("b",), run, may_time) == plans[2]  # another signature is measured on its own
    assert choose.chosen() == {("a",): plans[1], ("b",): plans[2]}
    # where nothing may be timed (the CPU, a CUDA-graph capture) the default runs and nothing is kept
    assert choose(("c",), run, lambda: False) == DEFAULT_PLAN and ("c",) not in choose.chosen()
    cost.update({plan: 1.0 for plan in plans})  # a tie keeps the earlier plan, the default first
    assert choose(("c",), run, may_time) == DEFAULT_PLAN and choose.chosen()[("c",)] == DEFAULT_PLAN


def test_group_norm_nhwc_refuses_layouts_and_shapes_it_was_not_written_for():
    import torch

    from ctm_core.networks.group_norm_nhwc import group_norm_nhwc

    weight, bias = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="channels_last"):
        group_norm_nhwc(torch.randn(2, 8, 4, 4), weight, bias, 2, 1e-6, True)  # NCHW
    x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="must divide"):
        group_norm_nhwc(x, weight, bias, 3, 1e-6, True)
    with pytest.raises(ValueError, match="shift must be"):
        group_norm_nhwc(x, weight, bias, 2, 1e-6, True, shift=torch.zeros(2, 4))
