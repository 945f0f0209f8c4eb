"""Write samples of a trained run to .npy so anyone can score them with their own metric.

    python -m ctm_core.sample --ckpt RUN_DIR_OR_FILE --nfe 1 --gamma 0 --n 10000 --out samples.npy

CTM/CD checkpoints sample with gamma-sampling; an `edm` checkpoint (a teacher) with Heun
(--nfe is then the number of Heun grid points, NFE = 2 n - 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .builders import build_model
from .config import config_from_dict
from .samplers import gamma_sample, heun_sample


def load_run(path: str | Path, ema_rate: float | None = None, device: str = "cpu"):
    """(model, config) of a run dir (newest valid checkpoint) or a checkpoint file; EMA at eval_rate by default."""
    _, state = ckpt.resolve_run_state(path, "--ckpt")
    config = config_from_dict(state["config"])
    model = build_model(config, state["meta"])
    model.load_state_dict(ckpt.network_weights(state, config.ema.eval_rate if ema_rate is None else ema_rate))
    return model.to(device).eval().requires_grad_(False), config, state["meta"]


@torch.no_grad()
def generate(model, config, meta, n: int, nfe: int, gamma: float, seed: int, batch: int, device: str,
             labels: int | None = None) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for lo in tqdm(range(0, n, batch), desc="sampling", disable=not sys.stderr.isatty()):
        b = min(batch, n - lo)
        z = torch.randn((b, *meta["data_shape"]), generator=gen).to(device)
        y = None
        if config.data.class_conditional:
            y = torch.full((b,), labels, device=device) if labels is not None else \
                torch.randint(0, meta["num_classes"], (b,), generator=gen).to(device)
        if config.mode == "edm":
            x = heun_sample(lambda x, t: model.denoiser(x, t, y), z, nfe, model.process)
        else:
            x = gamma_sample(model, z, nfe, gamma, generator=gen, class_labels=y)
        out.append(x.float().cpu().numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctm_core.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint file")
    p.add_argument("--nfe", type=int, default=1)
    p.add_argument("--gamma", type=float, default=0.0)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--out", required=True, help="output .npy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--ema", type=float, default=None, help="EMA rate to sample (default: the run's eval_rate)")
    p.add_argument("--class-label", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    model, config, meta = load_run(args.ckpt, args.ema, args.device)
    samples = generate(model, config, meta, args.n, args.nfe, args.gamma, args.seed, args.batch, args.device,
                       args.class_label)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, samples)
    print(f"wrote {samples.shape} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
