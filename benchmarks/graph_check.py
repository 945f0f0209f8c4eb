"""GraphedJumps (the target branch's no-grad jumps replayed as CUDA graphs) against the eager jump, on
the CIFAR-10 U-Net (random weights), bf16 autocast, channels_last, batch 64. Needs a CUDA GPU.

    python3 benchmarks/graph_check.py

Checks: eval mode (no dropout): the replay equals the eager call; weights changed in place (as fused
Adam and the EMA change them) reach the replay; train mode: each replay draws fresh dropout masks, as
eager calls do; and times both per call.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctm_core.builders import build_model  # noqa: E402
from ctm_core.config import load_config  # noqa: E402
from ctm_core.teacher_graph import GraphedJumps, GraphReplay  # noqa: E402
from train_step import rel_err as rel  # noqa: E402


def per_call_ms(fn, iters: int = 20) -> float:
    """Mean ms of `iters` calls launched back to back (one sync at the end, unlike train_step.time_ms's
    per-call events): what a loop of them costs when the host, not the GPU, bounds it."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/graph_check.py needs a CUDA GPU")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "cifar10_edm.yaml")
    torch.manual_seed(0)
    model = build_model(config, {"data_shape": [3, 32, 32], "kind": "image", "num_classes": 0}).cuda()
    model = model.to(memory_format=torch.channels_last)
    model.check_inputs = False  # as the trainer runs it on GPU: no host syncs
    for p in model.parameters():  # the output layer starts at zero: give every path signal
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
    graphed = GraphedJumps(model)
    x = torch.randn(64, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    t = torch.rand(64, device="cuda") * 10 + 0.5
    s = t * torch.rand(64, device="cuda")
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad(), bf16():
        model.eval()
        first = graphed.jump(x, t, s)
        print(f"eval, replay vs eager: rel. diff {rel(first, model.jump(x, t, s)):.1e}")
        model.backbone.conv_out.weight.mul_(1.5)  # an in-place update, as the optimiser makes
        print(f"after an in-place weight change, replay vs eager: {rel(graphed.jump(x, t, s), model.jump(x, t, s)):.1e}"
              f" (the change moved the output by {rel(graphed.jump(x, t, s), first):.1e})")
        model.train()
        a = graphed.jump(x, t, 0.002)  # a new signature: captured now, in train mode
        b = graphed.jump(x, t, 0.002)
        print(f"train mode: two replays differ by {rel(a, b):.1e} (fresh dropout); two eager calls by "
              f"{rel(model.jump(x, t, 0.002), model.jump(x, t, 0.002)):.1e}")
        eager_ms = per_call_ms(lambda: model.jump(x, t, 0.002))
        graph_ms = per_call_ms(lambda: graphed.jump(x, t, 0.002))
        print(f"per call, batch 64: eager {eager_ms:.2f} ms, graph {graph_ms:.2f} ms")
        check_dropout_draws()


def check_dropout_draws() -> None:
    """Dropout alone through GraphReplay: fresh masks at each replay, and the draws do not depend on
    when the graph was captured (the warm-up's draws are given back to the generator)."""
    v = torch.randn(4096, device="cuda")
    draws = []
    for _ in range(2):
        torch.cuda.manual_seed(1)
        replay = GraphReplay(lambda u: torch.nn.functional.dropout(u, 0.5, True))
        draws.append([replay(v) for _ in range(3)])
    first = draws[0]
    print(f"dropout replays differ: {not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])}, "
          f"zeroed fraction {(first[0] == 0).float().mean().item():.3f}; same seed, new capture, same draws: "
          f"{all(torch.equal(a, b) for a, b in zip(*draws))}")


if __name__ == "__main__":
    main()
