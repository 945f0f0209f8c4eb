"""Sweep files: one small YAML per study, validated completely before anything starts.

A sweep file (``sweeps/<name>.yaml``) reads top to bottom like a methods paragraph::

    description: EMA decay of the stop-grad target network (mu)
    base: configs/toy_ctm.yaml            # a trainer config under configs/, or an inline mapping
    set: {eval.nfe: [1, 2, 4]}            # optional overrides on top of base (dotted keys)
    teacher: {base: configs/toy_teacher.yaml}   # optional: an edm-mode teacher, trained once
    axes:
      ema.target_rate: [0.9, 0.99, 0.999]       # a list = grid values
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}  # or choice / uniform / loguniform (needs search:)
    seeds: [0, 1]
    metric: eval/sw2/nfe1
    mode: min
    budgets:
      smoke: {set: {train.steps: 150}, resources: {cpus: 1, gpus: 0}}
      paper: {base: configs/cifar10_ctm.yaml, metric: eval/fid/nfe1, resources: {cpus: 16, gpus: 4}}
    scheduler: {type: asha, grace_period: 50}   # optional early stopping
    search: {algo: optuna, num_samples: 8}      # optional; needed by distribution axes

A budget may also replace `base`, the teacher (`teacher: {set: ...}` or `{checkpoint: PATH}`),
the values of existing axes, `seeds`, `metric`, `scheduler`, `search`, `max_concurrent`,
`max_failures` and `sec_per_step` (the cost model behind the GPU-hour estimate). Strings may use
``${VAR}`` / ``${VAR:-default}`` (e.g. the CIFAR-10 root). Trainer configs are merged as
defaults <- base <- set <- budget.set <- --set <- axis values <- seed, and *every* trial's config is
validated by ctm_core.config before a trial runs: every refusal is a SweepError naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from ctm_core.config import ConfigError, TrainConfig, config_from_dict, config_hash, config_to_dict, flatten

SWEEPS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SWEEPS_DIR.parent
CONFIGS_DIR = REPO_ROOT / "configs"
BUDGETS = ("smoke", "paper")

TOP_KEYS = ("name", "description", "base", "set", "teacher", "axes", "seeds", "metric", "mode", "budgets",
            "scheduler", "search", "resources", "max_concurrent", "max_failures", "sec_per_step", "tracking")
BUDGET_KEYS = ("description", "base", "set", "teacher", "axes", "seeds", "metric", "resources", "max_concurrent",
               "max_failures", "scheduler", "search", "sec_per_step")
TEACHER_KEYS = ("base", "set", "checkpoint", "resources", "sec_per_step")
AXIS_KINDS = ("grid", "choice", "uniform", "loguniform")
SEARCH_ALGOS = ("optuna", "random")
SCHEDULER_TYPES = ("asha",)
METRIC_FAMILIES = {"toy": ("sw2", "energy"), "digits": ("fd_digits",), "cifar10": ("fid",), "folder": ("fid",)}
_METRIC = re.compile(r"^(?:best/)?eval/(?P<family>[a-z0-9_]+)/(?:(?P<teacher>teacher_)?nfe(?P<nfe>\d+))"
                     r"(?:/gamma(?P<gamma>[0-9.eE+-]+))?$|^train/[a-z0-9_]+$")
_ENV = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")
# Defaults of the trial configs that a sweep file may still override (workers print no progress bars).
_TRIAL_DEFAULTS = {"runtime.progress": "off"}


class SweepError(ValueError):
    """A refused sweep file or launch request; the message names the sweep and the key."""


class UnknownSweepError(SweepError):
    """No sweep of that name; the message lists the known ones."""


# ----------------------------------------------------------------------------------------------
# Small value types


@dataclass(frozen=True)
class Resources:
    """What one trial asks of the scheduler. Fractions below one GPU share a device."""

    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def processes(self) -> int:
        """Training processes per trial: one per whole GPU (DDP), else one."""
        return max(1, int(self.gpus))

    def as_dict(self) -> dict[str, float]:
        return {"cpus": self.cpus, "gpus": self.gpus}


@dataclass(frozen=True)
class Axis:
    """One swept config key: grid values, a choice, or a (log-)uniform range for search."""

    path: str
    kind: str = "grid"
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def is_distribution(self) -> bool:
        return self.kind != "grid"

    def describe(self) -> str:
        if self.kind in ("grid", "choice"):
            shown = ", ".join(format_value(v) for v in self.values)
            return f"[{shown}]" if self.kind == "grid" else f"choice[{shown}]"
        return f"{self.kind}({format_value(self.low)}, {format_value(self.high)})"

    def endpoints(self) -> tuple[Any, ...]:
        """Values that must all give valid configs (every grid/choice value, or the range ends)."""
        return self.values if self.kind in ("grid", "choice") else (self.low, self.high)

    def sample(self, u: float, pick: int) -> Any:
        """A value from uniform randoms u in [0, 1) and pick (an integer), for pre-drawn random search."""
        if self.kind in ("grid", "choice"):
            return self.values[pick % len(self.values)]
        if self.kind == "uniform":
            return self.low + (self.high - self.low) * u
        return math.exp(math.log(self.low) + (math.log(self.high) - math.log(self.low)) * u)


@dataclass(frozen=True)
class SchedulerSpec:
    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None          # None: the trials' train.steps


@dataclass(frozen=True)
class SearchSpec:
    algo: str = "optuna"
    num_samples: int = 8
    seed: int = 0


@dataclass(frozen=True)
class TeacherSpec:
    base: Any = None                  # a config path or an inline mapping (None: the trainer defaults)
    set: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None     # an existing edm-mode run dir or checkpoint instead of training one
    resources: Resources | None = None
    sec_per_step: float | None = None


@dataclass(frozen=True)
class Trial:
    """One unit of work: a fully resolved, validated trainer config plus its place in the sweep."""

    sweep: str
    index: int
    config: TrainConfig
    axes: dict[str, Any]
    seed: int
    config_hash: str
    variant: str
    resources: Resources
    estimated_gpu_hours: float
    budget: str = "smoke"
    teacher_hash: str | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.config.runtime.out_dir)

    @property
    def name(self) -> str:
        """A short run name: the variant and the seed."""
        return f"{self.variant} s{self.seed}" if self.variant else f"s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (e.g. to hand a trial to a SLURM job); Trial.from_dict reverses it."""
        return {"sweep": self.sweep, "index": self.index, "config": config_to_dict(self.config), "axes": self.axes,
                "seed": self.seed, "config_hash": self.config_hash, "variant": self.variant,
                "resources": self.resources.as_dict(), "estimated_gpu_hours": self.estimated_gpu_hours,
                "budget": self.budget, "teacher_hash": self.teacher_hash}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Trial":
        data = dict(data)
        data["config"] = config_from_dict(data["config"])
        data["resources"] = Resources(**data["resources"])
        return cls(**data)


# ----------------------------------------------------------------------------------------------
# Helpers


def format_value(value: Any) -> str:
    """Human form of an axis value: floats with :g, False (YAML's bare `off`) as off."""
    if value is False:
        return "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def variant_label(axes: dict[str, Any]) -> str:
    """'loss.lambda_gan=0.1@200+100, ema.target_rate=0.99' (the seed is not part of it)."""
    return ", ".join(f"{path}={format_value(value)}" for path, value in axes.items())


def _slug(text: str, limit: int = 48) -> str:
    text = re.sub(r"[^A-Za-z0-9=.@+_-]+", "_", text).strip("_")
    return text[:limit] or "base"


def _default_leaves() -> dict[str, Any]:
    return flatten(config_to_dict(TrainConfig()))


_LEAVES = _default_leaves()
_SCHEDULE_PATHS = {p.rsplit(".", 1)[0] for p in _LEAVES if p.endswith(".adaptive_max")}


def _check_path(path: str, where: str) -> None:
    """An axis or override path must be a config key (a leaf, or a whole loss-weight schedule)."""
    if path in _LEAVES or path in _SCHEDULE_PATHS:
        return
    if path == "seed":
        return
    sections = {p.split(".")[0] for p in _LEAVES}
    if path in sections or any(p.startswith(path + ".") for p in _LEAVES):
        raise SweepError(f"{where}: {path!r} is a config section, not a key; name one of its keys, "
                         f"e.g. {next(p for p in _LEAVES if p.startswith(path + '.'))!r}")
    close = difflib.get_close_matches(path, list(_LEAVES) + sorted(_SCHEDULE_PATHS), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
        "; `python -m ctm_core.train --print-config` lists every key"
    raise SweepError(f"{where}: {path!r} is not a config key{hint}")


def _dotted(mapping: Any, where: str) -> dict[str, Any]:
    """Flatten nested/dotted override mappings to {dotted.path: value} (a schedule mapping stays whole)."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise SweepError(f"{where}: must be a mapping of config keys to values, got {type(mapping).__name__}")
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if not isinstance(key, str):
                raise SweepError(f"{where}: keys must be strings, got {key!r}")
            path = f"{prefix}{key}"
            if isinstance(value, dict) and path not in _SCHEDULE_PATHS and path not in _LEAVES:
                walk(value, path + ".")
            else:
                out[path] = value

    walk(mapping, "")
    return out


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _expand_env(value: Any, where: str) -> Any:
    """Replace ${VAR} and ${VAR:-default} in strings (recursively)."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m["name"] in os.environ:
                return os.environ[m["name"]]
            if m["default"] is not None:
                return m["default"]
            raise SweepError(f"{where}: environment variable {m['name']} is not set (write ${{{m['name']}:-default}} "
                             "to give a default)")
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where) for v in value]
    return value


def _normalise_schedule(path: str, value: Any) -> Any:
    """YAML reads a bare `off` as False; a loss-weight schedule keeps the word."""
    if path in _SCHEDULE_PATHS and value is False:
        return "off"
    return value


def _resolve_file(text: str, where: str, sweep_file: Path | None) -> Path:
    candidates = [Path(text)] if Path(text).is_absolute() else \
        [REPO_ROOT / text, *([sweep_file.parent / text] if sweep_file else []), Path.cwd() / text]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    shipped = sorted(p.relative_to(REPO_ROOT).as_posix() for p in CONFIGS_DIR.glob("*.yaml"))
    raise SweepError(f"{where}: config file {text!r} not found (looked in {', '.join(str(c.parent) for c in candidates)}); "
                     f"shipped configs: {', '.join(shipped) or 'none'}")


def _load_base(base: Any, where: str, sweep_file: Path | None) -> dict[str, Any]:
    """A base is a YAML file (nested trainer config) or an inline mapping of overrides."""
    if base is None:
        return {}
    if isinstance(base, str):
        path = _resolve_file(base, where, sweep_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SweepError(f"{where}: {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise SweepError(f"{where}: {path} must hold a mapping")
        return _dotted(data, f"{where} ({path.name})")
    if isinstance(base, dict):
        return _dotted(base, where)
    raise SweepError(f"{where}: must be a config path under configs/ or a mapping, got {type(base).__name__}")


def _validated_config(items: Iterable[tuple[str, Any]], where: str) -> TrainConfig:
    data: dict[str, Any] = {}
    for path, value in items:
        _set_path(data, path, value)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        text = str(err).replace("invalid config:\n", "")
        raise SweepError(f"{where}: invalid trainer config:\n{text}") from None


# ----------------------------------------------------------------------------------------------
# Parsing the file


def _expect(value: Any, types: tuple[type, ...], where: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in types:
        raise SweepError(f"{where}: must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise SweepError(f"{where}: must be {what}, got {value!r}")
    return value


def _check_keys(mapping: Any, allowed: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise SweepError(f"{where}: must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(f"{where}.{key}: unknown key{hint}; allowed keys: {', '.join(allowed)}")
    return mapping


def _parse_axis(path: str, raw: Any, where: str) -> Axis:
    _check_path(path, where)
    if path == "seed":
        raise SweepError(f"{where}: seeds are not an axis; list them under `seeds:`")
    if isinstance(raw, list):
        kind, body = "grid", raw
    elif isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in AXIS_KINDS:
        kind, body = next(iter(raw.items()))
    elif isinstance(raw, dict):
        raise SweepError(f"{where}: an axis is a list of values or one of {{{', '.join(k + ': ...' for k in AXIS_KINDS)}}}, "
                         f"got keys {sorted(raw)}")
    else:
        raise SweepError(f"{where}: an axis is a list of values (grid) or a mapping like {{loguniform: [1e-4, 1e-2]}}, "
                         f"got {raw!r}")
    if kind in ("grid", "choice"):
        if not isinstance(body, list):
            raise SweepError(f"{where}.{kind}: must be a list of values, got {body!r}")
        if not body:
            raise SweepError(f"{where}: empty axis (no values); give at least one value or remove the axis")
        values = tuple(_normalise_schedule(path, v) for v in body)
        seen = set()
        for v in values:
            key = json.dumps(v, sort_keys=True, default=str)
            if key in seen:
                raise SweepError(f"{where}: value {format_value(v)!r} appears twice")
            seen.add(key)
        return Axis(path, kind, values)
    if not (isinstance(body, list) and len(body) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                for v in body)):
        raise SweepError(f"{where}.{kind}: must be [low, high] numbers, got {body!r}")
    low, high = float(body[0]), float(body[1])
    if not low < high:
        raise SweepError(f"{where}.{kind}: low must be < high, got [{low:g}, {high:g}] (an empty range)")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{where}.loguniform: bounds must be > 0, got [{low:g}, {high:g}]")
    return Axis(path, kind, (), low, high)


def _parse_axes(raw: Any, where: str) -> dict[str, Axis]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: must map config keys to values, e.g. {{ema.target_rate: [0.99, 0.999]}}")
    return {str(path): _parse_axis(str(path), spec, f"{where}.{path}") for path, spec in raw.items()}


def _parse_seeds(raw: Any, where: str) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw < 1:
            raise SweepError(f"{where}: a seed count must be >= 1, got {raw}")
        return tuple(range(raw))
    if isinstance(raw, list):
        if not raw:
            raise SweepError(f"{where}: empty seed list; give at least one seed")
        for s in raw:
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise SweepError(f"{where}: seeds must be integers >= 0, got {s!r}")
        if len(set(raw)) != len(raw):
            raise SweepError(f"{where}: duplicate seeds in {raw}")
        return tuple(raw)
    raise SweepError(f"{where}: must be a list of integer seeds or a count, got {raw!r}")


def _parse_resources(raw: Any, where: str) -> Resources:
    _check_keys(raw, ("cpus", "gpus"), where)
    cpus = raw.get("cpus", 1)
    gpus = raw.get("gpus", 0)
    for key, value in (("cpus", cpus), ("gpus", gpus)):
        _expect(value, (int, float), f"{where}.{key}", "a number")
    if cpus <= 0:
        raise SweepError(f"{where}.cpus: must be > 0, got {cpus}")
    if gpus < 0:
        raise SweepError(f"{where}.gpus: must be >= 0, got {gpus}")
    if gpus > 1 and gpus != int(gpus):
        raise SweepError(f"{where}.gpus: above one GPU a trial takes whole GPUs, got {gpus}")
    return Resources(float(cpus), float(gpus))


def _parse_scheduler(raw: Any, where: str) -> SchedulerSpec | None:
    if raw is None:
        return None
    _check_keys(raw, ("type", "grace_period", "reduction_factor", "max_t"), where)
    kind = raw.get("type", "asha")
    if kind not in SCHEDULER_TYPES:
        raise SweepError(f"{where}.type: unknown scheduler {kind!r}; known: {', '.join(SCHEDULER_TYPES)}")
    grace = _expect(raw.get("grace_period", 1), (int,), f"{where}.grace_period", "an integer number of steps")
    factor = _expect(raw.get("reduction_factor", 2), (int, float), f"{where}.reduction_factor", "a number")
    max_t = raw.get("max_t")
    if grace < 1:
        raise SweepError(f"{where}.grace_period: must be >= 1 step, got {grace}")
    if factor <= 1:
        raise SweepError(f"{where}.reduction_factor: must be > 1, got {factor}")
    if max_t is not None:
        _expect(max_t, (int,), f"{where}.max_t", "an integer number of steps")
        if max_t <= grace:
            raise SweepError(f"{where}.max_t: must exceed grace_period ({grace}), got {max_t}")
    return SchedulerSpec(kind, grace, float(factor), max_t)


def _parse_search(raw: Any, where: str) -> SearchSpec | None:
    if raw is None:
        return None
    _check_keys(raw, ("algo", "num_samples", "seed"), where)
    algo = raw.get("algo", "optuna")
    if algo not in SEARCH_ALGOS:
        raise SweepError(f"{where}.algo: unknown search algorithm {algo!r}; known: {', '.join(SEARCH_ALGOS)}")
    n = _expect(raw.get("num_samples", 8), (int,), f"{where}.num_samples", "an integer")
    if n < 1:
        raise SweepError(f"{where}.num_samples: must be >= 1, got {n}")
    seed = _expect(raw.get("seed", 0), (int,), f"{where}.seed", "an integer")
    return SearchSpec(algo, n, seed)


def _parse_teacher(raw: Any, where: str, partial: bool = False) -> dict[str, Any] | None:
    """The teacher section as a dict of parsed fields (budgets give partial ones that are merged)."""
    if raw is None:
        return None
    _check_keys(raw, TEACHER_KEYS, where)
    out: dict[str, Any] = {}
    if "checkpoint" in raw:
        if "base" in raw or "set" in raw:
            raise SweepError(f"{where}: give either checkpoint (an existing teacher) or base/set (train one), not both")
        out["checkpoint"] = _expect(raw["checkpoint"], (str,), f"{where}.checkpoint", "a path")
    if "base" in raw:
        out["base"] = raw["base"]
    if "set" in raw:
        out["set"] = _dotted(raw["set"], f"{where}.set")
        for path in out["set"]:
            _check_path(path, f"{where}.set")
    if "resources" in raw:
        out["resources"] = _parse_resources(raw["resources"], f"{where}.resources")
    if "sec_per_step" in raw:
        out["sec_per_step"] = _positive(raw["sec_per_step"], f"{where}.sec_per_step")
    if not partial and not out:
        raise SweepError(f"{where}: empty teacher section; give base/set or checkpoint")
    return out


def _positive(value: Any, where: str) -> float:
    _expect(value, (int, float), where, "a number > 0")
    if value <= 0:
        raise SweepError(f"{where}: must be > 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class Budget:
    """A budget's raw choices; SweepSpec.plan merges them with the sweep's defaults."""

    name: str
    description: str = ""
    base: Any = None
    set: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] | None = None
    axes: dict[str, Axis] = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None
    metric: str | None = None
    resources: Resources | None = None
    max_concurrent: int | None = None
    max_failures: int | None = None
    scheduler: SchedulerSpec | None = None
    search: SearchSpec | None = None
    sec_per_step: float | None = None
    has_base: bool = False


def _parse_budget(name: str, raw: Any, where: str) -> Budget:
    raw = _check_keys(raw if raw is not None else {}, BUDGET_KEYS, where)
    kwargs: dict[str, Any] = {"name": name}
    if "description" in raw:
        kwargs["description"] = _expect(raw["description"], (str,), f"{where}.description", "a string")
    if "base" in raw:
        kwargs["base"], kwargs["has_base"] = raw["base"], True
    if "set" in raw:
        kwargs["set"] = _dotted(raw["set"], f"{where}.set")
        for path in kwargs["set"]:
            _check_path(path, f"{where}.set")
    if "teacher" in raw:
        kwargs["teacher"] = _parse_teacher(raw["teacher"], f"{where}.teacher", partial=True)
    if "axes" in raw:
        kwargs["axes"] = _parse_axes(raw["axes"], f"{where}.axes")
    if "seeds" in raw:
        kwargs["seeds"] = _parse_seeds(raw["seeds"], f"{where}.seeds")
    if "metric" in raw:
        kwargs["metric"] = _parse_metric(raw["metric"], f"{where}.metric")
    if "resources" in raw:
        kwargs["resources"] = _parse_resources(raw["resources"], f"{where}.resources")
    for key in ("max_concurrent", "max_failures"):
        if key in raw:
            value = _expect(raw[key], (int,), f"{where}.{key}", "an integer")
            if value < (1 if key == "max_concurrent" else 0):
                raise SweepError(f"{where}.{key}: must be >= {1 if key == 'max_concurrent' else 0}, got {value}")
            kwargs[key] = value
    if "scheduler" in raw:
        kwargs["scheduler"] = _parse_scheduler(raw["scheduler"], f"{where}.scheduler")
    if "search" in raw:
        kwargs["search"] = _parse_search(raw["search"], f"{where}.search")
    if "sec_per_step" in raw:
        kwargs["sec_per_step"] = _positive(raw["sec_per_step"], f"{where}.sec_per_step")
    return Budget(**kwargs)


def _parse_metric(raw: Any, where: str) -> str:
    _expect(raw, (str,), where, "a metric key such as eval/sw2/nfe1")
    if not _METRIC.match(raw):
        raise SweepError(f"{where}: {raw!r} is not a metric key; expected eval/<sw2|energy|fd_digits|fid>/nfe<n>"
                         "[/gamma<g>], eval/<metric>/teacher_nfe<n> or train/<name>")
    return raw


# ----------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep file. `plan(budget)` resolves one budget into trials."""

    name: str
    description: str
    path: Path | None
    base: Any
    set: dict[str, Any]
    teacher: dict[str, Any] | None
    axes: dict[str, Axis]
    seeds: tuple[int, ...]
    metric: str
    mode: str
    budgets: dict[str, Budget]
    scheduler: SchedulerSpec | None = None
    search: SearchSpec | None = None
    resources: Resources = Resources()
    max_concurrent: int | None = None
    max_failures: int = 1
    sec_per_step: float | None = None
    tracking: dict[str, str] = field(default_factory=dict)

    def default_root(self) -> Path:
        """Where checkpoints, teachers and Tune state live: $CTM_LAB_SWEEP_ROOT/<name> or ./runs/<name>."""
        parent = os.environ.get("CTM_LAB_SWEEP_ROOT") or "runs"
        return (Path(parent) / self.name).resolve()

    def plan(self, budget: str = "smoke", overrides: Sequence[str] = (), root: str | Path | None = None) -> "SweepPlan":
        if budget not in self.budgets:
            raise SweepError(f"sweep {self.name!r}: unknown budget {budget!r}; this sweep defines "
                             f"{', '.join(self.budgets)}")
        return SweepPlan(self, self.budgets[budget], tuple(overrides),
                         Path(root).resolve() if root is not None else self.default_root())

    def trials(self, budget: str = "smoke", overrides: Sequence[str] = (), root: str | Path | None = None) -> list[Trial]:
        """Every trial of a budget, validated (search sweeps: num_samples pre-drawn random points)."""
        return self.plan(budget, overrides, root).trials()


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise SweepError(f"--set {item!r}: must look like key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _check_path(key, f"--set {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise SweepError(f"--set {item!r}: value is not valid YAML: {err}") from None
        out[key] = _normalise_schedule(key, value)
    return out


_SHARED_WITH_TEACHER = ("model.", "process.", "data.")


@dataclass
class SweepPlan:
    """One budget of one sweep, resolved: merged config layers, axes, seeds, teacher and trials."""

    spec: SweepSpec
    budget: Budget
    overrides: tuple[str, ...]
    root: Path

    def __post_init__(self) -> None:
        spec, b = self.spec, self.budget
        where = f"sweep {spec.name!r} budget {b.name!r}"
        self.where = where
        self.metric = b.metric or spec.metric
        self.mode = spec.mode
        self.resources = b.resources or spec.resources
        self.max_concurrent = b.max_concurrent or spec.max_concurrent
        self.max_failures = b.max_failures if b.max_failures is not None else spec.max_failures
        self.scheduler = b.scheduler if "scheduler" in _given(b) else spec.scheduler
        self.search = b.search or spec.search
        self.sec_per_step = b.sec_per_step or spec.sec_per_step
        self.seeds = b.seeds or spec.seeds
        self.cli = _parse_overrides(self.overrides)
        axes = dict(spec.axes)
        for path, axis in b.axes.items():
            if path not in axes:
                raise SweepError(f"{where}: budgets.{b.name}.axes.{path}: not an axis of this sweep "
                                 f"(axes: {', '.join(axes) or 'none'}); a budget only replaces axis values")
            axes[path] = axis
        self.axes = axes
        for path in self.cli:
            if path in axes:
                raise SweepError(f"--set {path}: {path!r} is a swept axis of {spec.name!r}; a fixed value would "
                                 "collapse the sweep (edit the sweep file or its budget instead)")
            if path == "seed":
                raise SweepError("--set seed: seeds come from the sweep's `seeds:` list")
        distributions = [a for a in axes.values() if a.is_distribution]
        if distributions and self.search is None:
            raise SweepError(f"{where}: axes {', '.join(a.path for a in distributions)} are distributions "
                             "(choice/uniform/loguniform) and need a `search:` section (algo, num_samples)")
        if self.search is not None:
            grids = [a.path for a in axes.values() if not a.is_distribution]
            if grids and self.search.algo == "optuna":
                raise SweepError(f"{where}: search.algo optuna samples every axis; write the grid axes "
                                 f"{', '.join(grids)} as {{choice: [...]}}")
            if not axes:
                raise SweepError(f"{where}: a search needs at least one axis")
            if len(self.seeds) != 1:
                raise SweepError(f"{where}: seeds: a search sweep runs one seed per sampled point, got {list(self.seeds)}")

        # Config layers, each validated for unknown keys with its own name.
        base = b.base if b.has_base else spec.base
        self.layers: list[tuple[str, dict[str, Any]]] = [
            ("defaults", dict(_TRIAL_DEFAULTS)),
            (f"{where}: base", _expand_env(_load_base(base, "base", spec.path), "base")),
            (f"{where}: set", _expand_env(spec.set, "set")),
            (f"{where}: budgets.{b.name}.set", _expand_env(b.set, f"budgets.{b.name}.set")),
            ("--set", self.cli),
        ]
        for name, layer in self.layers:
            for path in layer:
                _check_path(path, name)
            if "seed" in layer and name != "defaults":
                raise SweepError(f"{name}: seed: seeds come from the sweep's `seeds:` list")
        self._fixed = self._merged_layers()
        self._teacher = self._resolve_teacher()
        self._validate_metric_and_scheduler()

    # -- teacher -----------------------------------------------------------------------------
    def _merged_layers(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for _, layer in self.layers:
            merged.update(layer)
        return merged

    def _resolve_teacher(self) -> dict[str, Any] | None:
        spec, b = self.spec, self.budget
        t = dict(spec.teacher or {})
        if b.teacher:
            if "checkpoint" in b.teacher:
                t = {k: v for k, v in t.items() if k not in ("base", "set")}
            elif "base" in b.teacher or "set" in b.teacher:
                t.pop("checkpoint", None)
            merged_set = dict(t.get("set", {}))
            merged_set.update(b.teacher.get("set", {}))
            t.update({k: v for k, v in b.teacher.items() if k != "set"})
            if merged_set:
                t["set"] = merged_set
        cli_teacher = self.cli.get("teacher.checkpoint")
        if cli_teacher:
            return {"checkpoint": str(Path(str(cli_teacher)).resolve())}
        if not t:
            return None
        if "checkpoint" in t:
            path = _expand_env(t["checkpoint"], "teacher.checkpoint")
            return {"checkpoint": str(Path(path).expanduser().resolve())}
        layers = [("defaults", {"runtime.progress": "off"}),
                  ("teacher.base", _expand_env(_load_base(t.get("base"), "teacher.base", spec.path), "teacher.base")),
                  ("teacher.set", _expand_env(t.get("set", {}), "teacher.set")),
                  ("--set", {k: v for k, v in self.cli.items() if k.startswith(_SHARED_WITH_TEACHER)})]
        items: dict[str, Any] = {}
        for name, layer in layers:
            for path in layer:
                _check_path(path, f"{self.where}: {name}")
            items.update(layer)
        items.setdefault("mode", "edm")
        cfg = _validated_config(items.items(), f"{self.where}: teacher")
        if cfg.mode != "edm":
            raise SweepError(f"{self.where}: teacher.mode must be 'edm' (a teacher is trained by DSM alone), got {cfg.mode!r}")
        thash = config_hash(cfg)
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(
            cfg.runtime, out_dir=str(self.root / "teachers" / f"edm-{thash}")))
        return {"config": cfg, "hash": thash, "resources": t.get("resources") or Resources(self.resources.cpus,
                                                                                            self.resources.gpus),
                "sec_per_step": t.get("sec_per_step")}

    @property
    def teacher_config(self) -> TrainConfig | None:
        """The edm-mode config the sweep trains once (None: no teacher, or an existing checkpoint)."""
        return self._teacher["config"] if self._teacher and "config" in self._teacher else None

    @property
    def teacher_hash(self) -> str | None:
        return self._teacher.get("hash") if self._teacher else None

    @property
    def teacher_checkpoint(self) -> str | None:
        """What trials put in teacher.checkpoint: the cached teacher's run dir or the given checkpoint."""
        if not self._teacher:
            return None
        if "checkpoint" in self._teacher:
            return self._teacher["checkpoint"]
        return self._teacher["config"].runtime.out_dir

    @property
    def teacher_resources(self) -> Resources | None:
        return self._teacher.get("resources") if self._teacher else None

    # -- validation --------------------------------------------------------------------------
    def _validate_metric_and_scheduler(self) -> None:
        if self.scheduler is not None and self.scheduler.max_t is None:
            steps = self._fixed.get("train.steps", TrainConfig().train.steps)
            if isinstance(steps, int) and steps <= self.scheduler.grace_period:
                raise SweepError(f"{self.where}: scheduler.grace_period ({self.scheduler.grace_period}) must be "
                                 f"below train.steps ({steps})")

    def _check_metric(self, config: TrainConfig, where: str) -> None:
        m = _METRIC.match(self.metric)
        if m is None or m["family"] is None:
            return
        from ctm_core.data import parse_data_spec
        from ctm_core.samplers import heun_nfe

        try:
            kind = parse_data_spec(config.data.spec).kind
        except ValueError as err:
            raise SweepError(f"{where}: data.spec: {err}") from None
        families = METRIC_FAMILIES.get(kind)
        if families and m["family"] not in families:
            raise SweepError(f"{where}: metric {self.metric!r}: data {config.data.spec!r} is scored by "
                             f"{'/'.join(families)}, not {m['family']} (set `metric:` in this budget)")
        nfe = int(m["nfe"])
        if m["teacher"]:
            steps = config.eval.teacher_steps
            if steps is None or heun_nfe(steps, config.teacher.solver) != nfe:
                have = "none (eval.teacher_steps is null)" if steps is None else \
                    f"teacher_nfe{heun_nfe(steps, config.teacher.solver)}"
                raise SweepError(f"{where}: metric {self.metric!r}: the trials log {have}")
        elif nfe not in config.eval.nfe:
            raise SweepError(f"{where}: metric {self.metric!r}: NFE {nfe} is not in eval.nfe {list(config.eval.nfe)}")
        if m["gamma"] is not None and float(m["gamma"]) not in config.eval.gammas:
            raise SweepError(f"{where}: metric {self.metric!r}: gamma {m['gamma']} is not in eval.gammas "
                             f"{list(config.eval.gammas)}")

    # -- trials ------------------------------------------------------------------------------
    def make_trial(self, axes: dict[str, Any], seed: int, index: int, validate_metric: bool = True) -> Trial:
        """The trial for one point of the axes and one seed (search backends call this per sample)."""
        axes = {path: _normalise_schedule(path, value) for path, value in axes.items()}
        unknown = [p for p in axes if p not in self.axes]
        if unknown:
            raise SweepError(f"{self.where}: {unknown} are not axes of this sweep")
        label = variant_label(axes)
        where = f"{self.where}: trial {index} ({label or 'base'}, seed {seed})"
        items = dict(self._fixed)
        if self.teacher_checkpoint is not None:
            items["teacher.checkpoint"] = self.teacher_checkpoint
        items.update(axes)
        items["seed"] = seed
        config = _validated_config(items.items(), where)
        teacher_cfg = self.teacher_config
        if teacher_cfg is not None and config.mode in ("ctm", "cd"):
            for section in ("model", "process"):
                if getattr(config, section) != getattr(teacher_cfg, section):
                    ours, theirs = flatten(config_to_dict(config)[section]), flatten(config_to_dict(teacher_cfg)[section])
                    diff = [f"{section}.{k}: trial {ours[k]!r} vs teacher {theirs.get(k)!r}" for k in ours
                            if ours[k] != theirs.get(k)]
                    raise SweepError(f"{where}: the {section} section must match the teacher's: {'; '.join(diff)}")
            if config.data.spec != teacher_cfg.data.spec:
                raise SweepError(f"{where}: data.spec {config.data.spec!r} differs from the teacher's "
                                 f"{teacher_cfg.data.spec!r}")
        if validate_metric:
            self._check_metric(config, where)
        # The identity of a trial names its teacher by config hash, not by where the teacher lives,
        # so the same trial hashes alike under any sweep root (de-duplication across machines).
        identity = config
        if self.teacher_hash is not None and config.teacher.checkpoint == self.teacher_checkpoint:
            identity = dataclasses.replace(config, teacher=dataclasses.replace(
                config.teacher, checkpoint=f"teacher-config:{self.teacher_hash}"))
        chash = config_hash(identity)
        out_dir = self.root / "trials" / f"{_slug(label.replace('loss.', '').replace('ema.', ''))}-s{seed}-{chash}"
        config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, out_dir=str(out_dir)))
        gpu_hours = self.resources.gpus * config.train.steps * self.estimate_sec_per_step(config) / 3600
        return Trial(sweep=self.spec.name, index=index, config=config, axes=dict(axes), seed=seed, config_hash=chash,
                     variant=label, resources=self.resources, estimated_gpu_hours=gpu_hours, budget=self.budget.name,
                     teacher_hash=self.teacher_hash)

    def estimate_sec_per_step(self, config: TrainConfig, teacher: bool = False) -> float:
        """Seconds per training step: the file's sec_per_step, else a rough guess from the data kind."""
        if teacher and self._teacher and self._teacher.get("sec_per_step"):
            return self._teacher["sec_per_step"]
        if self.sec_per_step:
            return self.sec_per_step * (0.25 if teacher else 1.0)
        image = not config.data.spec.startswith("toy")
        per_step = 1.0 if image else 0.1
        return per_step * (0.25 if teacher or config.mode == "edm" else 1.0)

    def points(self) -> list[dict[str, Any]]:
        """Axis points: the grid's product, or num_samples pre-drawn random points for a search."""
        axes = list(self.axes.values())
        if not axes:
            return [{}]
        if self.search is None:
            return [dict(zip([a.path for a in axes], combo)) for combo in itertools.product(*(a.values for a in axes))]
        import random

        rng = random.Random(int(hashlib.sha256(f"{self.spec.name}:{self.search.seed}".encode()).hexdigest()[:8], 16))
        return [{a.path: a.sample(rng.random(), rng.randrange(1 << 30)) for a in axes}
                for _ in range(self.search.num_samples)]

    def trials(self) -> list[Trial]:
        # Distribution axes: every range end must give a valid config (else a sample fails mid-sweep).
        for axis in self.axes.values():
            if axis.is_distribution:
                others = {a.path: a.endpoints()[0] for a in self.axes.values() if a.path != axis.path}
                for value in axis.endpoints():
                    self.make_trial({**others, axis.path: value}, self.seeds[0], -1)
        out: list[Trial] = []
        for point in self.points():
            for seed in self.seeds:
                out.append(self.make_trial(point, seed, len(out)))
        hashes: dict[str, Trial] = {}
        for t in out:
            if t.config_hash in hashes:
                other = hashes[t.config_hash]
                raise SweepError(f"{self.where}: trials {other.index} ({other.name}) and {t.index} ({t.name}) resolve "
                                 "to the same config (an axis value that changes nothing?)")
            hashes[t.config_hash] = t
        return out

    def teacher_estimate_hours(self) -> tuple[float, float]:
        """(wall hours, GPU hours) of training the teacher, 0 when none is trained."""
        cfg = self.teacher_config
        if cfg is None:
            return 0.0, 0.0
        wall = cfg.train.steps * self.estimate_sec_per_step(cfg, teacher=True) / 3600
        return wall, wall * (self.teacher_resources.gpus if self.teacher_resources else 0)


def _given(budget: Budget) -> set[str]:
    """Which optional budget fields were written in the file (None is a real value for scheduler)."""
    return {f.name for f in dataclasses.fields(budget) if getattr(budget, f.name) not in (None, {}, (), "")}


# ----------------------------------------------------------------------------------------------
# Loading


def list_sweeps(directory: str | Path = SWEEPS_DIR) -> dict[str, str]:
    """{name: one-line description} of the sweep files in `directory` (unparsable ones say why)."""
    out: dict[str, str] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            text = str(raw.get("description", "")).strip().splitlines()
            out[path.stem] = text[0] if text else ""
        except (yaml.YAMLError, AttributeError) as err:
            out[path.stem] = f"(unreadable: {err})"
    return out


def load_sweep(name_or_path: str | Path) -> SweepSpec:
    """Parse and validate a sweep by name (sweeps/<name>.yaml) or path; SweepError names the key."""
    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = SWEEPS_DIR / f"{text}.yaml"
        if not path.is_file():
            known = list_sweeps()
            listing = "\n".join(f"  {n:<20} {d}" for n, d in known.items()) or "  (none)"
            raise UnknownSweepError(f"unknown sweep {text!r}; known sweeps:\n{listing}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"sweep file {path}: not valid YAML: {err}") from None
    return parse_sweep(raw, path)


def parse_sweep(raw: Any, path: Path | None = None, name: str | None = None) -> SweepSpec:
    """Validate the contents of a sweep file (also usable on an inline dict in tests)."""
    name = name or (raw or {}).get("name") if isinstance(raw, dict) else name
    name = name or (path.stem if path else None)
    where = f"sweep {name!r}"
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: the file must hold a mapping with description, base, axes, ... ")
    _check_keys(raw, TOP_KEYS, where)
    if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
        raise SweepError(f"{where}: name must be letters, digits, '_', '-' or '.', got {name!r}")
    description = _expect(raw.get("description", ""), (str,), f"{where}: description", "a string")
    set_ = _dotted(raw.get("set"), f"{where}: set")
    for p in set_:
        _check_path(p, f"{where}: set")
    teacher = _parse_teacher(raw.get("teacher"), f"{where}: teacher")
    axes = _parse_axes(raw.get("axes"), f"{where}: axes")
    seeds = _parse_seeds(raw.get("seeds", [0]), f"{where}: seeds")
    metric = _parse_metric(raw.get("metric", "eval/sw2/nfe1"), f"{where}: metric")
    mode = raw.get("mode", "min")
    if mode not in ("min", "max"):
        raise SweepError(f"{where}: mode: must be 'min' or 'max', got {mode!r}")
    budgets_raw = raw.get("budgets")
    if budgets_raw is None:
        budgets_raw = {"smoke": {}}
    if not isinstance(budgets_raw, dict) or not budgets_raw:
        raise SweepError(f"{where}: budgets: must map budget names ({', '.join(BUDGETS)}) to their settings")
    budgets = {}
    for bname, braw in budgets_raw.items():
        if bname not in BUDGETS:
            raise SweepError(f"{where}: budgets.{bname}: unknown budget; allowed: {', '.join(BUDGETS)}")
        budgets[bname] = _parse_budget(bname, braw, f"{where}: budgets.{bname}")
    resources = _parse_resources(raw["resources"], f"{where}: resources") if "resources" in raw else Resources()
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None:
        _expect(max_concurrent, (int,), f"{where}: max_concurrent", "an integer >= 1")
        if max_concurrent < 1:
            raise SweepError(f"{where}: max_concurrent: must be >= 1, got {max_concurrent}")
    max_failures = _expect(raw.get("max_failures", 1), (int,), f"{where}: max_failures", "an integer >= 0")
    if max_failures < 0:
        raise SweepError(f"{where}: max_failures: must be >= 0, got {max_failures}")
    tracking = raw.get("tracking") or {}
    _check_keys(tracking, ("uri", "experiment"), f"{where}: tracking")
    for k, v in tracking.items():
        _expect(v, (str,), f"{where}: tracking.{k}", "a string")
    sec = _positive(raw["sec_per_step"], f"{where}: sec_per_step") if "sec_per_step" in raw else None
    base = raw.get("base")
    _load_base(base, f"{where}: base", path)  # a missing file is refused now, not at plan time
    spec = SweepSpec(name=str(name), description=description.strip(), path=path, base=base, set=set_, teacher=teacher,
                     axes=axes, seeds=seeds, metric=metric, mode=mode, budgets=budgets,
                     scheduler=_parse_scheduler(raw.get("scheduler"), f"{where}: scheduler"),
                     search=_parse_search(raw.get("search"), f"{where}: search"), resources=resources,
                     max_concurrent=max_concurrent, max_failures=max_failures, sec_per_step=sec, tracking=tracking)
    if not axes and not any(b.axes for b in budgets.values()):
        pass  # a sweep over seeds only is legitimate
    return spec
