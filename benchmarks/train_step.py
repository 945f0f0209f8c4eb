"""How fast is one CTM training step on a GPU, and how close is it to the chip's limit?

Builds the CIFAR-10 configuration (configs/cifar10_ctm.yaml: DDPM++ U-Net, ~60M parameters)
with random weights: a teacher, the student initialised from it, the EMA bank (target mu=0.999),
LPIPS on a random VGG16 state dict, and the paper's projected discriminator
(EfficientNet-lite0 + DeiT-base, random weights). Nothing is downloaded.

With --cache-dir the LPIPS VGG16 and the discriminator's feature networks are the pretrained
ones from the weight cache (speed is the same; the precision checks of the GAN term depend on
them: with random feature networks the GAN term's image gradient is ill-conditioned).

One *step* is what ctm_core.train does per iteration in the GAN phase: the trainer's host-side
draw of noise and times, GeneratorObjective (CTM with the teacher's Heun solver and LPIPS,
adaptive DSM, adaptive GAN term) and its backward per microbatch, the optimiser step, the EMA
update, then the discriminator step on the student's x_est. The solver step count k is fixed
(the trainer draws it with P(k) ~ k, E[k] = 11.7 for K = 17; 17 is the worst case).

Variants form a ladder (each adds one lever to the one before):
    fp32          strict fp32 (no TF32), the correctness reference
    bf16          bf16 autocast, otherwise as ctm_core.train does it today (student and EMA
                  channels_last, teacher NCHW with input checks on) except the optimiser:
                  foreach Adam until +fused (the trainer already uses fused on CUDA)
    +layout       channels_last for every network (teacher, LPIPS, discriminator) and the
                  teacher's input checks off (they sync the host on every NFE)
    +cudnn        torch.backends.cudnn.benchmark
    +fused        fused AdamW / Adam
    +graphs       the teacher's denoiser replayed as a CUDA graph (one capture per shape)
    +compile-teacher  torch.compile of the teacher's U-Net backbone (eval, no grad: one graph)
    +compile      torch.compile of every U-Net backbone (student, EMA target, teacher)

Precision policies, applied on top of the levers switched on so far:
    tf32               fp32 with TF32 matmuls/convs (what fp32 means by default in PyTorch)
    teacher-bf16       only the teacher's solver in bf16, the rest fp32/TF32
    bf16+teacher-fp32  everything in bf16 but the teacher's solver
    bf16+lpips-fp32    everything in bf16 but the LPIPS distance
    bf16-all           back to everything in bf16 (e.g. before +compile)

Each variant is checked against fp32 on one fixed batch (dropout and DiffAugment off so the two
runs are comparable): relative error of the loss, of x_est, of the student's and the
discriminator's gradients, and of each loss term's gradient on its own (g_all_*: all student
parameters, g_last_*: the last layer the adaptive weights use, g_img_gan: the GAN term w.r.t.
the image). +compile is checked only with --check-compiled (a second compilation). FLOPs are counted with FlopCounterMode on one eager step; MFU is
relative to a bf16 matmul measured in the same process.

    python benchmarks/train_step.py --out results.json [--batch 64] [--ks 12,17]
    python benchmarks/train_step.py --tiny --device cpu --batch 2 --ks 1 --no-flops   # CPU smoke test

benchmarks/RESULTS.md lists the exact commands behind each figure.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ctm_core.builders import build_model, build_optimizer  # noqa: E402
from ctm_core.config import TrainConfig, load_config  # noqa: E402
from ctm_core.ema import EMABank  # noqa: E402
from ctm_core.losses import (GridTimes, adaptive_weight, ctm_loss, dsm_loss, generator_adversarial_loss, last_layer_grad_norm,  # noqa: E402
                             make_distance)
from ctm_core.networks import compile_options  # noqa: E402
from ctm_core.networks.unet import UNetBlock  # noqa: E402
from ctm_core.objective import DiscriminatorObjective, GeneratorObjective, MicroBatch  # noqa: E402
from ctm_core.parameterization import CTMModel  # noqa: E402
from ctm_core.process import karras_grid  # noqa: E402
from ctm_core.teacher_graph import GraphedTeacher  # noqa: E402
from ctm_core.solvers import solve_on_grid  # noqa: E402
from ctm_core.train import _draw, _slice_draw, _step_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cifar10_ctm.yaml"
META = {"data_shape": [3, 32, 32], "num_classes": 0, "kind": "image"}
LADDER = ["fp32", "bf16", "+layout", "+cudnn", "+fused", "+graphs", "+compile-teacher", "+compile"]
# precision policies applied on top of whatever the ladder has switched on so far
POLICIES = ["tf32", "teacher-bf16", "bf16+teacher-fp32", "bf16+lpips-fp32", "bf16-all"]
GAN_STEP = 60_000  # a step inside the GAN phase of cifar10_ctm.yaml (lambda_gan '1@50000')


# ----------------------------------------------------------------------------------------------
# Timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int,
            budget_s: float | None = None) -> list[float]:
    """Per-call wall times in ms (device events on CUDA), after `warmup` untimed calls.

    With budget_s, the number of timed calls is cut to what fits in that many seconds
    (at least 3), judged from the first timed call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    for i in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and i == 0:
            iters = max(min(3, iters), min(iters, int(budget_s * 1e3 / max(times[0], 1e-3))))
        if i + 1 >= iters:
            break
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": len(times)}


def bf16_ceiling(device: torch.device, n: int = 8192, reps: int = 20) -> dict[str, float]:
    """TFLOP/s of an n x n x n bf16 matmul on random data (rotating two input sets), median."""
    if device.type != "cuda":
        return {"tflops": float("nan"), "n": n}
    gen = torch.Generator(device=device).manual_seed(0)
    sets = [(torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen),
             torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)) for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    it = iter(range(10 ** 9))
    times = time_ms(lambda: torch.mm(*sets[next(it) % 2], out=out), device, warmup=5, iters=reps)
    ms = statistics.median(times)
    del sets, out
    torch.cuda.empty_cache()
    return {"tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12, "median_ms": ms, "n": n}


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# The networks (random weights, nothing downloaded)

def make_config(batch: int, world: int, tiny: bool) -> TrainConfig:
    overrides = ["teacher.checkpoint=unused-by-the-benchmark", f"data.batch_size={batch * world}"]
    if tiny:
        overrides += ["model.model_channels=16", "model.channel_mult=[1,2]", "model.num_blocks=1", "ctm.num_points=6",
                      "ctm.max_steps=5"]
    return load_config(str(CONFIG), overrides)


def randomise_outputs(model: CTMModel, seed: int) -> None:
    """A fresh DDPM++ U-Net zero-initialises its output conv and near-zeroes every residual
    branch's last conv, so F = 0 and most gradients vanish. Give those layers ordinary
    random weights, so speed and precision are measured on a network that computes something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and (name.endswith("conv1") or name.endswith("conv_out")
                                                  or name.endswith("attn.proj")):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(0.01 * torch.randn(module.bias.shape, generator=gen))


def random_vgg16_file(directory: Path) -> Path:
    """A torchvision-VGG16-shaped `features.*` state dict with random weights (LPIPS backbone)."""
    import torchvision

    torch.manual_seed(1)
    features = torchvision.models.vgg16().features
    path = directory / "vgg16_random_features.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def build_discriminator(tiny: bool, cache_dir: str | None = None) -> nn.Module:
    from ctm_core.discriminators import build_paper_discriminator, build_projected_discriminator

    names = ["tf_efficientnet_lite0", "deit_base_distilled_patch16_224"]
    torch.manual_seed(2)
    if cache_dir is not None:
        return build_paper_discriminator(cache_dir=cache_dir)  # the pretrained feature networks
    if tiny:
        return build_projected_discriminator(names, [None, None], input_size=32,
                                             model_kwargs=[None, {"img_size": 32, "depth": 2}])
    return build_projected_discriminator(names, [None, None])


class Setup:
    """Everything one step touches, built as ctm_core.train builds it (random weights)."""

    def __init__(self, config: TrainConfig, device: torch.device, tiny: bool, workdir: Path,
                 cache_dir: str | None = None):
        from ctm_core.lpips_distance import LPIPSDistance

        self.config, self.device = config, device
        torch.manual_seed(0)
        teacher = build_model(config, META)
        randomise_outputs(teacher, seed=3)
        self.teacher = teacher.to(device).eval().requires_grad_(False)  # as train._load_teacher
        student = build_model(config, META)
        student.load_state_dict(teacher.state_dict())
        student.check_inputs = device.type != "cuda"
        fmt = torch.channels_last if device.type == "cuda" else torch.preserve_format
        self.student = student.to(device, memory_format=fmt)
        rates = sorted(set(config.ema.rates) | {config.ema.target_rate, config.ema.eval_rate})
        self.ema = EMABank(student, rates).to(device)
        self.target = self.ema[config.ema.target_rate]
        if cache_dir is not None:  # the pretrained VGG16 from the weight cache
            self.lpips = LPIPSDistance(resize_to=None if tiny else 224, cache_dir=cache_dir).to(device)
        else:
            self.lpips = LPIPSDistance(resize_to=None if tiny else 224,
                                       backbone_path=random_vgg16_file(workdir)).to(device)
        self.distance = make_distance("lpips", self.lpips)
        self.discriminator = build_discriminator(tiny, cache_dir).to(device)
        self.grid = karras_grid(config.ctm.num_points, student.process, torch.float32, device)
        self.g_objective = GeneratorObjective(student, config, self.grid, self.distance, self.target, self.teacher,
                                              self.discriminator)
        self.d_objective = DiscriminatorObjective(self.discriminator)
        self.set_optimizers(fused=False)
        self.flags = {"bf16": False, "tf32": False, "layout": False, "cudnn_benchmark": False, "fused": False,
                      "graphs": False, "compile": False, "teacher": None, "lpips_fp32": False}
        self.compiled: list[CTMModel] = []
        self.retired: list[Any] = []
        self.snapshot = {name: copy.deepcopy(m.state_dict()) for name, m in self.modules().items()}

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "ema": self.ema, "discriminator": self.discriminator}

    def set_optimizers(self, fused: bool) -> None:
        self.optimizer = build_optimizer(self.student.parameters(), self.config.optim, fused=fused)
        d_params = [p for p in self.discriminator.parameters() if p.requires_grad]
        kwargs = {"fused": True} if fused else {}
        self.d_optimizer = torch.optim.Adam(d_params, lr=self.config.gan.lr, betas=tuple(self.config.gan.betas),
                                            **kwargs)

    def restore(self) -> None:
        """Back to the initial weights (in place: compiled code and CUDA graphs stay valid)."""
        for name, module in self.modules().items():
            module.load_state_dict(self.snapshot[name])
        self.optimizer.state.clear()
        self.d_optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)
        self.d_optimizer.zero_grad(set_to_none=True)

    def teacher_impl(self):
        """The teacher object in use without precision wrappers (plain or CUDA-graphed)."""
        teacher = self.g_objective._frozen["teacher"]
        return teacher.teacher if isinstance(teacher, AutocastTeacher) else teacher

    def unets(self) -> list[CTMModel]:
        return [self.student, self.teacher, *self.ema.averages]

    def set_randomness(self, on: bool) -> None:
        """Dropout of every U-Net and the discriminator's DiffAugment on (as trained) or off (checks)."""
        for model in self.unets():
            if not model.training:
                continue  # the teacher runs in eval mode: its dropout is off anyway (and compiled code stays valid)
            for m in model.modules():
                if isinstance(m, UNetBlock):
                    m.dropout = self.config.model.dropout if on else 0.0
        self.discriminator.diffaug.policy = ("color", "translation", "cutout") if on else ()


# ----------------------------------------------------------------------------------------------
# Teacher wrappers (the CUDA-graphed one is ctm_core.teacher_graph.GraphedTeacher, as in the trainer)

class AutocastTeacher:
    """The teacher's denoiser in a fixed precision (bf16 autocast on or off), whatever the caller's."""

    def __init__(self, teacher, bf16: bool):
        self.teacher, self.bf16 = teacher, bf16

    def __getattr__(self, name: str) -> Any:
        return getattr(self.teacher, name)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.teacher.denoiser(x, t, class_labels)


class FP32Distance(nn.Module):
    """A distance computed in fp32 even inside an autocast region."""

    def __init__(self, distance: nn.Module):
        super().__init__()
        self.inner = distance

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.inner(x.float(), y.float())


# ----------------------------------------------------------------------------------------------
# Variants

def apply_variant(setup: Setup, name: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Turn on the lever `name` (the ladder is cumulative). Returns the flags now in force."""
    flags = setup.flags
    cuda = setup.device.type == "cuda"
    if name == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    elif name == "bf16":
        flags["bf16"] = True
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's defaults for what autocast leaves in fp32
    elif name == "+layout":
        flags["layout"] = True
        setup.teacher.check_inputs = False
        if cuda:
            for module in (setup.teacher, setup.lpips, setup.discriminator):
                module.to(memory_format=torch.channels_last)
    elif name == "+cudnn":
        flags["cudnn_benchmark"] = True
        torch.backends.cudnn.benchmark = True
    elif name == "+fused":
        flags["fused"] = True
        if cuda:
            setup.set_optimizers(fused=True)
    elif name == "+graphs":
        flags["graphs"] = cuda
        if cuda:
            graphed = GraphedTeacher(setup.teacher)
            current = setup.g_objective._frozen["teacher"]
            setup.g_objective._frozen["teacher"] = (AutocastTeacher(graphed, current.bf16)
                                                    if isinstance(current, AutocastTeacher) else graphed)
    elif name in POLICIES:
        bf16, tf32, teacher_prec, lpips_fp32 = {
            "tf32": (False, True, None, False),               # fp32 with TF32 (PyTorch's default for convs)
            "teacher-bf16": (False, True, "bf16", False),     # only the teacher's solver in bf16
            "bf16+teacher-fp32": (True, False, "fp32", False),  # all bf16 but the teacher
            "bf16+lpips-fp32": (True, False, None, True),     # all bf16 but LPIPS
            "bf16-all": (True, False, None, False),           # back to everything in bf16
        }[name]
        flags.update(bf16=bf16, tf32=tf32, teacher=teacher_prec, lpips_fp32=lpips_fp32)
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        impl = setup.teacher_impl()
        setup.g_objective._frozen["teacher"] = impl if teacher_prec is None else AutocastTeacher(impl, teacher_prec == "bf16")
        setup.g_objective.distance = FP32Distance(setup.distance) if lpips_fp32 else setup.distance
    elif name in ("+compile-teacher", "+compile"):
        flags["compile"] = "teacher" if name == "+compile-teacher" else "all"
        dyn = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                    "accumulated_cache_size_limit"):
            if hasattr(dyn, key):
                setattr(dyn, key, max(getattr(dyn, key), 256))
        models = [setup.teacher] if name == "+compile-teacher" else setup.unets()
        for model in models:
            if model not in setup.compiled:
                model.backbone.compile(**compile_options())
                setup.compiled.append(model)
        current = setup.g_objective._frozen["teacher"]
        if isinstance(setup.teacher_impl(), GraphedTeacher) and setup.teacher in models:
            setup.retired.append(setup.teacher_impl())  # keep the old graphs (and their pool) alive
            graphed = GraphedTeacher(setup.teacher)       # recapture over the compiled code, in a new pool
            setup.g_objective._frozen["teacher"] = (AutocastTeacher(graphed, current.bf16)
                                                    if isinstance(current, AutocastTeacher) else graphed)
    else:
        raise ValueError(f"variant must be one of {LADDER + POLICIES}, got {name!r}")
    setup.flags = flags
    return dict(flags)


def autocast_ctx(setup: Setup):
    if setup.flags["bf16"]:
        return torch.autocast(setup.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# One trainer step

class Batches:
    """Fixed data and fixed-k times for the global batch (the draw's noise comes from the
    trainer's own _draw each step, as in ctm_core.train)."""

    def __init__(self, setup: Setup, batch: int, seed: int = 0):
        cfg = setup.config
        gen = torch.Generator().manual_seed(seed)
        self.global_batch = cfg.data.batch_size
        self.x = (torch.rand((batch, *META["data_shape"]), generator=gen) * 2 - 1).to(setup.device)
        self.num_points = cfg.ctm.num_points
        self.gen = gen

    def times(self, k: int) -> GridTimes:
        n_pts, b = self.num_points, self.global_batch
        n = torch.randint(0, n_pts - k, (b,), generator=self.gen)
        u = n + k
        s = u + (torch.rand(b, generator=self.gen, dtype=torch.float64) * (n_pts - u)).long()
        return GridTimes(n, u, s, steps=k)


def train_step(setup: Setup, batches: Batches, step: int, k: int, micro: int, gan: bool) -> dict[str, float]:
    """ctm_core.train's loop body for rank 0 (same calls, same order, same host syncs)."""
    cfg, device = setup.config, setup.device
    weights = _step_weights(cfg, GAN_STEP if gan else 0)
    gan_on = weights.gan > 0
    local_batch = batches.x.shape[0]
    draw = _draw(cfg, step, tuple(META["data_shape"]), device)
    draw["times"] = batches.times(k)  # fixed k (the trainer draws it)
    setup.optimizer.zero_grad(set_to_none=True)
    fakes, logs_sum = [], {}
    for lo in range(0, local_batch, micro):
        hi = lo + micro
        mb = _slice_draw(draw, lo, hi, batches.x[lo:hi], None, device)
        with autocast_ctx(setup):
            loss, logs, x_est = setup.g_objective(mb, weights)
        (loss / local_batch).backward()
        if gan_on:
            fakes.append((mb.x0, x_est))
        for key, v in logs.items():
            logs_sum[key] = logs_sum.get(key, 0.0) + float(v) * (hi - lo) / local_batch
    setup.optimizer.step()
    setup.ema.update(setup.student)
    if gan_on:
        setup.d_optimizer.zero_grad(set_to_none=True)
        for real, fake in fakes:
            with autocast_ctx(setup):
                d_loss = setup.d_objective(real, fake)
            (d_loss / local_batch).backward()
            logs_sum["loss_disc"] = logs_sum.get("loss_disc", 0.0) + float(d_loss.detach()) / local_batch
        setup.d_optimizer.step()
    return logs_sum


# ----------------------------------------------------------------------------------------------
# Correctness against fp32

def check_batch(setup: Setup, batch: int, k: int) -> MicroBatch:
    cfg, device = setup.config, setup.device
    draw = _draw(cfg, 12345, tuple(META["data_shape"]), device)
    b = Batches(setup, batch, seed=7)
    draw["times"] = b.times(k)
    return _slice_draw(draw, 0, batch, b.x, None, device)


def check_step(setup: Setup, mb: MicroBatch) -> dict[str, torch.Tensor]:
    """Loss, x_est and gradients of one generator + discriminator pass from the initial weights,
    with dropout and DiffAugment off (so fp32 and the variant compute the same function)."""
    setup.restore()
    setup.set_randomness(False)
    try:
        weights = _step_weights(setup.config, GAN_STEP)
        with autocast_ctx(setup):
            loss, logs, x_est = setup.g_objective(mb, weights)
        loss.backward()
        g_student = torch.cat([p.grad.reshape(-1).double() for p in setup.student.parameters() if p.grad is not None])
        with autocast_ctx(setup):
            d_loss = setup.d_objective(mb.x0, x_est)
        d_loss.backward()
        g_disc = torch.cat([p.grad.reshape(-1).double() for p in setup.discriminator.parameters()
                            if p.grad is not None])
        # the objective returns a surrogate with the loss's gradient; the loss itself is the logs' weighted sum
        total = logs["loss_ctm"].double() + sum(logs[f"weight_{k}"].double() * logs[f"loss_{k}"].double()
                                                for k in ("dsm", "gan") if f"loss_{k}" in logs)
        out = {"loss": total.detach().reshape(1), "x_est": x_est.detach().double(),
               "grad_student": g_student, "loss_disc": d_loss.detach().double().reshape(1), "grad_disc": g_disc}
        out.update({f"log_{key}": v.detach().double().reshape(1) for key, v in logs.items()})
        out.update(term_gradients(setup, mb))
        return {key: v.cpu() for key, v in out.items()}
    finally:
        setup.set_randomness(True)
        setup.restore()


def term_gradients(setup: Setup, mb: MicroBatch) -> dict[str, torch.Tensor]:
    """Each loss term's gradient on its own: w.r.t. all student parameters ('g_all_*'), w.r.t.
    the last layer (what the adaptive weights compare, 'g_last_*'), and the GAN term's gradient
    w.r.t. the image it judges ('g_img_gan'). Tells which term loses precision."""
    cfg, student, g_obj = setup.config, setup.student, setup.g_objective
    params = [p for p in student.parameters() if p.requires_grad]
    last = student.backbone.last_layer_weight()
    with autocast_ctx(setup):
        solver = g_obj._solver(None, mb.times.steps)
        l_ctm, x_est, _ = ctm_loss(student, setup.target, solver, mb.x0, mb.noise, mb.times, setup.grid,
                                   g_obj.distance, cfg.ctm.target_inner)
        l_ctm = l_ctm.mean()
        l_dsm = dsm_loss(lambda x, tt: student.denoiser(x, tt), mb.x0, mb.dsm_t, mb.dsm_noise, cfg.loss.dsm.weighting,
                         student.process.sigma_data).mean()
        l_gan = generator_adversarial_loss(setup.discriminator, x_est)
        image = x_est.detach().requires_grad_(True)
        l_gan_image = generator_adversarial_loss(setup.discriminator, image)
    out = {"g_img_gan": torch.autograd.grad(l_gan_image, image)[0].double()}
    for name, term in (("ctm", l_ctm), ("dsm", l_dsm), ("gan", l_gan)):
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[f"g_all_{name}"] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                                          for g, p in zip(grads, params)])
        out[f"g_last_{name}"] = torch.autograd.grad(term, last, retain_graph=True)[0].double()
    return {key: v.detach() for key, v in out.items()}


def fused_vs_foreach(setup: Setup, steps: int = 3) -> float:
    """Relative difference of the parameter change after `steps` AdamW steps on the same random
    gradients: fused kernel vs the default (foreach) implementation."""
    params = list(setup.student.parameters())
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.empty_like(p).copy_(1e-3 * torch.randn(p.shape, generator=gen)) for p in params]
             for _ in range(steps)]  # empty_like keeps each parameter's memory format, as real gradients do
    start = [p.detach().clone() for p in params]
    deltas = []
    for fused in (False, True):
        opt = build_optimizer(params, setup.config.optim, fused=fused)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        with torch.no_grad():
            deltas.append(torch.cat([(p - s0).reshape(-1).double() for p, s0 in zip(params, start)]))
            for p, s0 in zip(params, start):
                p.copy_(s0)
                p.grad = None
    return rel_err(deltas[1], deltas[0])


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# Components (each timed alone, at the variant's settings)

def component_fns(setup: Setup, batch: int, k: int) -> dict[str, Callable[[], Any]]:
    cfg, device = setup.config, setup.device
    mb = check_batch(setup, batch, k)
    grid = setup.grid
    t, u, s = grid[mb.times.t_idx], grid[mb.times.u_idx], grid[mb.times.s_idx]
    end = setup.student.process.sigma_min
    x_t = mb.x0 + t.view(-1, 1, 1, 1) * mb.noise
    teacher = setup.g_objective._frozen["teacher"]
    amp = lambda: autocast_ctx(setup)  # noqa: E731
    with torch.no_grad(), amp():
        x_est0 = setup.target.jump(setup.student.jump(x_t, t, s), s, end)
    x_other = x_est0 + 0.05 * torch.randn_like(x_est0)

    def host_draw():
        _draw(cfg, 0, tuple(META["data_shape"]), device)

    def teacher_solver():
        with torch.no_grad(), amp():
            solve_on_grid(lambda x, tt: teacher.denoiser(x, tt, None), x_t, grid, mb.times.t_idx, mb.times.u_idx,
                          cfg.teacher.solver, cfg.ctm.max_steps, mb.times.steps)

    def student_fwd_bwd():
        with amp():
            y = setup.student.jump(x_t, t, s)
        y.square().mean().backward()

    def target_fwd_bwd_input():
        x_in = x_est0.detach().requires_grad_(True)
        with amp():
            y = setup.target.jump(x_in, s, end)
        y.square().mean().backward()

    def target_branch_no_grad():
        with torch.no_grad(), amp():
            setup.target.jump(setup.student.jump(x_t, u, s), s, end)

    def lpips_fwd_bwd():
        a = x_est0.detach().requires_grad_(True)
        with amp():
            d = setup.g_objective.distance(a, x_other)
        d.mean().backward()

    def dsm_fwd_bwd():
        with amp():
            loss = dsm_loss(lambda x, tt: setup.student.denoiser(x, tt), mb.x0, mb.dsm_t, mb.dsm_noise,
                            cfg.loss.dsm.weighting, setup.student.process.sigma_data).mean()
        loss.backward()

    def gan_generator_fwd_bwd():
        a = x_est0.detach().requires_grad_(True)
        with amp():
            loss = generator_adversarial_loss(setup.discriminator, a)
        loss.backward()

    def discriminator_step():
        setup.d_optimizer.zero_grad(set_to_none=True)
        with amp():
            d_loss = setup.d_objective(mb.x0, x_est0)
        (d_loss / batch).backward()
        setup.d_optimizer.step()

    def optimizer_and_ema():
        for p in setup.student.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        setup.optimizer.step()
        setup.ema.update(setup.student)

    # the adaptive weights: the CTM and GAN terms' gradients at the student's jump y (back through
    # LPIPS, the discriminator and the target, once each), then last-layer norms from y and of L_DSM;
    # the step's final backward then starts at y (ctm_core.objective)
    with amp():  # the forward graph the adaptive weights differentiate (built once, kept)
        y0 = setup.student.jump(x_t, t, s)
        x_e = setup.target.jump(y0, s, end)
        l_ctm = setup.g_objective.distance(x_e, x_other).mean()
        l_dsm = dsm_loss(lambda x, tt: setup.student.denoiser(x, tt), mb.x0, mb.dsm_t, mb.dsm_noise,
                         cfg.loss.dsm.weighting, setup.student.process.sigma_data).mean()
        l_gan = generator_adversarial_loss(setup.discriminator, x_e)

    def adaptive_weights():
        last = setup.student.backbone.last_layer_weight()
        g_ctm, = torch.autograd.grad(l_ctm, y0, retain_graph=True)
        g_gan, = torch.autograd.grad(l_gan, y0, retain_graph=True)
        ctm_norm = last_layer_grad_norm(y0, last, g_ctm)
        adaptive_weight(ctm_norm, last_layer_grad_norm(y0, last, g_gan))
        adaptive_weight(ctm_norm, last_layer_grad_norm(l_dsm, last))

    return {"host_draw": host_draw, "teacher_solver": teacher_solver, "student_fwd_bwd": student_fwd_bwd,
            "target_fwd_bwd_input": target_fwd_bwd_input, "target_branch_no_grad": target_branch_no_grad,
            "lpips_fwd_bwd": lpips_fwd_bwd, "dsm_fwd_bwd": dsm_fwd_bwd, "gan_generator_fwd_bwd": gan_generator_fwd_bwd,
            "adaptive_weights": adaptive_weights, "discriminator_step": discriminator_step,
            "optimizer_and_ema": optimizer_and_ema}


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="per-GPU batch (paper: 256 over 4 GPUs = 64)")
    p.add_argument("--world", type=int, default=4, help="GPUs the global batch is spread over (host draw size)")
    p.add_argument("--ks", default="12,17", help="fixed teacher solver step counts k to time")
    p.add_argument("--variants", default=",".join(LADDER), help=f"cumulative levers, from {LADDER}")
    p.add_argument("--time-variants", default="all",
                   help="variants whose steps are timed; the others are only applied and checked")
    p.add_argument("--components", default="fp32,bf16,+graphs,+compile",
                   help="variants whose components are timed one by one ('all', 'none')")
    p.add_argument("--extras", default="+graphs,+compile",
                   help="variants also timed in the CTM+DSM phase (no GAN) and with gan.micro_batch=8")
    p.add_argument("--check-variants", default="all", help="variants checked against fp32 (fp32 is the reference)")
    p.add_argument("--check-compiled", action="store_true",
                   help="also check +compile against fp32 (dropout off: a second compilation)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=6.0, help="seconds of timed steps per configuration at most")
    p.add_argument("--deadline-s", type=float, default=1e9, help="skip optional work after this many seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--flops-from", help="reuse the FLOP counts of an earlier run's JSON (same batch)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (no MFU)")
    p.add_argument("--cache-dir", help="use the pretrained LPIPS VGG16 and discriminator feature networks from this "
                   "weight cache (ctm_core.pretrained) instead of random weights")
    p.add_argument("--tiny", action="store_true", help="tiny networks, for a CPU smoke test")
    p.add_argument("--out", default="train_step.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t_start  # noqa: E731
    device = torch.device(args.device)
    ks = [int(k) for k in args.ks.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    comp_for = set(LADDER + POLICIES if args.components == "all" else [] if args.components == "none"
                   else args.components.split(","))
    extras_for = set(args.extras.split(",")) if args.extras else set()
    out_path = Path(args.out)

    def log(msg: str) -> None:
        print(f"[{elapsed():7.1f}s] {msg}", flush=True)

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "torch": torch.__version__,
        "python": platform.python_version(), "batch": args.batch, "ks": ks, "tiny": args.tiny,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "variants": {},
    }

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))

    results["bf16_ceiling"] = bf16_ceiling(device)
    ceiling = results["bf16_ceiling"]["tflops"] * 1e12
    log(f"bf16 matmul ceiling: {results['bf16_ceiling']['tflops']:.1f} TFLOP/s")

    workdir = Path(tempfile.mkdtemp(prefix="ctm_bench_"))
    config = make_config(args.batch, args.world, args.tiny)
    setup = Setup(config, device, args.tiny, workdir, args.cache_dir)
    results["pretrained_cache"] = args.cache_dir
    batches = Batches(setup, args.batch)
    results["params_student_M"] = sum(p.numel() for p in setup.student.parameters()) / 1e6
    log(f"built: student {results['params_student_M']:.1f}M params, batch {args.batch}")

    # FLOPs of one step (eager, the math is the same in every variant)
    setup.flags["bf16"] = True  # counted under autocast: faster, same operations
    configs = [("gan", k, args.batch) for k in ks]
    extra_configs = [("nogan", ks[0], args.batch), ("gan", ks[0], 8)] if args.batch > 8 else [("nogan", ks[0], args.batch)]
    flops: dict[str, int] = {}
    comp_flops: dict[str, int] = {}
    if args.flops_from:
        earlier = json.loads(Path(args.flops_from).read_text())
        if earlier.get("batch") != args.batch or earlier.get("tiny") != args.tiny:
            raise ValueError(f"--flops-from {args.flops_from} was measured at another batch or size")
        flops, comp_flops = earlier["flops_per_step"], earlier["flops_components"]
        results["flops_from"] = args.flops_from
    elif not args.no_flops:
        for phase, k, micro in configs + extra_configs:
            key = f"{phase}_k{k}_mb{micro}"
            flops[key] = count_flops(lambda: train_step(setup, batches, 0, k, micro, phase == "gan"))
        comp_flops = {name: count_flops(fn) for name, fn in component_fns(setup, args.batch, ks[0]).items()}
    setup.restore()
    setup.flags["bf16"] = False
    results["flops_per_step"] = flops
    results["flops_components"] = comp_flops
    log("TFLOP per step: " + ", ".join(f"{k}={v / 1e12:.2f}" for k, v in flops.items()))

    reference = None
    check_mb = check_batch(setup, args.batch, ks[0])
    for variant in variants:
        flags = apply_variant(setup, variant, log)
        entry: dict[str, Any] = {"flags": flags, "timings": {}, "components": {}}
        results["variants"][variant] = entry
        log(f"== {variant}: {flags}")
        def run_check() -> None:
            nonlocal reference
            got = check_step(setup, check_mb)
            if reference is None:
                reference = got
            entry["check"] = {key: rel_err(got[key], reference[key]) for key in reference if key in got}
            entry["check_values"] = {key: float(got[key][0]) for key in got if got[key].numel() == 1}
            shown = ("loss", "x_est", "grad_student", "grad_disc", "log_weight_gan", "g_all_ctm", "g_all_dsm",
                     "g_all_gan", "g_last_gan", "g_img_gan")
            log("rel. error vs fp32: " + ", ".join(f"{k}={entry['check'][k]:.1e}" for k in shown
                                                    if k in entry["check"]))

        # correctness first, except for compiled code: with dropout off it compiles a second time,
        # so it is checked after its timings, on request
        checked = args.check_variants == "all" or variant in args.check_variants.split(",")
        if variant != "+compile" and checked and (elapsed() < args.deadline_s or reference is None):
            run_check()
        if variant == "+fused" and device.type == "cuda":
            entry["fused_vs_foreach_update_rel_err"] = fused_vs_foreach(setup)
            log(f"fused vs foreach AdamW update: rel. error {entry['fused_vs_foreach_update_rel_err']:.2e}")
        # whole steps
        timed = args.time_variants == "all" or variant in args.time_variants.split(",")
        todo = (configs + (extra_configs if variant in extras_for else [])) if timed else []
        for phase, k, micro in todo:
            key = f"{phase}_k{k}_mb{micro}"
            if micro != args.batch and setup.flags["compile"] == "all":
                continue  # a second batch shape would recompile every graph with dynamic shapes
            if (phase, k, micro) not in configs and elapsed() > args.deadline_s:
                log(f"{key}: skipped (deadline)")
                continue
            setup.restore()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            step_counter = iter(range(1, 10 ** 9))
            t0 = time.perf_counter()
            train_step(setup, batches, 0, k, micro, phase == "gan")  # first call: compilation, capture
            sync(device)
            first_s = time.perf_counter() - t0
            times = time_ms(lambda: train_step(setup, batches, next(step_counter), k, micro, phase == "gan"),
                            device, warmup=args.warmup - 1, iters=args.iters, budget_s=args.budget_s)
            stats = summary(times)
            ms = stats["median_ms"]
            stats.update({
                "first_step_s": first_s, "images_per_s": args.batch / (ms / 1e3),
                "tflops_per_s": flops[key] / (ms / 1e3) / 1e12 if key in flops else None,
                "mfu": flops[key] / (ms / 1e3) / ceiling if key in flops and ceiling == ceiling else None,
                "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            })
            entry["timings"][key] = stats
            mfu = f"{100 * stats['mfu']:.1f}%" if stats["mfu"] is not None else "n/a"
            log(f"{key}: {ms:.1f} ms/step, {stats['images_per_s']:.1f} img/s, MFU {mfu}, "
                f"first step {first_s:.1f}s, peak {stats['peak_mem_gib'] or 0:.1f} GiB")
            save()
        if variant in comp_for and (elapsed() < args.deadline_s):
            setup.restore()
            for name, fn in component_fns(setup, args.batch, ks[0]).items():
                c = summary(time_ms(fn, device, warmup=min(2, args.warmup), iters=max(1, args.iters // 2), budget_s=args.budget_s / 3))
                if name in comp_flops and comp_flops[name] and ceiling == ceiling:
                    c["mfu"] = comp_flops[name] / (c["median_ms"] / 1e3) / ceiling
                entry["components"][name] = c
            setup.restore()
            log("components (ms): " + ", ".join(f"{n}={c['median_ms']:.1f}" for n, c in entry["components"].items()))
        if variant == "+compile":
            if args.check_compiled and elapsed() < args.deadline_s:
                t0 = time.perf_counter()
                run_check()
                entry["check_seconds"] = time.perf_counter() - t0
            else:
                entry["check_note"] = "not checked in this run (--check-compiled, --deadline-s)"
        save()
    results["elapsed_s"] = elapsed()
    save()
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    ks = results["ks"]
    print(f"\ndevice: {results['device']}  torch {results['torch']}  batch {results['batch']}  "
          f"bf16 ceiling {results['bf16_ceiling']['tflops']:.0f} TFLOP/s")
    keys = sorted({key for v in results["variants"].values() for key in v["timings"]},
                  key=lambda s: (s.split("_")[0] != "gan", s))
    head = f"{'variant':18s} {'check(grad)':>11s} " + " ".join(f"{k:>30s}" for k in keys)
    print(head)
    for name, v in results["variants"].items():
        chk = v.get("check", {}).get("grad_student")
        cells = []
        for key in keys:
            t = v["timings"].get(key)
            if t is None:
                cells.append(f"{'-':>30s}")
                continue
            mfu = f"{100 * t['mfu']:4.1f}%" if t.get("mfu") is not None else "  n/a"
            mem = f"{t['peak_mem_gib']:4.1f}G" if t.get("peak_mem_gib") is not None else ""
            cells.append(f"{t['median_ms']:8.1f}ms {t['images_per_s']:6.1f}/s {mfu} {mem:>5s}")
        print(f"{name:18s} {('%.1e' % chk) if chk is not None else '-':>11s} " + " ".join(cells))
    comps = {n: v["components"] for n, v in results["variants"].items() if v["components"]}
    if comps:
        names = list(next(iter(comps.values())))
        print(f"\ncomponents at k={ks[0]} (median ms; TFLOP per call)")
        print(f"{'component':24s} {'TFLOP':>7s} " + " ".join(f"{n:>10s}" for n in comps))
        for c in names:
            tf = results["flops_components"].get(c, 0) / 1e12
            print(f"{c:24s} {tf:7.2f} " + " ".join(f"{comps[n][c]['median_ms']:10.1f}" if c in comps[n] else
                                                    f"{'-':>10s}" for n in comps))


if __name__ == "__main__":
    sys.exit(main())
