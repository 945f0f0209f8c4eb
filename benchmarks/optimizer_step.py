"""The student's AdamW step on the CPU: per-parameter loop (torch's CPU default), foreach, fused.

    python benchmarks/optimizer_step.py [--config configs/digits_teacher.yaml] [--steps 100]

Why: the trainer builds its optimisers fused on every device; on the digits U-Net (206 tensors,
275k parameters) the default loop costs a noticeable share of a CPU training step.
"""
from __future__ import annotations

import argparse
import time

import torch

from ctm_core.builders import build_model, data_meta
from ctm_core.config import load_config
from ctm_core.data import load_dataset


def time_step(params: list[torch.Tensor], steps: int, **kwargs) -> float:
    optimizer = torch.optim.AdamW(params, lr=1e-3, **kwargs)
    for _ in range(5):
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits_teacher.yaml")  # the student shares its model
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    config = load_config(args.config)
    model = build_model(config, data_meta(load_dataset(config.data.spec, "train", seed=0)))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    print(f"{args.config}: {len(params)} tensors, {sum(p.numel() for p in params):,} parameters, "
          f"{torch.get_num_threads()} threads")
    print("| AdamW | ms/step |\n| --- | --- |")
    for name, kwargs in [("loop (CPU default)", {"foreach": False}), ("foreach", {"foreach": True}),
                         ("fused", {"fused": True})]:
        print(f"| {name} | {time_step(params, args.steps, **kwargs):.2f} |")


if __name__ == "__main__":
    main()
