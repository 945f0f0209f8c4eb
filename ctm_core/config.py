"""The trainer's configuration: one tree of typed dataclasses, validated where it enters.

YAML (or a dict) goes in through `load_config`; an unknown key, a wrong type or an out-of-range
value is refused with a ConfigError naming the dotted key path and what is allowed. Everything a
run depends on is here, so the resolved config (and its hash) identifies a run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from .process import VEProcess
from .schedules import WeightSchedule

_STRICT = ConfigDict(extra="forbid", validate_assignment=True)


def _schedule_from_yaml(value: Any, **clamp: float) -> Any:
    """Schedules are written either as the short form '0.1@50000+1000cos' or as a mapping.

    `clamp` gives the adaptive weight's default bounds for this term (a mapping may still set its own).
    """
    if isinstance(value, WeightSchedule):
        return value
    if value is False:  # YAML 1.1 reads a bare `off` as False
        return WeightSchedule(value=0.0, **clamp)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return WeightSchedule(value=float(value), **clamp)
    if isinstance(value, str):
        return WeightSchedule.parse(value, **clamp)
    if isinstance(value, dict):
        return {**clamp, **value}
    return value


# The official code clamps its adaptive weights to [0, 1e4] for DSM and to [0.01, 10] for the GAN
# (VQGAN's bounds): a near-zero generator gradient early in the GAN phase must not scale L_G by 1e4.
_GAN_CLAMP = {"adaptive_min": 0.01, "adaptive_max": 10.0}
Schedule = Annotated[WeightSchedule, BeforeValidator(_schedule_from_yaml)]
GANSchedule = Annotated[WeightSchedule, BeforeValidator(lambda value: _schedule_from_yaml(value, **_GAN_CLAMP))]
PositiveFloat = Annotated[float, Field(gt=0)]
# auto / on / off; YAML 1.1 reads bare on/off as booleans, which mean the same here
Switch = Annotated[Literal["auto", "on", "off"],
                   BeforeValidator(lambda v: ("on" if v else "off") if isinstance(v, bool) else v)]


def _check_data_spec(spec: str) -> str:
    from .data import parse_data_spec

    parse_data_spec(spec)  # raises DataSpecError (a ValueError) naming the problem
    return spec


@dataclass(config=_STRICT)
class DataConfig:
    # toy:<name> | digits[:16] | npy:<path> | cifar10:<root> | folder:<path>  (options: ?k=v&k=v)
    spec: Annotated[str, AfterValidator(_check_data_spec)] = "toy:gmm2d_8"
    batch_size: Annotated[int, Field(ge=1)] = 256          # global batch, whatever the number of GPUs
    micro_batch: Optional[Annotated[int, Field(ge=1)]] = None  # per-GPU batch; None = batch_size / world
    class_conditional: bool = False
    hflip: bool = False                  # random horizontal flips (images)


@dataclass(config=_STRICT)
class ModelConfig:
    arch: Literal["auto", "mlp", "unet"] = "auto"   # auto: mlp for vectors, unet for images
    hidden: Annotated[int, Field(ge=1)] = 256        # mlp
    depth: Annotated[int, Field(ge=1)] = 4           # mlp
    emb_dim: Annotated[int, Field(ge=8)] = 128       # mlp
    model_channels: Annotated[int, Field(ge=8)] = 128  # unet
    channel_mult: tuple[int, ...] = (2, 2, 2)        # unet
    num_blocks: Annotated[int, Field(ge=1)] = 4      # unet
    attn_resolutions: tuple[int, ...] = (16,)        # unet
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0


@dataclass(config=_STRICT)
class TeacherConfig:
    checkpoint: Optional[str] = None     # an `edm`-mode checkpoint; required by ctm and cd modes
    solver: Literal["heun", "euler"] = "heun"


@dataclass(config=_STRICT)
class CTMConfig:
    num_points: Annotated[int, Field(ge=2)] = 18     # N, the discretisation
    max_steps: Annotated[int, Field(ge=1)] = 17      # K, the teacher solver's maximum step count
    step_weight_power: Annotated[float, Field(ge=0)] = 1.0  # P(k) ~ k^power
    s_strategy: Literal["uniform", "min"] = "uniform"
    target_inner: Literal["student", "target"] = "student"  # official code: student (stop-grad)
    distance: Literal["l2", "l1", "pseudo_huber", "lpips"] = "l2"


@dataclass(config=_STRICT)
class DSMConfig:
    p_mean: float = -1.2
    p_std: PositiveFloat = 1.2
    # share of rho-schedule times; None: 0.5 for the student (the official CTM mixture), 0 for an `edm`
    # teacher (EDM trains on the log-normal alone)
    uniform_fraction: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    xi_max: Annotated[float, Field(gt=0, le=1)] = 0.7
    weighting: Literal["edm", "uniform"] = "edm"


@dataclass(config=_STRICT)
class LossConfig:
    lambda_ctm: Annotated[float, Field(ge=0)] = 1.0
    lambda_dsm: Optional[Schedule] = None   # None: 1 (the CTM objective), off in mode cd (CD has no DSM term)
    lambda_gan: GANSchedule = dataclasses.field(default_factory=lambda: WeightSchedule(**_GAN_CLAMP))
    dsm: DSMConfig = dataclasses.field(default_factory=DSMConfig)


@dataclass(config=_STRICT)
class GANConfig:
    # auto: 'vector' for vectors, 'patch' (from scratch) for images of <= 16 px, else 'projected' (the paper's)
    discriminator: Literal["auto", "vector", "patch", "projected"] = "auto"
    optimizer: Literal["radam", "adam"] = "radam"   # the official code's discriminator optimiser: RAdam
    lr: PositiveFloat = 2e-3
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.5, 0.9)
    augment: bool = True
    micro_batch: Optional[Annotated[int, Field(ge=1)]] = None   # per-GPU batch once the GAN is on (CIFAR: 11)


@dataclass(config=_STRICT)
class OptimConfig:
    name: Literal["adamw", "adam", "radam"] = "adamw"
    lr: PositiveFloat = 4e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    decay: Literal["none", "linear", "cosine"] = "none"   # after warm-up, to 0 at train.steps
    grad_clip: Optional[PositiveFloat] = None


def _check_rates(rates: tuple[float, ...]) -> tuple[float, ...]:
    if not rates:
        raise ValueError("at least one EMA rate mu is needed")
    for mu in rates:
        if not 0 <= mu < 1:
            raise ValueError(f"every EMA rate mu must lie in [0, 1), got {mu}")
    return rates


@dataclass(config=_STRICT)
class EMAConfig:
    rates: Annotated[tuple[float, ...], AfterValidator(_check_rates)] = (0.999, 0.9999)
    target_rate: Annotated[float, Field(ge=0, lt=1)] = 0.999   # mu of the stop-grad target network
    eval_rate: Annotated[float, Field(ge=0, lt=1)] = 0.999     # the average that is evaluated and sampled


@dataclass(config=_STRICT)
class EvalConfig:
    every: Annotated[int, Field(ge=0)] = 0           # 0: only at the end
    nfe: tuple[Annotated[int, Field(ge=1)], ...] = (1, 2, 4)
    gammas: tuple[Annotated[float, Field(ge=0, le=1)], ...] = (0.0,)
    teacher_steps: Optional[Annotated[int, Field(ge=2)]] = 18   # teacher Heun reference; None: skip
    num_samples: Annotated[int, Field(ge=2)] = 2000
    inception: Optional[str] = None                  # FID weights for images (else from the cache)


@dataclass(config=_STRICT)
class TrainLoopConfig:
    steps: Annotated[int, Field(ge=1)] = 1000
    log_every: Annotated[int, Field(ge=1)] = 50
    ckpt_every: Annotated[int, Field(ge=1)] = 500
    keep_last: Annotated[int, Field(ge=1)] = 2
    bf16: Switch = "auto"       # auto: on for CUDA
    compile: bool = False       # torch.compile of the student's and EMA target's backbones but their output layers
    channels_last: Switch = "auto"
    compile_teacher: Switch = "auto"   # torch.compile of the frozen teacher's backbone; auto: on for CUDA
    teacher_graphs: Switch = "auto"    # the teacher's denoiser as a CUDA graph (ctm_core.teacher_graph); auto: CUDA
    target_graphs: Switch = "auto"     # the target branch's no-grad jumps as CUDA graphs (GraphedJumps); auto: CUDA
    triton_norms: Switch = "auto"      # the U-Nets' GroupNorm(+SiLU) as Triton kernels on channels_last; auto: CUDA
    # torch.compile of the frozen feature networks: LPIPS's VGG16 and the projected discriminator's backbones
    compile_features: Switch = "auto"
    # those networks recompute their activations in the backward instead of keeping them (ctm_core.recompute);
    # auto: on for CUDA, where they decide whether the paper's batch fits on one GPU
    recompute_features: Switch = "auto"
    compile_heads: Switch = "auto"     # torch.compile of the projected discriminator's trainable heads; auto: CUDA


@dataclass(config=_STRICT)
class RuntimeConfig:
    out_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: bool = True                 # continue from the newest valid checkpoint in out_dir
    progress: Switch = "auto"
    cache_dir: Optional[str] = None     # pretrained weights (else CTM_LAB_CACHE or ~/.cache/ctm-lab)


@dataclass(config=_STRICT)
class TrainConfig:
    mode: Literal["edm", "ctm", "ctm_scratch", "cd"] = "edm"
    seed: Annotated[int, Field(ge=0)] = 0
    process: VEProcess = dataclasses.field(default_factory=VEProcess)  # validated by VEProcess itself
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    ctm: CTMConfig = dataclasses.field(default_factory=CTMConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    gan: GANConfig = dataclasses.field(default_factory=GANConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.loss.lambda_dsm is None:
            self.loss.lambda_dsm = WeightSchedule(value=0.0 if self.mode == "cd" else 1.0)
        if self.loss.dsm.uniform_fraction is None:
            self.loss.dsm.uniform_fraction = 0.0 if self.mode == "edm" else 0.5
        if self.mode in ("ctm", "cd") and not self.teacher.checkpoint:
            raise ValueError(f"teacher.checkpoint is required in mode {self.mode!r} (train one with mode 'edm')")
        if self.mode == "edm" and not self.loss.lambda_gan.is_off:
            raise ValueError("loss.lambda_gan must be 'off' in mode 'edm' (a teacher is trained by DSM alone)")


class ConfigError(ValueError):
    """A refused configuration; the message names every offending key path."""


_ADAPTER = TypeAdapter(TrainConfig)


def _allowed_keys(path: tuple[str, ...]) -> list[str]:
    """Field names of the section at `path`, for 'unknown key' messages."""
    cls: Any = TrainConfig
    for part in path:
        cls = typing.get_type_hints(cls).get(part)
        if not dataclasses.is_dataclass(cls):
            return []
    return [f.name for f in dataclasses.fields(cls)]


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "<root>"
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = f"unknown key; allowed keys here: {', '.join(_allowed_keys(loc[:-1]))}"
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Validate a plain mapping (YAML contents) into a TrainConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config: the top level must be a mapping, got {type(data).__name__}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-ready mapping (tuples as lists); round-trips through config_from_dict."""
    return json.loads(json.dumps(_ADAPTER.dump_python(config, mode="json")))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings (value parsed as YAML) to a nested mapping, in order."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- overrides, validated once at the end."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    return config_from_dict(apply_overrides(data, overrides or []))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: dotted names for logging and sweep axes."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_hash(config: TrainConfig, ignore: tuple[str, ...] = ("runtime",)) -> str:
    """A short stable hash of what determines the results (the runtime section does not)."""
    data = {k: v for k, v in config_to_dict(config).items() if k not in ignore}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
