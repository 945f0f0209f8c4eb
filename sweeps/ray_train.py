"""One training run on Ray Train: the same trainer, one worker per GPU (or CPU process), on any
Ray cluster (a laptop's local Ray, `cluster/slurm_ray.py` on SLURM, or `ray://ADDR`).

    python -m sweeps.ray_train --config FILE.yaml --workers 4 --gpu [--address ray://HOST:10001] [--set k=v ...]

Why Ray Train next to torchrun and SLURM: on a Ray cluster that spans nodes, Ray places the
workers and builds the process group (NCCL on GPUs, gloo on CPUs); ctm_core.train joins that
group (ctm_core.distributed) and does the rest exactly as under torchrun: same global batch,
same per-step randomness, rank-0-only checkpoints and logs in ``runtime.out_dir``, which must be
on a disk all nodes share. A crashed worker is restarted by Ray (``--max-failures``) and the
trainer resumes from its newest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ctm_core.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, load_config


def _worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the process group already exists, train() joins it."""
    import ray.train
    import torch

    from ctm_core.train import train

    torch.set_num_threads(loop_config["threads"])
    result = train(config_from_dict(loop_config["config"]))
    ray.train.report({"step": result.step, **{k: v for k, v in result.metrics.items()
                                               if isinstance(v, (int, float)) and not isinstance(v, bool)}})


def train_on_ray(config: TrainConfig, workers: int, use_gpu: bool = False, cpus_per_worker: int = 1,
                 max_failures: int = 0, address: str | None = None) -> dict[str, Any]:
    """Train ``config`` with ``workers`` DDP processes placed by Ray; returns rank 0's final metrics."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if cpus_per_worker < 1:
        raise ValueError(f"cpus_per_worker must be >= 1, got {cpus_per_worker}")
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    out_dir = Path(config.runtime.out_dir).resolve()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": config_to_dict(config), "threads": cpus_per_worker},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name="ray_train", storage_path=str(out_dir.parent / f"{out_dir.name}.ray"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.ray_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="trainer YAML config (defaults apply to missing keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, required=True, help="DDP processes (one per GPU with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL (default: CPU, gloo)")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--max-failures", type=int, default=0, help="worker-group restarts (each resumes)")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local Ray)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.workers < 1 or args.cpus_per_worker < 1:
        print("error: --workers and --cpus-per-worker must be >= 1", file=sys.stderr)
        return 2
    metrics = train_on_ray(config, args.workers, args.gpu, args.cpus_per_worker, args.max_failures, args.address)
    print(json.dumps({"out_dir": config.runtime.out_dir, **metrics}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
