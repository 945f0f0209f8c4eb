"""The launcher's entry points into cluster/: extra arguments, backend dispatch, status.

sweeps/launch.py does

    from cluster.cli import add_cluster_arguments, dispatch_cluster, CLUSTER_BACKENDS
    add_cluster_arguments(parser)                       # --profile, --dry-run, --max-concurrent, --nodes
    if args.backend in CLUSTER_BACKENDS:
        dispatch_cluster(spec, trials, args)            # submit (or print, with --dry-run)

and `launch.py status NAME` calls `cluster.status.print_status(root, trials)`. Arguments the
launcher already defines (e.g. its own --dry-run) are left alone and shared. `--set cluster.KEY=V`
items adjust the node profile; every other --set item stays the launcher's.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

CLUSTER_BACKENDS = ("slurm", "slurm-ray")


def _has_option(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions  # argparse has no public lookup


def add_cluster_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("SLURM (--backend slurm | slurm-ray)")
    if not _has_option(parser, "--profile"):
        group.add_argument("--profile", default=None,
                           help="node profile: a name in cluster/profiles (v100, a100, local) or a YAML path; "
                                "override fields with --set cluster.KEY=VALUE")
    if not _has_option(parser, "--dry-run"):
        group.add_argument("--dry-run", action="store_true",
                           help="print the sbatch parameters and script of every job; submit nothing")
    if not _has_option(parser, "--max-concurrent"):
        group.add_argument("--max-concurrent", type=int, default=None,
                           help="trials running at once: the job array's %%K (slurm) or Tune's limit (slurm-ray)")
    if not _has_option(parser, "--nodes"):
        group.add_argument("--nodes", type=int, default=None,
                           help="slurm-ray: nodes in the Ray allocation [enough for --max-concurrent trials]")
    return parser


def dispatch_cluster(spec: Any, trials: Sequence[Any], args: Any):
    """Run the chosen cluster backend; returns its Submission (job ids, scripts).

    Refused input (a bad profile or override, a batch the GPUs cannot share, trials still running
    from an earlier submission) ends the command with `error: ...` and exit status 2, like the
    launcher's own refusals."""
    from .profiles import ProfileError
    from .slurm import SubmitError

    backend = getattr(args, "backend", "slurm")
    try:
        if backend == "slurm":
            from .slurm import submit_sweep

            return submit_sweep(spec, trials, args)
        if backend == "slurm-ray":
            from .slurm_ray import submit_ray_sweep

            return submit_ray_sweep(spec, trials, args)
    except (ProfileError, SubmitError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    raise ValueError(f"--backend {backend!r} is not a cluster backend ({', '.join(CLUSTER_BACKENDS)})")
