"""Node profiles: what one kind of SLURM node offers and how jobs on it must be set up.

A profile is a small YAML file (`cluster/profiles/<name>.yaml`, or any file of the user's own)
naming the partition, account, QoS, time limit, node constraint, GPUs per node, CPUs and memory
per GPU, the shell lines that prepare a job (module loads, venv activation) and the trainer
overrides the hardware implies (per-GPU microbatches that fit its memory, bf16 or not). Sites
differ in every one of these, so each field can be overridden on the command line:

    --profile v100 --set cluster.account=proj42 --set cluster.time_limit=2:00:00
    --set cluster.trainer.gan.micro_batch=8 --set cluster.env.CTM_LAB_CACHE=/scratch/cache

    python -m cluster.profiles show v100 [--set cluster.KEY=VALUE ...]   # the resolved profile
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
OVERRIDE_PREFIX = "cluster."
_MAPPING_FIELDS = ("env", "trainer", "sbatch_extra")   # KEY.SUBKEY=VALUE addresses one entry
_MEM_RE = re.compile(r"^\d+[KMGT]?$")


class _ProfileLoader(yaml.SafeLoader):
    """YAML 1.1 reads 24:00:00 as the base-60 int 86400; a profile means the SLURM time string."""


def _keep_colon_scalars(kind: str):
    base = getattr(yaml.SafeLoader, f"construct_yaml_{kind}")

    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        text = loader.construct_scalar(node)
        return text if ":" in str(text) else base(loader, node)
    return construct


_ProfileLoader.add_constructor("tag:yaml.org,2002:int", _keep_colon_scalars("int"))
_ProfileLoader.add_constructor("tag:yaml.org,2002:float", _keep_colon_scalars("float"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ProfileLoader)


class ProfileError(ValueError):
    """A refused profile or override; the message names the offending key."""


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    gpus_per_node: int
    time_limit: str = "24:00:00"            # SLURM syntax: MM, HH:MM:SS, D-HH[:MM[:SS]]
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    cpus_per_gpu: int = 4
    mem_per_gpu: Optional[str] = None       # sbatch --mem-per-gpu, e.g. 40G
    signal_delay_s: int = 300               # USR2 this long before the limit -> checkpoint + requeue
    max_requeues: int = 10                  # time-outs a trial may take before it is given up
    array_parallelism: int = 4              # default %K of a sweep's job array
    python: Optional[str] = None            # interpreter on the compute nodes; None: the submitting one
    setup: tuple[str, ...] = ()             # shell lines run before the job's tasks start
    env: Mapping[str, str] = field(default_factory=dict)      # exported in the job script
    trainer: Mapping[str, Any] = field(default_factory=dict)  # dotted trainer overrides
    sbatch_extra: Mapping[str, Any] = field(default_factory=dict)  # any other #SBATCH flag

    @property
    def time_limit_min(self) -> int:
        return parse_time_limit(self.time_limit)

    def trainer_overrides(self) -> list[str]:
        """`key=value` strings in the trainer's --set syntax (values as YAML scalars)."""
        return [f"{key}={_yaml_scalar(value)}" for key, value in self.trainer.items()]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["setup"] = list(self.setup)
        data["env"], data["trainer"], data["sbatch_extra"] = dict(self.env), dict(self.trainer), dict(self.sbatch_extra)
        return data


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ClusterProfile))


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("\n...").strip()


def parse_time_limit(value: Any) -> int:
    """SLURM time syntax (or plain minutes) -> whole minutes, rounded up."""
    if isinstance(value, bool):
        raise ProfileError(f"cluster.time_limit: expected SLURM time like 24:00:00 or 1-12:00, got {value!r}")
    if isinstance(value, int):
        minutes = value
    else:
        text = str(value).strip()
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if not match:
            raise ProfileError(f"cluster.time_limit: expected SLURM time like 24:00:00 or 1-12:00, got {value!r}")
        days, a, b, c = match.groups()
        parts = [int(x) for x in (a, b, c) if x is not None]
        if days is not None:   # D-HH, D-HH:MM, D-HH:MM:SS
            hours, mins, secs = (parts + [0, 0])[:3]
            seconds = ((int(days) * 24 + hours) * 60 + mins) * 60 + secs
        elif len(parts) == 1:  # MM
            seconds = parts[0] * 60
        elif len(parts) == 2:  # MM:SS
            seconds = parts[0] * 60 + parts[1]
        else:                  # HH:MM:SS
            seconds = (parts[0] * 60 + parts[1]) * 60 + parts[2]
        minutes = -(-seconds // 60)
    if minutes < 1:
        raise ProfileError(f"cluster.time_limit: must be at least one minute, got {value!r}")
    return minutes


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_trainer_overrides(trainer: Mapping[str, Any]) -> None:
    """The overrides must name real trainer keys with valid values (checked against the defaults)."""
    from ctm_core.config import ConfigError, load_config

    for key, value in trainer.items():
        try:
            load_config(None, [f"{key}={_yaml_scalar(value)}"])
        except ConfigError as err:
            detail = str(err).removeprefix("invalid config:").strip()
            raise ProfileError(f"cluster.trainer.{key}: {detail}") from None


def profile_from_dict(data: Mapping[str, Any], origin: str = "<dict>") -> ClusterProfile:
    """Validate a mapping into a ClusterProfile; errors name the key (cluster.KEY)."""
    if not isinstance(data, Mapping):
        raise ProfileError(f"profile {origin}: the top level must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELD_NAMES))
    if unknown:
        raise ProfileError(f"profile {origin}: unknown key cluster.{unknown[0]}; allowed keys: {', '.join(FIELD_NAMES)}")
    values = dict(data)

    def positive_int(key: str, minimum: int = 1) -> None:
        v = values.get(key)
        if key in values and (isinstance(v, bool) or not isinstance(v, int) or v < minimum):
            raise ProfileError(f"cluster.{key}: must be an int >= {minimum}, got {v!r}")

    def optional_str(key: str) -> None:
        v = values.get(key)
        if v is not None and not (isinstance(v, str) and v.strip()):
            raise ProfileError(f"cluster.{key}: must be a non-empty string or null, got {v!r}")

    if "name" not in values or not isinstance(values["name"], str) or not values["name"].strip():
        raise ProfileError(f"cluster.name: every profile needs a name ({origin})")
    if "gpus_per_node" not in values:
        raise ProfileError(f"cluster.gpus_per_node: missing ({origin})")
    positive_int("gpus_per_node")
    positive_int("cpus_per_gpu")
    positive_int("signal_delay_s", 0)
    positive_int("max_requeues", 0)
    positive_int("array_parallelism")
    for key in ("partition", "account", "qos", "constraint", "mem_per_gpu", "python"):
        optional_str(key)
    if values.get("mem_per_gpu") is not None and not _MEM_RE.match(str(values["mem_per_gpu"])):
        raise ProfileError(f"cluster.mem_per_gpu: expected an amount like 40G or 40960M, got {values['mem_per_gpu']!r}")
    if "time_limit" in values:
        minutes = parse_time_limit(values["time_limit"])
        values["time_limit"] = values["time_limit"] if isinstance(values["time_limit"], str) else str(minutes)
        if values.get("signal_delay_s", 300) >= minutes * 60:
            raise ProfileError(f"cluster.signal_delay_s: {values.get('signal_delay_s', 300)} s leaves no run time "
                               f"within cluster.time_limit {values['time_limit']}")
    setup = values.get("setup") or ()
    if isinstance(setup, str) or not all(isinstance(line, str) for line in setup):
        raise ProfileError(f"cluster.setup: must be a list of shell lines, got {setup!r}")
    values["setup"] = tuple(setup)
    for key in _MAPPING_FIELDS:
        mapping = values.get(key) or {}
        if not isinstance(mapping, Mapping):
            raise ProfileError(f"cluster.{key}: must be a mapping, got {mapping!r}")
        values[key] = _flatten(mapping) if key == "trainer" else dict(mapping)
    for name, value in values["env"].items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            raise ProfileError(f"cluster.env.{name}: not a valid environment variable name")
        if isinstance(value, (dict, list)):
            raise ProfileError(f"cluster.env.{name}: must be a scalar, got {value!r}")
        values["env"][name] = "" if value is None else str(value)
    _check_trainer_overrides(values["trainer"])
    return ClusterProfile(**values)


def resolve_profile_path(source: str | Path) -> Path:
    """A profile name (cluster/profiles/<name>.yaml) or a path to the user's own YAML file."""
    text = str(source)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or "/" in text:
        if not path.is_file():
            raise ProfileError(f"--profile: file not found: {path}")
        return path
    candidate = PROFILE_DIR / f"{text}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ProfileError(f"--profile: unknown profile {text!r}; known: {', '.join(known)} (or pass a YAML path)")
    return candidate


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `cluster.KEY=VALUE` from the other --set items (trainer/sweep overrides)."""
    cluster, rest = [], []
    for item in overrides:
        (cluster if item.strip().startswith(OVERRIDE_PREFIX) else rest).append(item)
    return cluster, rest


def apply_profile_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `[cluster.]KEY=VALUE` (value parsed as YAML) to a raw profile mapping."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for k in ("trainer",):
        if isinstance(out.get(k), Mapping):
            out[k] = _flatten(out[k])
    for item in overrides:
        if "=" not in item:
            raise ProfileError(f"override {item!r} must look like cluster.KEY=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix(OVERRIDE_PREFIX)
        head, _, rest = key.partition(".")
        if head not in FIELD_NAMES:
            raise ProfileError(f"--set cluster.{key}: unknown key cluster.{head}; allowed keys: {', '.join(FIELD_NAMES)}")
        value = _load_yaml(raw) if raw.strip() else None
        if rest:
            if head not in _MAPPING_FIELDS:
                raise ProfileError(f"--set cluster.{key}: cluster.{head} is not a mapping "
                                   f"(only {', '.join(_MAPPING_FIELDS)} take KEY.SUBKEY)")
            section = dict(out.get(head) or {})
            section[rest] = value
            out[head] = section
        else:
            out[head] = value
    return out


def load_profile(source: str | Path, overrides: Sequence[str] = ()) -> ClusterProfile:
    """Read a profile by name or path, apply `cluster.KEY=VALUE` overrides, validate."""
    path = resolve_profile_path(source)
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ProfileError(f"profile {path}: not valid YAML: {err}") from None
    if not isinstance(data, Mapping):
        raise ProfileError(f"profile {path}: the top level must be a mapping")
    return profile_from_dict(apply_profile_overrides(data, overrides), origin=str(path))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.profiles", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a resolved profile")
    show.add_argument("profile", help="profile name or YAML path")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="cluster.KEY=VALUE")
    sub.add_parser("list", help="list the profiles shipped in cluster/profiles")
    args = parser.parse_args(argv)
    if args.command == "list":
        for path in sorted(PROFILE_DIR.glob("*.yaml")):
            print(path.stem)
        return 0
    try:
        profile = load_profile(args.profile, args.overrides)
    except ProfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(profile.to_dict(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
