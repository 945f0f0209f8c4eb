"""The Triton GroupNorm(+shift, +SiLU) kernels that the U-Net uses on CUDA, run on the CPU by Triton's
interpreter (TRITON_INTERPRET=1 must be set before the kernels are defined, hence a subprocess), against
float64 PyTorch on the same input: the output and the gradients of the input, the shift, the weight
and the bias. The shapes cover several groups per program, a group size that leaves masked lanes
(12 channels), more rows than one tile, a single group, and channels past one program's block."""
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
import json, sys
import torch
import torch.nn.functional as F
from ctm_core.networks.group_norm_nhwc import group_norm_nhwc

torch.manual_seed(0)
results = []
for batch, channels, height, width, groups, silu, with_shift in json.loads(sys.argv[1]):
    # an offset mean (5) against a spread of 3: a sum of squares without the shift would lose digits
    x = (5 + 3 * torch.randn(batch, channels, height, width)).to(memory_format=torch.channels_last)
    inputs = [x, torch.randn(channels), torch.randn(channels)]
    inputs += [2 * torch.randn(batch, channels)] if with_shift else []
    inputs = [t.requires_grad_() for t in inputs]
    call = lambda x, w, b, *shift: group_norm_nhwc(x, w, b, groups, 1e-6, silu, *shift)
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
    results.append({"out": err(out, ref), "grads": [err(a, b) for a, b in zip(grads, ref_grads)],
                    "channels_last": out.is_contiguous(memory_format=torch.channels_last),
                    "compiled_same": same(compiled_out, out) and all(map(same, compiled_grads, grads)),
                    "dtypes": [str(g.dtype) for g in grads]})
print(json.dumps(results))
"""


def test_triton_group_norm_matches_float64_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case, result in zip(CASES, results, strict=True):
        assert result["out"] < 1e-6, (case, result)  # fp32 arithmetic: ~1e-7 against float64
        assert max(result["grads"]) < 1e-6, (case, result)
        assert result["channels_last"], case
        assert result["compiled_same"], case  # torch.compile keeps the operators: bit-identical, same layout
        assert result["dtypes"] == ["torch.float32"] * len(result["grads"]), case


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
