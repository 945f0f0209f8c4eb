"""The core CTM trainer: one typed config in, metrics and checkpoints out, resumable at any step.

    python -m ctm_core.train --config FILE.yaml [--set key=value ...] [--print-config]

or `train(config, callbacks=[...])` from Python (Ray Tune and SLURM jobs wrap exactly this).
Randomness of step k is drawn from a generator seeded by (seed, k) for the *global* batch and
sliced per rank and microbatch, so results do not depend on the GPU count or on resuming.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from . import checkpoint as ckpt
from .builders import build_discriminator, build_model, build_optimizer, data_meta
from .config import (ConfigError, OptimConfig, TrainConfig, TrainLoopConfig, config_from_dict, config_to_dict,
                     load_config)
from .data import BatchStream, derived_seed, load_dataset, to_device
from .distributed import DistEnv, barrier, broadcast_object, init_distributed
from .ema import EMABank
from .evaluation import Evaluator, metric_key, save_sample_figure
from .losses import make_distance, sample_cd_times, sample_ctm_times, sample_dsm_times
from .networks.trunk import compile_options
from .networks.unet import HAS_TRITON, use_triton_norms
from .objective import DiscriminatorObjective, GeneratorObjective, MicroBatch, StepWeights
from .parameterization import CTMModel
from .process import karras_grid
from .schedules import learning_rate
from .teacher_graph import GraphedTeacher

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


class Callback:
    """Hooks through which Ray Tune, MLflow and SLURM attach; called on rank 0 only.

    state_dict()/load_state_dict() travel inside checkpoints (e.g. an MLflow run id), so a
    resumed run continues where it was.
    """

    def on_start(self, run: "RunInfo") -> None: ...
    def on_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_sample(self, step: int, path: Path) -> None: ...
    def on_end(self, result: "TrainResult") -> None: ...
    def state_dict(self) -> dict[str, Any]: return {}
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RunInfo:
    config: TrainConfig
    out_dir: Path
    start_step: int
    resumed_from: Path | None
    world_size: int


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    seconds: float = 0.0  # wall time of this train() call, set-up and evaluation included


# ----------------------------------------------------------------------------------------------
# Set-up

def _load_teacher(config: TrainConfig, device: torch.device) -> tuple[CTMModel, dict[str, Any]]:
    """The teacher is the EMA (at its own eval rate) of an `edm`-mode run; the student must share its architecture."""
    path, state = ckpt.resolve_run_state(config.teacher.checkpoint, "teacher.checkpoint")
    teacher_cfg = config_from_dict(state["config"])
    if teacher_cfg.mode != "edm":
        raise ValueError(f"teacher.checkpoint {path} comes from mode {teacher_cfg.mode!r}, not 'edm'")
    if teacher_cfg.model != config.model or teacher_cfg.process != config.process:
        raise ValueError(f"model and process sections must match the teacher's ({path}): "
                         f"teacher model={config_to_dict(teacher_cfg)['model']}")
    teacher = build_model(teacher_cfg, state["meta"])
    teacher.load_state_dict(ckpt.network_weights(state, teacher_cfg.ema.eval_rate))
    return teacher.to(device).eval().requires_grad_(False), state["meta"]


def _accelerate_teacher(teacher: CTMModel, loop: TrainLoopConfig, device: torch.device):
    """On CUDA: compile the frozen teacher's backbone and replay its denoiser as a CUDA graph, the
    fastest variant that stays exact (benchmarks/RESULTS.md). The solver gets the result; evaluation
    keeps the plain model (other batch shapes would each capture a graph)."""
    if device.type != "cuda":
        return teacher
    if loop.compile_teacher != "off":
        teacher.backbone.compile(**compile_options())
    return GraphedTeacher(teacher) if loop.teacher_graphs != "off" else teacher


def _refuse_cuda_only(loop: TrainLoopConfig, device: torch.device) -> None:
    """GPU-only accelerations forced 'on' without CUDA: refused before any data or network loads."""
    for flag in ("compile_teacher", "teacher_graphs", "target_graphs", "compile_features", "compile_heads",
                 "triton_norms"):
        if getattr(loop, flag) == "on" and device.type != "cuda":
            raise ValueError(f"train.{flag}=on needs a CUDA device (auto turns it on where there is one)")
    if loop.triton_norms == "on" and not HAS_TRITON:
        raise ValueError("train.triton_norms=on needs the triton package (PyTorch's Linux wheels bring it)")
    if loop.triton_norms == "on" and device.type == "cuda":
        from .networks.group_norm_nhwc import ampere_or_newer  # Triton is there: checked above

        if not ampere_or_newer(device.index):  # the trainer's CUDA device always names its index
            raise ValueError(f"train.triton_norms=on needs an Ampere or newer GPU (sm_80); "
                             f"{torch.cuda.get_device_name(device)} keeps PyTorch's GroupNorm (auto does that itself)")


def _prepare_loss_networks(lpips, discriminator, loop: TrainLoopConfig, device: torch.device) -> None:
    """The networks the step back-propagates through to its images (LPIPS, the projected
    discriminator). Their frozen feature networks (LPIPS's VGG16, the discriminator's backbones)
    recompute their activations in the backward instead of keeping them (auto: on CUDA) and are
    compiled on CUDA; so are the discriminator's heads, whose many small kernels (spectral norms)
    otherwise leave the GPU waiting for the host."""
    recompute = loop.recompute_features == "on" or (loop.recompute_features == "auto" and device.type == "cuda")
    for module in (lpips, discriminator):
        if hasattr(module, "recompute_features"):  # LPIPS, the projected discriminator
            module.recompute_features = recompute
    if device.type != "cuda":
        return
    if loop.compile_features != "off":
        if lpips is not None:
            lpips.compile_networks()
        for net in getattr(discriminator, "feature_nets", ()):
            net.compile()
    if loop.compile_heads != "off" and hasattr(discriminator, "compile_heads"):  # the projected discriminator
        discriminator.compile_heads()


def _use_bf16(config: TrainConfig, env: DistEnv) -> bool:
    return config.train.bf16 == "on" or (config.train.bf16 == "auto" and env.device.type == "cuda")


def _microbatch_size(config: TrainConfig, local_batch: int, gan_on: bool) -> int:
    """Per-process microbatch (a memory ceiling): the last microbatch of a step may be smaller, and
    per-sample loss normalisation keeps the gradient that of the whole batch."""
    size = (config.gan.micro_batch if gan_on and config.gan.micro_batch else config.data.micro_batch) or local_batch
    return min(size, local_batch)


def _rng_state(env: DistEnv) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def _set_rng_state(state: dict[str, Any], env: DistEnv) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and env.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], env.device)


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log. A kill in the middle of an append leaves the last line torn; that
    line is dropped with a warning, since the resumed run logs its step again. A bad line anywhere else
    is not a crash's trace, so it stops the resume with its line number instead of being lost quietly."""
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as err:
            if n == lines[-1][0]:
                warnings.warn(f"{path}:{n}: dropping a torn last line ({err}); the resumed run logs its step again")
                break
            raise ValueError(f"{path}:{n}: unreadable metrics record ({err}); fix or remove the line") from err
        records.append(record)
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint a resumed run restarts from (no duplicates), and a
    torn last line, so the run appends after whole lines."""
    if not path.exists():
        return
    keep = [record for record in read_metrics_log(path) if record["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in keep))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# One step's randomness

def _draw(config: TrainConfig, step: int, x_shape: tuple[int, ...], device: torch.device) -> dict[str, Any]:
    """The global batch's noise and times for this step, identical on every rank. For a CUDA device the
    noise is drawn straight into pinned memory, from which it is copied without holding the host back
    (data.to_device) and without a second copy on the host."""
    gen = torch.Generator().manual_seed(derived_seed("step", config.seed, step))
    batch = config.data.batch_size
    process = config.process
    pinned = device.type == "cuda"
    draw: dict[str, Any] = {"noise": torch.randn((batch, *x_shape), generator=gen, pin_memory=pinned)}
    draw["dsm_noise"] = torch.randn((batch, *x_shape), generator=gen, pin_memory=pinned)
    d = config.loss.dsm
    draw["dsm_t"] = sample_dsm_times(batch, process, gen, d.p_mean, d.p_std, d.uniform_fraction, d.xi_max)
    if config.mode == "cd":
        draw["times"] = sample_cd_times(batch, config.ctm.num_points, gen)
    elif config.mode != "edm":
        draw["times"], _ = sample_ctm_times(batch, config.ctm.num_points, config.ctm.max_steps, gen,
                                            config.ctm.step_weight_power, config.ctm.s_strategy)
    return draw


class _DrawsAhead:
    """Each step's draw, made one step ahead on a worker thread.

    The draw is host work (at batch 256 on CIFAR-10, ~12 ms of normals on an H100 host). Made at the
    top of its step, it kept the GPU idle: the host reaches that point having just launched the
    discriminator step, whose small kernels leave nothing queued (benchmarks/RESULTS.md, twelfth
    session). A draw depends only on (seed, step), so making it early changes no number."""

    def __init__(self, config: TrainConfig, x_shape: tuple[int, ...], device: torch.device, first_step: int):
        from concurrent.futures import ThreadPoolExecutor

        # pinned memory is allocated through the thread's current device: the rank's, not GPU 0 (a
        # context there per rank), as in DataLoader's pin-memory thread
        initializer = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctm-draw", initializer=initializer)
        self._make = lambda step: self._pool.submit(_draw, config, step, x_shape, device)
        self._last_step = config.train.steps - 1
        self._ahead = (first_step, self._make(first_step))

    def take(self, step: int) -> dict[str, Any]:
        drawn_for, future = self._ahead
        if drawn_for != step:
            raise RuntimeError(f"draws are taken in order: step {step} asked for, step {drawn_for} drawn")
        if step < self._last_step:
            self._ahead = (step + 1, self._make(step + 1))
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _slice_draw(draw: dict[str, Any], lo: int, hi: int, x0: torch.Tensor, labels, device) -> MicroBatch:
    times = draw.get("times")
    if times is not None:
        times = times.rows(lo, hi, device)
    return MicroBatch(x0=x0, labels=labels, noise=to_device(draw["noise"][lo:hi], device), times=times,
                      dsm_noise=to_device(draw["dsm_noise"][lo:hi], device),
                      dsm_t=to_device(draw["dsm_t"][lo:hi], device))


def _step_weights(config: TrainConfig, step: int) -> StepWeights:
    loss = config.loss
    return StepWeights(ctm=loss.lambda_ctm, dsm=loss.lambda_dsm(step), gan=loss.lambda_gan(step),
                       dsm_adaptive=loss.lambda_dsm.adaptive, gan_adaptive=loss.lambda_gan.adaptive,
                       dsm_clamp=(loss.lambda_dsm.adaptive_min, loss.lambda_dsm.adaptive_max),
                       gan_clamp=(loss.lambda_gan.adaptive_min, loss.lambda_gan.adaptive_max))


# ----------------------------------------------------------------------------------------------
# The loop

def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    started = time.perf_counter()
    env = init_distributed(config.runtime.device)
    _refuse_cuda_only(config.train, env.device)
    out_dir = Path(config.runtime.out_dir)
    meta_set = load_dataset(config.data.spec, "train", seed=config.seed)
    meta = data_meta(meta_set)
    x_all = meta_set.x.to(env.device)
    y_all = meta_set.y.to(env.device) if (config.data.class_conditional and meta_set.y is not None) else None
    kind = meta["kind"]

    # Networks: identical initialisation on every rank.
    torch.manual_seed(derived_seed("init", config.seed))
    teacher = None
    student = build_model(config, meta)
    if config.mode in ("ctm", "cd"):
        teacher, teacher_meta = _load_teacher(config, env.device)
        if teacher_meta["data_shape"] != meta["data_shape"]:
            raise ValueError(f"teacher.checkpoint was trained on data of shape {teacher_meta['data_shape']}, "
                             f"but data.spec gives {meta['data_shape']}")
        student.load_state_dict(teacher.state_dict())  # the paper initialises the student from the teacher
    check_inputs = env.device.type != "cuda"  # host syncs are costly on GPU; indices are valid by construction
    student.check_inputs = check_inputs
    if teacher is not None:
        teacher.check_inputs = check_inputs
    for net in (student, teacher):  # the EMA copies below inherit the student's choice
        if net is not None:
            use_triton_norms(net, config.train.triton_norms != "off")
    channels_last = kind == "image" and (config.train.channels_last == "on" or
                                         (config.train.channels_last == "auto" and env.device.type == "cuda"))
    layout = torch.channels_last if channels_last else torch.preserve_format
    student.to(env.device, memory_format=layout)
    if teacher is not None:
        teacher.to(memory_format=layout)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # shapes are fixed per microbatch size: autotune once
    rates = sorted(set(config.ema.rates) | {config.ema.target_rate, config.ema.eval_rate})
    ema = EMABank(student, rates).to(env.device)
    target = ema[config.ema.target_rate]
    # Fused on every device: one kernel on CUDA; on the CPU ~6x faster than torch's default per-tensor
    # loop for the digits U-Net (1.6 against 10.0 ms, benchmarks/optimizer_step.py).
    optimizer = build_optimizer(student.parameters(), config.optim, fused=True)
    discriminator, d_optimizer = None, None
    if not config.loss.lambda_gan.is_off and config.mode != "edm":
        discriminator = build_discriminator(config.gan, meta, config.runtime.cache_dir).to(env.device)
        d_params = [p for p in discriminator.parameters() if p.requires_grad]
        d_optim = OptimConfig(name=config.gan.optimizer, lr=config.gan.lr, betas=config.gan.betas)
        d_optimizer = build_optimizer(d_params, d_optim, fused=True)
    lpips = None
    if config.ctm.distance == "lpips":
        from .lpips_distance import LPIPSDistance
        lpips = LPIPSDistance(cache_dir=config.runtime.cache_dir).to(env.device)
    if channels_last:  # every image network in one layout: no conversions between them
        for module in (lpips, discriminator):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    _prepare_loss_networks(lpips, discriminator, config.train, env.device)
    distance = make_distance(config.ctm.distance, lpips)
    stream = BatchStream(len(meta_set), config.data.batch_size, config.seed, env.rank, env.world_size,
                         config.data.hflip)
    evaluator = Evaluator(config, load_dataset(config.data.spec, "test", seed=config.seed).x, kind, env.device,
                          config.runtime.cache_dir, meta["num_classes"] if config.data.class_conditional else 0
                          ) if env.is_main else None

    # Resume: rank 0 picks the checkpoint, every rank loads the same file.
    start_step, resumed_from, best = 0, None, None
    found = None
    if config.runtime.resume:
        latest = ckpt.load_latest_valid(out_dir, map_location=env.device) if env.is_main else None
        chosen = broadcast_object(str(latest[0]) if latest else None, env)
        if chosen:
            found = latest if env.is_main else (Path(chosen), ckpt.load_checkpoint(chosen, map_location=env.device))
    if found is not None:
        resumed_from, state = found
        student.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if discriminator is not None and state.get("discriminator") is not None:
            discriminator.load_state_dict(state["discriminator"])
            d_optimizer.load_state_dict(state["d_optimizer"])
        stream.load_state_dict(state["data_stream"])
        if env.is_main:
            _set_rng_state(state["rng"], env)
        start_step, best = state["step"], state.get("best")
        for cb in callbacks:
            cb.load_state_dict(state.get("callbacks", {}).get(type(cb).__name__, {}))
    else:
        ema.reset_to(student)
    if not env.is_main:
        torch.manual_seed(derived_seed("dropout", config.seed, env.rank, start_step))

    grid = karras_grid(config.ctm.num_points, student.process, torch.float32, env.device)
    solver_teacher = None if teacher is None else _accelerate_teacher(teacher, config.train, env.device)
    g_objective = GeneratorObjective(student, config, grid, distance, target, solver_teacher, discriminator,
                                     graph_jumps=env.device.type == "cuda" and config.train.target_graphs != "off")
    d_objective = DiscriminatorObjective(discriminator) if discriminator is not None else None
    if config.train.compile:  # the two U-Nets the step differentiates through: the student and the EMA target
        student.backbone.compile_trunk()
        if config.mode != "edm":
            target.backbone.compile_trunk()
    if env.is_distributed:
        g_objective = DistributedDataParallel(g_objective, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if d_objective is not None:
            d_objective = DistributedDataParallel(d_objective, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        _truncate_metrics(out_dir / METRICS_FILE, start_step)
    barrier(env)
    run = RunInfo(config, out_dir, start_step, resumed_from, env.world_size)
    if env.is_main:
        for cb in callbacks:
            cb.on_start(run)

    use_bf16 = _use_bf16(config, env)
    autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    metrics_file = open(out_dir / METRICS_FILE, "a") if env.is_main else None
    show_bar = env.is_main and (config.runtime.progress == "on" or
                                (config.runtime.progress == "auto" and sys.stderr.isatty()))
    from tqdm.auto import tqdm
    bar = tqdm(total=config.train.steps, initial=start_step, disable=not show_bar, desc=config.mode, dynamic_ncols=True)
    log_sums: dict[str, torch.Tensor] = {}
    log_count, t_last, last_ckpt, last_metrics = 0, time.perf_counter(), resumed_from, {}
    local_batch = stream.local_batch_size

    def evaluate_and_report(step: int) -> dict[str, float]:
        if not env.is_main:
            return {}
        student_for_eval = ema[config.ema.eval_rate] if config.mode != "edm" else None
        teacher_for_eval = ema[config.ema.eval_rate] if config.mode == "edm" else teacher
        scores, shown = evaluator.evaluate(student_for_eval, teacher_for_eval)
        if shown:
            figure = save_sample_figure(shown, evaluator.reference, kind, out_dir / "samples" / f"step_{step:09d}.png",
                                        f"{config.mode} step {step}")
            for cb in callbacks:
                cb.on_sample(step, figure)
        return scores

    step = start_step
    loop_scope = ExitStack()
    draws = _DrawsAhead(config, meta["data_shape"], env.device, start_step)
    loop_scope.callback(draws.close)
    if config.train.compile:
        # The CTM and GAN terms' gradients at the student's jump each go back through the EMA target (the first
        # with retain_graph), so its compiled backward runs twice per step; graphs that donate their buffers
        # refuse that (torch 2.11, H100).
        loop_scope.enter_context(torch._functorch.config.patch(donated_buffer=False))
    try:
        while step < config.train.steps:
            weights = _step_weights(config, step)
            gan_on = d_objective is not None and weights.gan > 0
            micro = _microbatch_size(config, local_batch, gan_on)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config.optim.lr, config.optim.warmup_steps, config.optim.decay,
                                            config.train.steps)
            draw = draws.take(step)
            x_batch, y_batch = stream.take(x_all, y_all)
            offset = env.rank * local_batch
            optimizer.zero_grad(set_to_none=True)
            fakes, logs_sum = [], {}
            for lo in range(0, local_batch, micro):
                hi = min(lo + micro, local_batch)
                mb = _slice_draw(draw, offset + lo, offset + hi, x_batch[lo:hi],
                                 None if y_batch is None else y_batch[lo:hi], env.device)
                sync = hi >= local_batch or not env.is_distributed
                with (nullcontext() if sync else g_objective.no_sync()), autocast(), record_function("train/objective"):
                    loss, logs, x_est = g_objective(mb, weights)
                with record_function("train/backward"):
                    (loss / local_batch).backward()
                if gan_on:
                    fakes.append((mb.x0, x_est))
                for k, v in logs.items():
                    _accumulate(logs_sum, k, v, (hi - lo) / local_batch)
            if config.optim.grad_clip:
                _accumulate(logs_sum, "grad_norm", torch.nn.utils.clip_grad_norm_(student.parameters(),
                                                                                  config.optim.grad_clip), 1.0)
            with record_function("train/optimizer_and_ema"):
                optimizer.step()
                ema.update(student)
            if gan_on:
                with record_function("train/discriminator"):
                    d_optimizer.zero_grad(set_to_none=True)
                    for i, (real, fake) in enumerate(fakes):
                        sync = i == len(fakes) - 1 or not env.is_distributed
                        with (nullcontext() if sync else d_objective.no_sync()), autocast():
                            d_loss = d_objective(real, fake)
                        (d_loss / local_batch).backward()
                        _accumulate(logs_sum, "loss_disc", d_loss, 1.0 / local_batch)
                    d_optimizer.step()
            step += 1
            for k, v in logs_sum.items():
                _accumulate(log_sums, k, v, 1.0)
            log_count += 1
            bar.update(1)

            if step % config.train.log_every == 0 or step == config.train.steps:
                packed = torch.stack([v.to(env.device) for v in log_sums.values()]) / log_count \
                    if log_sums else torch.zeros(0, dtype=torch.float64, device=env.device)
                if env.is_distributed:
                    dist.all_reduce(packed)
                    packed = packed / env.world_size
                means = dict(zip((f"train/{k}" for k in log_sums), packed.tolist()))  # the host's one wait per log
                now = time.perf_counter()
                means["train/it_per_s"] = log_count / max(now - t_last, 1e-9)
                means["train/lr"] = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{means.get('train/loss_ctm', means.get('train/loss_dsm', float('nan'))):.4g}")
                log_sums, log_count, t_last = {}, 0, now
                last_metrics.update(means)
                if env.is_main:
                    _emit(metrics_file, callbacks, step, means)

            is_last = step == config.train.steps
            if (config.eval.every and step % config.eval.every == 0) or is_last:
                scores = evaluate_and_report(step)
                if env.is_main and scores:
                    last_metrics.update(scores)
                    key = metric_key(evaluator.metric, 1) if config.mode != "edm" else next(iter(scores))
                    if key in scores and (best is None or scores[key] < best["value"]):
                        best = {"metric": key, "value": scores[key], "step": step}
                        scores["best/" + key] = scores[key]
                        ckpt.atomic_save(_state(step, config, meta, student, ema, optimizer, discriminator, d_optimizer,
                                                stream, env, best, callbacks, rates),
                                         out_dir / ckpt.BEST_NAME)
                    _emit(metrics_file, callbacks, step, scores)
                t_last = time.perf_counter()  # evaluation time is not training speed
            if step % config.train.ckpt_every == 0 or is_last:
                if env.is_main:
                    last_ckpt = ckpt.atomic_save(
                        _state(step, config, meta, student, ema, optimizer, discriminator, d_optimizer, stream, env,
                               best, callbacks, rates), ckpt.checkpoint_path(out_dir, step))
                    ckpt.prune_checkpoints(out_dir, config.train.keep_last)
                    for cb in callbacks:
                        cb.on_checkpoint(step, last_ckpt)
                barrier(env)
    finally:
        loop_scope.close()
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    final_file = out_dir / "final_metrics.json"
    # Resumed at the last step: nothing new to train, but a run stopped between its final checkpoint
    # and its end (final_metrics.json, callbacks' on_end, e.g. the MLflow run's FINISHED) still ends.
    ended_before = step == start_step and final_file.exists()
    if ended_before:
        last_metrics = {k: v for k, v in json.loads(final_file.read_text()).items()
                        if k not in ("step", "time/train_seconds")}
    elif step == start_step:
        last_metrics = _last_logged(out_dir / METRICS_FILE)
    result = TrainResult(out_dir, step, last_metrics, last_ckpt, time.perf_counter() - started)
    if env.is_main and (step > start_step or step >= config.train.steps):
        if not ended_before:  # with this call's wall time: sweeps account the teacher by it
            final_file.write_text(json.dumps({"step": step, **last_metrics, "time/train_seconds": result.seconds},
                                             indent=1))
        for cb in callbacks:
            cb.on_end(result)
    return result


def _last_logged(path: Path) -> dict[str, float]:
    """The newest value of every key in a metrics log (what the trainer held when it ended)."""
    latest: dict[str, float] = {}
    for record in read_metrics_log(path):
        latest.update({k: v for k, v in record.items() if k != "step"})
    return latest


def _accumulate(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor | float, weight: float) -> None:
    """sums[key] += weight * value, in float64 on the value's device: a float() per value and microbatch
    would make the host wait for the GPU several times a step."""
    value = torch.as_tensor(value).detach().to(torch.float64) * weight
    sums[key] = sums[key] + value if key in sums else value  # 0-dim: a CPU value joins a CUDA sum, no copy


def _emit(metrics_file, callbacks: Sequence[Callback], step: int, metrics: dict[str, float]) -> None:
    metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
    metrics_file.flush()
    for cb in callbacks:
        cb.on_metrics(step, metrics)


def _state(step, config, meta, student, ema, optimizer, discriminator, d_optimizer, stream, env, best, callbacks,
           rates) -> dict[str, Any]:
    return {
        "step": step, "config": config_to_dict(config), "meta": meta, "ema_rates": list(rates),
        "world_size": env.world_size,  # provenance only: results do not depend on it
        "model": student.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
        "discriminator": None if discriminator is None else discriminator.state_dict(),
        "d_optimizer": None if d_optimizer is None else d_optimizer.state_dict(),
        "data_stream": stream.state_dict(), "rng": _rng_state(env), "best": best,
        "callbacks": {type(cb).__name__: cb.state_dict() for cb in callbacks},
    }


# ----------------------------------------------------------------------------------------------
# CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctm_core.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-resume", action="store_true", help="start over even if out_dir has checkpoints")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["runtime.resume=false"] if args.no_resume else [])
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    result = train(config)
    print(json.dumps({"out_dir": str(result.out_dir), "step": result.step,
                      **{k: v for k, v in result.metrics.items() if k.startswith("eval/")}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
