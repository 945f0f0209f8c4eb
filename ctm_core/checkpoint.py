"""Checkpoints that survive crashes: atomic writes, newest-valid resume, keep-last-K plus best.

A checkpoint is one torch file holding everything needed to continue bit-for-bit: networks,
every EMA, optimisers, discriminator, data-stream position, RNG states, and callers' extra state
(e.g. the MLflow run id, so a requeued job continues the same run).
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")
BEST_NAME = "best.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over the target.

    Readers see the old file or the new one, never a partial one; a failed write leaves no temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"ckpt_{step:09d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every step checkpoint, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def reached_step(directory: str | os.PathLike, steps: int) -> bool:
    """Whether the run in `directory` has a checkpoint at `steps` or later (nothing left to train)."""
    found = list_checkpoints(directory)
    return bool(found) and found[-1][0] >= steps


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path} is not a ctm-lab checkpoint (no 'step')")
    return state


def load_latest_valid(directory: str | os.PathLike, map_location: Any = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; corrupt ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except Exception as err:  # a truncated or foreign file must not stop the resume
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(err).__name__}: {err}", stacklevel=2)
    return None


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest keep_last step checkpoints (best.pt is separate and kept)."""
    for _, path in list_checkpoints(directory)[:-keep_last]:
        path.unlink(missing_ok=True)


def ema_prefix(rates: list[float] | tuple[float, ...], rate: float) -> str:
    """State-dict prefix of one average inside an EMABank."""
    rates = [float(r) for r in rates]
    if float(rate) not in rates:
        raise ValueError(f"rate {rate} is not among the checkpoint's EMA rates {rates}")
    return f"averages.{rates.index(float(rate))}."


def network_weights(state: dict[str, Any], ema_rate: float | None = None) -> dict[str, torch.Tensor]:
    """The CTMModel weights stored in a checkpoint: the raw student, or its EMA at `ema_rate`."""
    if ema_rate is None:
        return state["model"]
    prefix = ema_prefix(state["ema_rates"], ema_rate)
    return {k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)}


def resolve_run_state(path: str | os.PathLike, what: str, map_location: Any = "cpu") -> tuple[Path, dict[str, Any]]:
    """A run directory (its newest valid checkpoint) or a checkpoint file; errors name `what` (the option)."""
    path = Path(path)
    if path.is_dir():
        found = load_latest_valid(path, map_location)
        if found is None:
            raise FileNotFoundError(f"{what}: no valid checkpoint in {path}")
        return found
    if path.is_file():
        return path, load_checkpoint(path, map_location)
    raise FileNotFoundError(f"{what}: {path} does not exist")
