"""The trainer itself (ctm_core.train) on one GPU at the CIFAR-10 setting: s/step with its GPU
defaults against the same run with the teacher accelerations off, and their losses compared.

    python benchmarks/trainer_gpu.py [--steps 40] [--batch 64] [--variants defaults,plain] [--out FILE.json]
    python benchmarks/trainer_gpu.py --ddp 1,2 [--variants plain]      # DDP scaling at a fixed per-GPU batch

With --ddp, each variant runs under torchrun once per GPU count, the global batch growing with it
(per-GPU batch fixed), and the table adds the scaling efficiency: (s/step on 1 GPU) / (s/step on n).

train_step.py times the step's parts in isolation; this runs the real loop (data stream, host
draws, microbatches, EMA, discriminator, logging, checkpoints) so the number is what a user gets.
Nothing is downloaded and no dataset is needed: data of CIFAR-10's shape (a fixed random .npy),
a teacher from a 1-step `edm` run whose (near-)zero layers are re-drawn at random, random-weight LPIPS VGG16 and discriminator feature networks in
a temporary weight cache, and a stand-in TorchScript detector for the (tiny) end-of-run evaluation.
Speed does not depend on the weights. The trainer logs every step; s/step is the mean of its
own 1/train/it_per_s over the steps after --warmup (compilation, cuDNN autotuning and graph
capture happen in the first steps). MFU divides those steps' FLOPs, each with its own solver step
count k, by their time; "at E[k]" rescales to a step of average k (StepFlops). Correctness: every variant starts from the same weights and
draws the same noise and times, so their step-1 losses differ by numerics only (bf16 runs then
drift apart over the steps, as two bf16 runs of the same variant would).

Variants (everything else as configs/cifar10_ctm.yaml, GAN on from step 0, bf16 autocast):
    defaults   the trainer's GPU defaults: channels_last everywhere, cuDNN autotuning, fused Adam,
               torch.compile of the teacher's backbone, its denoiser replayed as a CUDA graph,
               torch.compile of the frozen feature networks (LPIPS VGG16, discriminator backbones),
               the target branch's no-grad jumps (student, EMA target) replayed as CUDA graphs,
               the frozen feature networks' activations recomputed in the backward, not kept
    eager-features  defaults with train.compile_features=off
    plain      train.compile_teacher=off, train.teacher_graphs=off, train.compile_features=off,
               train.target_graphs=off, train.triton_norms=off, train.recompute_features=off,
               train.compile_heads=off
    compiled   defaults + train.compile=true (the student's and the EMA target's trunks too)
    nchw       defaults with train.channels_last=off (NCHW activations and weights)
    no-target-graphs  defaults with train.target_graphs=off (the target branch's two jumps eager)
    no-triton-norms   defaults with train.triton_norms=off (the U-Nets' GroupNorm through PyTorch)
    keep-features     defaults with train.recompute_features=off (the feature networks' activations kept)
    eager-heads       defaults with train.compile_heads=off (the discriminator's heads eager)
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctm_core.checkpoint import atomic_save, list_checkpoints, load_checkpoint  # noqa: E402
from ctm_core.config import load_config  # noqa: E402
from ctm_core.pretrained import WEIGHTS  # noqa: E402
from ctm_core.train import Callback, train  # noqa: E402

VARIANTS = {
    "defaults": [],
    "eager-features": ["train.compile_features=off"],
    "plain": ["train.compile_teacher=off", "train.teacher_graphs=off", "train.compile_features=off",
              "train.target_graphs=off", "train.triton_norms=off", "train.recompute_features=off",
              "train.compile_heads=off"],
    "compiled": ["train.compile=true"],
    "nchw": ["train.channels_last=off"],
    "no-target-graphs": ["train.target_graphs=off"],
    "no-triton-norms": ["train.triton_norms=off"],
    "keep-features": ["train.recompute_features=off"],
    "eager-heads": ["train.compile_heads=off"],
}


class StandInDetector(nn.Module):
    """NVIDIA's detector interface, `net(images, return_features=True)`, without Inception."""

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return images.float().flatten(1)[:, :64]


def random_weight_cache(folder: Path) -> None:
    """The cache entries the CIFAR-10 config reads, with random weights of the right architectures."""
    import timm
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.vgg16().state_dict(), folder / WEIGHTS["vgg16_lpips"].filename)
    for name in ("tf_efficientnet_lite0", "deit_base_distilled_patch16_224"):
        torch.save(timm.create_model(name, pretrained=False).state_dict(), folder / WEIGHTS[name].filename)


def redraw_near_zero_tensors(run_dir: Path, std: float = 0.02) -> int:
    """Give the teacher's zero-initialised layers (the U-Net's output conv, biases; after one step
    they are still ~0, in the EMA even more so) random values in its checkpoint, so that its outputs,
    and the numerics the variants are compared on, are not trivial."""
    _, path = list_checkpoints(run_dir)[-1]
    state = load_checkpoint(path)
    gen = torch.Generator().manual_seed(0)
    count = 0

    def redraw(tree):
        nonlocal count
        for key, value in tree.items():
            if isinstance(value, dict):
                redraw(value)
            elif torch.is_tensor(value) and value.is_floating_point() and value.numel() and value.abs().max() < 1e-4:
                tree[key] = torch.randn(value.shape, generator=gen, dtype=value.dtype) * std
                count += 1

    redraw(state["model"])
    redraw(state["ema"])
    atomic_save(state, path)
    return count


def variant_config(name: str, out: Path, teacher: Path, common: list[str], steps: int, extra: Sequence[str] = ()):
    """The CIFAR-10 CTM config of one variant (its logged it/s are the timings)."""
    return load_config(REPO / "configs" / "cifar10_ctm.yaml",
                       common + VARIANTS[name] + [f"teacher.checkpoint={teacher}", f"runtime.out_dir={out}",
                                                  f"train.steps={steps}", f"train.ckpt_every={steps}", *extra])


def step_timings(out: Path, warmup: int, until: int | None = None) -> tuple[list[dict], dict]:
    """(the run's log records, {s_per_step: mean over steps warmup+1..until, timed: their [first step, last
    step, seconds] per log record, warmup_s: the first `warmup` steps' seconds}). Each record covers the
    steps since the last. The mean, not the median: a step's cost depends on its solver step count k, and
    MFU divides the FLOPs of exactly the timed steps by their time (step_flops)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/it_per_s" in r]
    spans = [(before + 1, r["step"], (r["step"] - before) / r["train/it_per_s"])
             for r, before in zip(logged, [0] + [r["step"] for r in logged])]
    timed = [span for span in spans if span[0] > warmup and (until is None or span[1] <= until)]
    count = sum(last - first + 1 for first, last, _ in timed)
    return logged, {"s_per_step": sum(seconds for *_, seconds in timed) / count if count else float("nan"),
                    "timed": timed, "warmup_s": sum(seconds for first, _, seconds in spans if first <= warmup)}


class StepFlops:
    """FLOPs of each of a run's steps. A step's cost depends on the teacher's solver step count k,
    which the trainer draws per step (P(k) ~ k^power on 1..K): each Heun step is two teacher calls
    per image, and k's spread moves the step's FLOPs by -53% to +26% around E[k] at batch 256, so a
    handful of timed steps can sit well above or below it. `at_expected_k` is train_step.py's count at E[k]."""

    def __init__(self, config, at_expected_k: float):
        from torch.utils.flop_counter import FlopCounterMode

        from ctm_core.losses import solver_step_weights
        from ctm_core.train import _draw, _load_teacher

        teacher, meta = _load_teacher(config, torch.device("cpu"))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            teacher.denoiser(torch.zeros(1, *meta["data_shape"]), torch.ones(1))
        self.per_solver_step = 2 * counter.get_total_flops() * config.data.batch_size
        weights = solver_step_weights(config.ctm.num_points, config.ctm.max_steps, config.ctm.step_weight_power)
        self.expected_k = float((torch.arange(1, len(weights) + 1) * weights).sum() / weights.sum())
        self.at_expected_k = at_expected_k
        # k of the run's steps 1..train.steps: the trainer's own seeded draws, replayed once on the host
        self._solver_steps = [_draw(config, i, meta["data_shape"], torch.device("cpu"))["times"].steps
                              for i in range(config.train.steps)]

    def solver_steps(self, step: int) -> int:
        """k of the trainer's step `step` (1-based)."""
        return self._solver_steps[step - 1]

    def of_step(self, step: int) -> float:
        return self.at_expected_k + self.per_solver_step * (self.solver_steps(step) - self.expected_k)


class ProfilerStepper(Callback):
    """Advances a torch.profiler schedule once per training step (the trainer logs every step here)."""

    def __init__(self, profiler):
        self.profiler = profiler

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train/it_per_s" in metrics:
            self.profiler.step()


def _union_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy


def profile_summary(profiler, steps: int) -> str:
    """What the GPU did during the profiled steps: how busy it was (the rest is the host's launch
    overhead and syncs), the step's labelled parts (record_function in ctm_core) and the top kernels."""
    from torch.autograd import DeviceType

    from trace_regions import PREFIXES

    events = profiler.events()
    kernels = [(e.time_range.start, e.time_range.end) for e in events  # not the ranges' GPU-side annotations
               if e.device_type == DeviceType.CUDA and not e.name.startswith(PREFIXES + ("ProfilerStep",))]
    lines = []
    if kernels:
        window = max(b for _, b in kernels) - min(a for a, _ in kernels)
        busy = _union_us(kernels)
        lines.append(f"profiled steps: {steps}; GPU window {window / 1e3 / steps:.1f} ms/step, busy "
                     f"{busy / 1e3 / steps:.1f} ms/step ({100 * busy / window:.1f}%), "
                     f"{len(kernels) / steps:.0f} kernels/step")
    averages = profiler.key_averages()
    device_total = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)  # noqa: E731
    labelled = sorted((e for e in averages if e.key.startswith(PREFIXES)), key=lambda e: e.key)
    lines.append("\nlabelled ranges (per step): host ms, GPU ms of the kernels launched inside (backward passes "
                 "run on autograd's thread and count under train/backward only where launched there)")
    for e in labelled:
        lines.append(f"  {e.key:32s} calls {e.count / steps:5.1f}  host {e.cpu_time_total / 1e3 / steps:8.1f} ms  "
                     f"GPU {device_total(e) / 1e3 / steps:8.1f} ms")
    sort = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    lines.append("\n" + averages.table(sort_by=sort, row_limit=40, max_name_column_width=70))
    return "\n".join(lines)


class SyncFinder(Callback):
    """Turns torch.cuda's sync debug mode on after step `start` and off after step `stop`, and counts
    the warnings it raises by the ctm_core/benchmark lines on the stack (the trainer logs every step)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.counts: dict[str, int] = {}
        self._previous = None

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return self._previous(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/ctm_core/" in f.filename or "/benchmarks/" in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        self.counts[where] = self.counts.get(where, 0) + 1

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.start:
            self._previous, warnings.showwarning = warnings.showwarning, self._record
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif step == self.stop:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._previous
            warnings.resetwarnings()

    def report(self) -> str:
        steps = self.stop - self.start
        lines = [f"host waits for the GPU over {steps} steps (sync debug mode), by where they were asked for:"]
        lines += [f"  {count / steps:5.1f}/step  {where}" for where, count in
                  sorted(self.counts.items(), key=lambda item: -item[1])] or ["  none"]
        return "\n".join(lines)


def norm_plans() -> dict[str, dict[str, int]]:
    """How many of this process's GroupNorm call signatures kept each launch plan (channels, tile, warps),
    forward and backward (group_norm_nhwc.FastestPlan); empty where the Triton norms never ran."""
    module = sys.modules.get("ctm_core.networks.group_norm_nhwc")
    if module is None:
        return {}
    choosers = {"forward": module.FORWARD_PLANS, "backward": module.BACKWARD_PLANS}
    counts = {direction: collections.Counter(f"{plan.channels}/{plan.tile}/{plan.warps}"
                                             for plan in chooser.chosen().values())
              for direction, chooser in choosers.items()}
    return {direction: dict(count) for direction, count in counts.items() if count}


def run_variant(name: str, work: Path, teacher: Path, common: list[str], steps: int, warmup: int,
                profile_steps: int = 0, profile_out: Path | None = None, sync_debug: int = 0) -> dict:
    """One trainer run; with profile_steps, its last profile_steps steps run under torch.profiler
    (left out of s/step) and a summary (plus a Chrome trace) is written next to profile_out."""
    out = work / name
    config = variant_config(name, out, teacher, common, steps)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if profile_steps:
        from torch.profiler import ProfilerActivity, profile, schedule

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     schedule=schedule(skip_first=steps - profile_steps - 1, wait=0, warmup=1,
                                       active=profile_steps, repeat=1)) as profiler:
            train(config, [ProfilerStepper(profiler)])
        summary = profile_summary(profiler, profile_steps)
        print(summary)
        if profile_out is not None:
            profile_out.parent.mkdir(parents=True, exist_ok=True)
            (profile_out.parent / f"{profile_out.stem}_profile_{name}.txt").write_text(summary)
            trace = work / f"trace_{name}.json"
            profiler.export_chrome_trace(str(trace))
            import gzip
            import shutil

            with open(trace, "rb") as src, gzip.open(profile_out.parent / f"{profile_out.stem}_trace_{name}.json.gz",
                                                      "wb") as dst:
                shutil.copyfileobj(src, dst)
    elif sync_debug:
        finder = SyncFinder(warmup, warmup + sync_debug)
        train(config, [finder])
        print(f"{name}: {finder.report()}", flush=True)
    else:
        train(config)
    wall = time.perf_counter() - start
    logged, timings = step_timings(out, warmup, steps - profile_steps - 1 if profile_steps else None)
    return {"variant": name, "overrides": VARIANTS[name], "wall_s": wall, **timings,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss_ctm": [r["train/loss_ctm"] for r in logged], "loss_dsm": [r["train/loss_dsm"] for r in logged],
            "loss_gan_g": [r.get("train/loss_gan") for r in logged], "norm_plans": norm_plans()}


def run_ddp(name: str, work: Path, teacher: Path, common: list[str], steps: int, warmup: int, world: int,
            per_gpu: int) -> dict:
    """One variant under torchrun on `world` GPUs of this node, the global batch world x per_gpu."""
    import subprocess

    import yaml

    from ctm_core.config import config_to_dict

    out = work / f"{name}-ddp{world}"
    config = variant_config(name, out, teacher, common, steps, [f"data.batch_size={world * per_gpu}"])
    config_file = work / f"{name}-ddp{world}.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(config)))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                    "-m", "ctm_core.train", "--config", str(config_file)], cwd=REPO, check=True)
    wall = time.perf_counter() - start
    return {"variant": name, "world": world, "global_batch": world * per_gpu, "wall_s": wall,
            **step_timings(out, warmup)[1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of s/step")
    parser.add_argument("--batch", type=int, default=64, help="per-GPU batch (the paper: 256 on 4 GPUs)")
    parser.add_argument("--variants", default="defaults,plain")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--ddp", default="", help="GPU counts to run each variant on under torchrun, e.g. 1,2")
    parser.add_argument("--flops-per-step", type=float, default=0.0,
                        help="FLOPs of one step at the batch and at E[k] (train_step.py counts them: 1.097e14 at "
                             "batch 64); with it the bf16 matmul ceiling is measured here and the table gives MFU "
                             "over the timed steps, each step's FLOPs moved by its own solver step count k")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile each variant's last N steps (torch.profiler; left out of s/step); the summary "
                             "and a Chrome trace go next to --out")
    parser.add_argument("--log-every", type=int, default=1,
                        help="train.log_every: each log reads the step's sums back, so the host waits for the GPU "
                             "once per log (the shipped configs log every 100 steps); --steps and --warmup must be "
                             "multiples of it")
    parser.add_argument("--sync-debug", type=int, default=0, metavar="N",
                        help="after --warmup, list for N steps where the host waited for the GPU "
                             "(torch.cuda.set_sync_debug_mode), with the ctm_core lines that asked for it")
    args = parser.parse_args(argv)
    if args.log_every < 1 or args.steps % args.log_every or args.warmup % args.log_every:
        parser.error(f"--steps {args.steps} and --warmup {args.warmup} must be multiples of "
                     f"--log-every {args.log_every}")
    if args.log_every > 1 and (args.profile_steps or args.sync_debug):
        parser.error("--profile-steps and --sync-debug follow the steps through the logs: they need --log-every 1")
    if not torch.cuda.is_available():
        print("benchmarks/trainer_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    worlds = [int(w) for w in args.ddp.split(",") if w]
    if any(w < 1 or w > torch.cuda.device_count() for w in worlds):
        print(f"--ddp {args.ddp}: this node has {torch.cuda.device_count()} GPU(s)", file=sys.stderr)
        return 2
    if args.profile_steps and args.steps < args.warmup + args.profile_steps + 2:
        print(f"--profile-steps {args.profile_steps}: needs --steps >= warmup + profile steps + 2", file=sys.stderr)
        return 2
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        print(f"unknown variants {unknown}; known: {sorted(VARIANTS)}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="trainer-gpu-"))
    cache = work / "cache"
    random_weight_cache(cache)
    detector = work / "detector.pt"
    torch.jit.script(StandInDetector()).save(str(detector))
    data = work / "cifar_shape.npy"
    rng = np.random.default_rng(0)
    np.save(data, rng.uniform(-1, 1, size=(4096, 3, 32, 32)).astype(np.float32))
    common = [f"data.spec=npy:{data}", f"data.batch_size={args.batch}", f"data.micro_batch={args.batch}",
              f"gan.micro_batch={args.batch}", "loss.lambda_gan=1:adaptive", f"runtime.cache_dir={cache}",
              f"eval.inception={detector}", "eval.num_samples=64", "eval.teacher_steps=null", "eval.nfe=[1]",
              "eval.every=0", "runtime.progress=off", f"train.log_every={args.log_every}"]
    teacher = work / "teacher"
    train(load_config(REPO / "configs" / "cifar10_edm.yaml",
                      [c for c in common if not c.startswith(("gan.", "loss."))] +
                      [f"runtime.out_dir={teacher}", "train.steps=1", "train.ckpt_every=1"]))
    redraw_near_zero_tensors(teacher)

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "steps": args.steps, "variants": []}
    if args.flops_per_step:
        from train_step import bf16_ceiling

        results["bf16_ceiling"] = bf16_ceiling(torch.device("cuda"))
        results["flops_per_step"] = args.flops_per_step
    if worlds:
        results["ddp"] = []
        print(f"| variant | GPUs | global batch | s/step (mean after {args.warmup}) | img/s | scaling efficiency |")
        print("|---|---|---|---|---|---|")
        for name in names:
            for world in worlds:
                r = run_ddp(name, work, teacher, common, args.steps, args.warmup, world, args.batch)
                one = next((d for d in results["ddp"] if d["variant"] == name and d["world"] == 1), None)
                r["efficiency"] = one["s_per_step"] / r["s_per_step"] if one else None
                results["ddp"].append(r)
                efficiency = "-" if r["efficiency"] is None else f"{100 * r['efficiency']:.1f}%"
                print(f"| {name} | {world} | {r['global_batch']} | {r['s_per_step']:.3f} | "
                      f"{r['global_batch'] / r['s_per_step']:.1f} | {efficiency} |", flush=True)
    else:
        for name in names:
            r = run_variant(name, work, teacher, common, args.steps, args.warmup, args.profile_steps,
                            args.out or Path("trainer_gpu.json"), args.sync_debug)
            results["variants"].append(r)
            # a line per variant as it ends: a run stopped by a time limit still leaves the finished ones
            print(f"{name}: {r['s_per_step']:.3f} s/step (mean after {args.warmup}), first steps "
                  f"{r['warmup_s']:.0f} s, peak {r['peak_mem_gib']:.1f} GiB", flush=True)
            if r["norm_plans"]:  # kept per process: a later variant reuses what an earlier one measured
                print(f"{name}: GroupNorm launch plans kept (channels/tile/warps: signatures) {r['norm_plans']}")
            torch.cuda.empty_cache()
        base = results["variants"][0]
        ceiling = results.get("bf16_ceiling", {}).get("tflops")
        if ceiling:
            step_flops = StepFlops(variant_config(base["variant"], work / "flops", teacher, common, args.steps),
                                   args.flops_per_step)
            results["expected_solver_steps"] = step_flops.expected_k
            results["flops_per_solver_step"] = step_flops.per_solver_step
        print(f"| variant | s/step (mean after {args.warmup}) | mean k | s/step at E[k] | first {args.warmup} steps, s | "
              f"img/s at E[k] | peak GiB | MFU{f' (ceiling {ceiling:.0f} TFLOP/s)' if ceiling else ''} | "
              f"step-1 loss_ctm / loss_dsm / loss_gan rel. diff vs {base['variant']} |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results["variants"]:
            keys = ("loss_ctm", "loss_dsm", "loss_gan_g")
            diffs = [abs(r[k][0] - base[k][0]) / abs(base[k][0]) for k in keys]
            r["step1_rel_diff"] = dict(zip(keys, diffs))
            r["mfu"] = None
            if ceiling:  # the FLOPs of exactly the timed steps over their time
                timed_s = sum(seconds for *_, seconds in r["timed"])
                steps = [i for first, last, _ in r["timed"] for i in range(first, last + 1)]
                r["mean_solver_steps"] = sum(step_flops.solver_steps(i) for i in steps) / len(steps)
                r["mfu"] = sum(step_flops.of_step(i) for i in steps) / timed_s / (ceiling * 1e12)
                # the time a step at E[k] takes at this efficiency: comparable across windows of steps
                r["s_per_step_at_expected_k"] = args.flops_per_step / (r["mfu"] * ceiling * 1e12)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
            at_ek = r.get("s_per_step_at_expected_k")
            print(f"| {r['variant']} | {r['s_per_step']:.3f} | {r.get('mean_solver_steps', float('nan')):.2f} | "
                  f"{at_ek if at_ek else float('nan'):.3f} | {r['warmup_s']:.1f} | "
                  f"{args.batch / (at_ek or r['s_per_step']):.1f} | {r['peak_mem_gib']:.1f} | {mfu} | "
                  f"{' / '.join(f'{d:.1e}' for d in diffs)} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
