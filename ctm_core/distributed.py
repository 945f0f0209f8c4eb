"""Which process am I? One answer for torchrun, SLURM (incl. submitit) and Ray Train.

Ray Train and other launchers that initialise the process group themselves are detected through
torch.distributed; torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; SLURM tasks carry SLURM_PROCID etc.
(the launcher must export MASTER_ADDR/MASTER_PORT, as submitit's helpers and our cluster layer do).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _launcher_ranks() -> tuple[int, int, int] | None:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is visible")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join (or create) the process group the launcher prepared; a single process otherwise."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        return DistEnv(rank, world, local, _pick_device(device_preference, local))
    ranks = _launcher_ranks()
    if ranks is None or ranks[1] == 1:
        return DistEnv(device=_pick_device(device_preference, 0))
    rank, world, local = ranks
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed launch with world size {world} but {missing} not set: the launcher "
                           "must export the rendezvous address (torchrun and cluster.slurm do)")
    device = _pick_device(device_preference, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world, local, device)


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def broadcast_object(value, env: DistEnv):
    """Rank 0's value on every rank (e.g. the checkpoint chosen for resume)."""
    if not env.is_distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
