"""Samples per second of CTM gamma-sampling (ctm_core.samplers.gamma_sample) at 1, 2 and 4 NFE.

The model is the CIFAR-10 configuration of configs/cifar10_ctm.yaml (DDPM++ U-Net, ~60M
parameters) with random weights (speed does not depend on them), in eval mode, channels_last,
input checks off (as the trainer's GPU path). Precisions: fp32 (strict, no TF32) and bf16
autocast (tf32 on request); optionally torch.compile of the backbone (bf16). MFU is relative to a bf16 matmul measured
in the same process (benchmarks/train_step.py's bf16_ceiling).

    python benchmarks/sample.py --out sample.json [--batch 512] [--nfe 1,2,4] [--compile]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ctm_core.builders import build_model  # noqa: E402
from ctm_core.networks import compile_options  # noqa: E402
from ctm_core.samplers import gamma_sample  # noqa: E402
from train_step import META, bf16_ceiling, count_flops, make_config, randomise_outputs, summary, time_ms  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--nfe", default="1,2,4")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile", action="store_true", help="also time bf16 with torch.compile of the backbone")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny network, for a CPU smoke test")
    p.add_argument("--out", default="sample.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    nfes = [int(n) for n in args.nfe.split(",")]
    t_start = time.perf_counter()

    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "batch": args.batch, "bf16_ceiling": bf16_ceiling(device), "rows": []}
    ceiling = results["bf16_ceiling"]["tflops"] * 1e12
    torch.manual_seed(0)
    model = build_model(make_config(64, 4, args.tiny), META)
    randomise_outputs(model, seed=3)
    model.check_inputs = False
    fmt = torch.channels_last if device.type == "cuda" else torch.preserve_format
    model = model.to(device, memory_format=fmt).eval().requires_grad_(False)
    z = torch.randn((args.batch, *META["data_shape"]), generator=torch.Generator().manual_seed(1)).to(device)

    def run(nfe: int, bf16: bool):
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return gamma_sample(model, z, nfe)

    flops = {nfe: count_flops(lambda: run(nfe, True)) for nfe in nfes}
    reference = {}
    plan = [(prec, False) for prec in args.precisions.split(",")] + ([("bf16", True)] if args.compile else [])
    for prec, compiled in plan:
        if prec not in ("fp32", "tf32", "bf16"):
            raise ValueError(f"precisions must be among fp32, tf32, bf16; got {prec!r}")
        torch.backends.cudnn.allow_tf32 = prec != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        if compiled:
            model.backbone.compile(**compile_options())
        for nfe in nfes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out = run(nfe, prec == "bf16")
            first_s = time.perf_counter() - t0
            if prec == "fp32" and not compiled:
                reference[nfe] = out.double()
            err = (float((out.double() - reference[nfe]).norm() / reference[nfe].norm()) if nfe in reference
                   else None)
            stats = summary(time_ms(lambda: run(nfe, prec == "bf16"), device, warmup=2, iters=args.iters))
            ms = stats["median_ms"]
            row = {"precision": prec + ("+compile" if compiled else ""), "nfe": nfe, **stats,
                   "samples_per_s": args.batch / (ms / 1e3), "first_call_s": first_s,
                   "tflops_per_s": flops[nfe] / (ms / 1e3) / 1e12, "mfu": flops[nfe] / (ms / 1e3) / ceiling,
                   "rel_err_vs_fp32": err,
                   "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
            results["rows"].append(row)
            print(f"[{time.perf_counter() - t_start:6.1f}s] {row['precision']:13s} nfe={nfe}: {ms:8.2f} ms, "
                  f"{row['samples_per_s']:9.1f} samples/s, MFU {100 * row['mfu']:.1f}%, err {err}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\ndevice: {results['device']}  batch {args.batch}  bf16 ceiling {results['bf16_ceiling']['tflops']:.0f} TFLOP/s")
    print(f"{'precision':14s} {'NFE':>3s} {'ms/batch':>9s} {'samples/s':>10s} {'MFU':>6s} {'rel.err':>8s}")
    for r in results["rows"]:
        err = f"{r['rel_err_vs_fp32']:.1e}" if r["rel_err_vs_fp32"] is not None else "-"
        print(f"{r['precision']:14s} {r['nfe']:3d} {r['median_ms']:9.2f} {r['samples_per_s']:10.1f} "
              f"{100 * r['mfu']:5.1f}% {err:>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
