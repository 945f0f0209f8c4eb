"""Ray on SLURM: one allocation, a Ray cluster inside it, the Ray Tune sweep as its driver.

    python sweeps/launch.py NAME --backend slurm-ray --profile a100 [--nodes N] [--max-concurrent K] [--dry-run]

For sweeps larger than one node's worth of trials (or with fractional-GPU trials that should share
devices), SLURM hands out one allocation of N nodes; the job script starts the Ray head on the
first node and one Ray worker per further node with `srun`, then runs the sweeps package's Ray
Tune backend against it (address=auto via RAY_ADDRESS). Tune packs trials onto the GPUs.

Two users -- or two of your own jobs -- on one node must not collide, so each job takes
  * its fixed ports (GCS, raylet, object manager, client server, dashboard, dashboard agent,
    metrics, runtime-env agent) from a block derived from its job id, and OS-assigned worker ports,
  * its own temp dir /tmp/ray-<uid>-<jobid> (sockets, logs, spilled objects), removed at the end,
  * its own Ray auth token (RAY_AUTH_MODE=token, the token only in the job's environment);
and the script never calls `ray stop` (which ends *every* Ray process of the user on the node):
it ends exactly the srun steps it started.

A sweep's teacher that is not trained yet is trained by the driver before Tune starts (the trials
wait for it). Each submission has its own Tune experiment, named in its payload; a submission while
trials of the sweep are still queued or running is refused.

Preemption / time limit: SLURM signals the batch shell (USR2, `signal_delay_s` before the end);
the script requeues the job. The next run restores the submission's Tune experiment; every trial
resumes from the newest checkpoint in its out_dir and continues its MLflow run (run id kept in the
checkpoint).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import getpass
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .profiles import ClusterProfile
from .slurm import (SubmitError, Submission, _arg, _create_parent_run, _resources, _weights_note, _write_jobs_file,
                    batch_plan, finalize_parent_run, job_layout, job_setup_lines, move_aside_finished, plan_teacher,
                    prepare_trial, refuse_busy, resolve_tracking, submission_inputs)
from .status import sweep_root_of

RAY_DIR = "slurm-ray"
# Each job's fixed Ray ports come from a block of PORT_BLOCK derived from its job id; worker
# processes bind ports the OS assigns (--min/max-worker-port=0), so they never collide either.
PORT_BASE, PORT_BLOCK, PORT_BLOCKS = 20000, 10, 4000
PORT_OFFSETS = {"gcs": 0, "node_manager": 1, "object_manager": 2, "client_server": 3, "dashboard_agent_listen": 4,
                "dashboard_agent_grpc": 5, "metrics_export": 6, "runtime_env_agent": 7, "dashboard": 8}


def ray_ports(job_id: int | str) -> dict[str, int]:
    """The job's own ports, in 20000..59999. Job ids are unique, so two jobs on one node share a
    block only if their ids differ by a multiple of 4000; even then `ray start` fails on the taken
    port (and the per-job auth token keeps the clusters apart) rather than joining the wrong one."""
    base = PORT_BASE + (int(str(job_id).split("_")[0]) % PORT_BLOCKS) * PORT_BLOCK
    return {name: base + off for name, off in PORT_OFFSETS.items()}


def ray_temp_dir(job_id: int | str, uid: Optional[int] = None) -> str:
    """Short (unix socket paths are limited to 107 bytes) and unique per user and job."""
    return f"/tmp/ray-{os.getuid() if uid is None else uid}-{job_id}"


@dataclasses.dataclass(frozen=True)
class RayAllocation:
    nodes: int
    gpus_per_node: int
    cpus_per_node: int
    concurrency: int


def plan_allocation(trials: Sequence[Any], profile: ClusterProfile, concurrency: int,
                    nodes: Optional[int] = None) -> RayAllocation:
    """Enough nodes for `concurrency` trials at once (or exactly `nodes`)."""
    gpus = max(_resources(t)[0] for t in trials)
    cpus = max(_resources(t)[1] for t in trials)
    if gpus > 0:
        need = math.ceil(concurrency * gpus / profile.gpus_per_node)
        n = nodes or max(1, need)
        return RayAllocation(n, profile.gpus_per_node, profile.gpus_per_node * profile.cpus_per_gpu, concurrency)
    n = nodes or 1
    return RayAllocation(n, 0, max(1, math.ceil(concurrency * cpus / n)), concurrency)


def _sbatch_lines(profile: ClusterProfile, alloc: RayAllocation, job_name: str, log_dir: Path) -> list[str]:
    flags: dict[str, Any] = {
        "job-name": job_name, "nodes": alloc.nodes, "ntasks-per-node": 1, "cpus-per-task": alloc.cpus_per_node,
        "time": profile.time_limit_min, "output": str(log_dir / "%j.out"), "open-mode": "append",
        "signal": f"B:USR2@{profile.signal_delay_s}", "requeue": True,
    }
    if alloc.gpus_per_node:
        flags["gpus-per-node"] = alloc.gpus_per_node
        if profile.mem_per_gpu:
            flags["mem-per-gpu"] = profile.mem_per_gpu
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(profile, key):
            flags[key] = getattr(profile, key)
    flags.update(profile.sbatch_extra)
    out = []
    for key in sorted(flags):
        value = flags[key]
        out.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}")
    return out


def render_ray_script(profile: ClusterProfile, alloc: RayAllocation, job_name: str, log_dir: Path, payload: Path,
                      tracking_uri: Optional[str], python: Optional[str] = None) -> str:
    """The sbatch script: Ray head + workers via srun, then the Tune driver; requeue on USR2."""
    py = python or shlex.quote(sys.executable)
    ray_cli = f"{py} -m ray.scripts.scripts"
    offsets = "\n".join(f"ray_{name}_port=$(( block + {off} ))" for name, off in PORT_OFFSETS.items())
    lines = ["#!/bin/bash", "", "# Parameters", *_sbatch_lines(profile, alloc, job_name, log_dir), "",
             "# setup", *job_setup_lines(profile, tracking_uri), "",
             f"""# --- a private Ray cluster inside this allocation ---------------------------------------
set -u
job="$SLURM_JOB_ID"
# Fixed ports from a block of {PORT_BLOCK} chosen by the job id (jobs sharing a node, other users' included,
# get different blocks); worker processes take OS-assigned ports.
block=$(( {PORT_BASE} + (job % {PORT_BLOCKS}) * {PORT_BLOCK} ))
{offsets}
ray_tmp="/tmp/ray-$(id -u)-$job"      # own temp dir: sockets, logs and spilled objects of this job only
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node="${{nodes[0]}}"
head_ip="${{CTM_LAB_RAY_HEAD_IP:-$({py} -c 'from ray._private.services import get_node_ip_address as f; print(f())')}}"
export RAY_ADDRESS="$head_ip:$ray_gcs_port"
export RAY_USAGE_STATS_ENABLED=0
# Token authentication with a token of this job's own, passed in the environment (srun exports it
# to the head, the workers and the driver): other users reaching these ports cannot run code here.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$({py} -c 'import secrets; print(secrets.token_hex(32))')"
export RAY_AUTH_TOKEN
node_args=(--num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="${{SLURM_GPUS_ON_NODE:-0}}" --temp-dir="$ray_tmp"
  --node-manager-port="$ray_node_manager_port" --object-manager-port="$ray_object_manager_port"
  --dashboard-agent-listen-port="$ray_dashboard_agent_listen_port"
  --dashboard-agent-grpc-port="$ray_dashboard_agent_grpc_port" --metrics-export-port="$ray_metrics_export_port"
  --runtime-env-agent-port="$ray_runtime_env_agent_port"
  --min-worker-port=0 --max-worker-port=0
  --disable-usage-stats --block)
steps=()
# With ray[client] installed, `ray start --head` opens the client server on 10001 unless told otherwise.
head_args=(--head --node-ip-address="$head_ip" --port="$ray_gcs_port" --include-dashboard=false
  --dashboard-port="$ray_dashboard_port")   # the headless dashboard process still binds a port (8265)
if {py} -c 'import sys; from ray._private.utils import get_ray_client_dependency_error as e; sys.exit(e() is not None)' 2>/dev/null; then
  head_args+=(--ray-client-server-port="$ray_client_server_port")
fi
srun --overlap --nodes=1 --ntasks=1 -w "$head_node" {ray_cli} start "${{head_args[@]}}" "${{node_args[@]}}" &
steps+=($!)
for _ in $(seq 1 240); do
  {ray_cli} health-check --address "$RAY_ADDRESS" >/dev/null 2>&1 && break
  kill -0 "${{steps[0]}}" 2>/dev/null || {{ echo "ray head exited during start-up" >&2; exit 1; }}
  sleep 0.5
done
for node in "${{nodes[@]:1}}"; do
  srun --overlap --nodes=1 --ntasks=1 -w "$node" {ray_cli} start --address="$RAY_ADDRESS" "${{node_args[@]}}" &
  steps+=($!)
done
cleanup() {{ kill "${{steps[@]}}" 2>/dev/null; wait "${{steps[@]}}" 2>/dev/null; rm -rf "$ray_tmp"; }}
# Time limit / preemption: requeue this allocation; trials resume from their checkpoints next time.
on_usr2() {{ echo "USR2 at $(date): requeueing $job" >&2; scontrol requeue "$job"; kill "$driver" 2>/dev/null; }}
trap on_usr2 USR2
trap 'exit 143' TERM   # scancel: leave through the EXIT trap, so the temp dir goes too
trap cleanup EXIT

# --- the Ray Tune sweep (driver on the head node) ---------------------------------------------
{py} -u -m cluster.slurm_ray drive {shlex.quote(str(payload))} &
driver=$!
wait "$driver"; status=$?
while kill -0 "$driver" 2>/dev/null; do wait "$driver"; status=$?; done   # a trapped signal interrupts wait
exit $status
"""]
    return "\n".join(lines)


def submit_ray_sweep(spec: Any, trials: Sequence[Any], args: Any = None, *, out=None) -> Submission:
    """Submit (or print, with args.dry_run) one allocation running the sweep on Ray Tune."""
    import cloudpickle

    out = out or sys.stdout
    profile, user_overrides, sweep = submission_inputs(spec, trials, args)
    prepared = [prepare_trial(t, profile, user_overrides, max(1, int(_resources(t)[0]))) for t in trials]
    sweep_root = sweep_root_of(spec, prepared, sweep).absolute()
    concurrency = int(_arg(args, "max_concurrent", 0) or getattr(args, "plan_max_concurrent", 0)
                      or profile.array_parallelism)
    nodes = _arg(args, "nodes")
    alloc = plan_allocation(prepared, profile, concurrency, int(nodes) if nodes else None)
    for t in prepared:   # each trial must fit on one node and its batch must split over its processes
        gpus, cpus = _resources(t)
        layout = job_layout(gpus, cpus, profile)
        if layout.nodes > 1:
            raise SubmitError(f"resources.gpus={gpus:g}: a Ray trial runs on one node (gpus_per_node="
                              f"{profile.gpus_per_node}); use --backend slurm for multi-node trials")
        batch_plan(t.config, max(1, int(gpus)), str(t.index))
    tracking_uri, experiment = resolve_tracking(spec, args)
    # The sweep's EDM teacher, when its trials need one not trained yet: the driver trains it (with the
    # profile's trainer settings, as --backend slurm's teacher job does) before Tune starts the trials.
    teacher = plan_teacher(spec, trials, profile, user_overrides, sweep_root, tracking_uri, "")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_dir = sweep_root / RAY_DIR / stamp
    payload = run_dir / "payload.pkl"
    script = render_ray_script(profile, alloc, f"ctm-ray-{sweep}", sweep_root / RAY_DIR, payload, tracking_uri,
                               profile.python)
    submission = Submission(sweep, sweep_root, sweep_root / RAY_DIR, [], None, scripts=[script])
    note = _weights_note([t.config for t in prepared] + ([teacher.trials[0].config] if teacher else []), profile)
    if note:
        print(note, file=out)
    # One allocation per sweep at a time: two would train into the same out_dirs.
    refuse_busy(sweep_root, [t.config.runtime.out_dir for t in prepared], sweep, args, out)
    if _arg(args, "dry_run", False):
        print(f"# dry run: sweep {sweep!r}, {len(prepared)} trial(s) on Ray Tune inside one SLURM allocation "
              f"({alloc.nodes} node(s), {alloc.gpus_per_node} GPU(s)/node, {alloc.cpus_per_node} CPUs/node, "
              f"up to {alloc.concurrency} trials at once; profile {profile.name}); nothing submitted", file=out)
        if teacher:
            print(f"# the EDM teacher {teacher.trials[0].teacher_hash} trains first, in the driver, before the "
                  f"trials start: {teacher.trials[0].config.runtime.out_dir}", file=out)
        print("--- sbatch script ---", file=out)
        print(script, file=out)
        return submission

    move_aside_finished(prepared, tracking_uri, experiment, args, out)
    parent = _arg(args, "parent_run_id") or _create_parent_run(
        tracking_uri, experiment, sweep, len(prepared), "slurm-ray", str(getattr(prepared[0], "budget", "")),
        {"ctmlab.slurm_profile": profile.name, "ctmlab.sweep_root": str(sweep_root)})
    submission.parent_run_id = parent
    run_dir.mkdir(parents=True, exist_ok=True)
    # Plain data where possible (a requeued allocation may start after the checkout's code changed):
    # trials as Trial.to_dict(), the sweep by its file (pickled only when it has none), the teacher's
    # config as a dict. The Tune experiment is this submission's own (a requeue of the allocation
    # restores it; a later launch starts a new one), and the driver rebuilds the sweep's plan with
    # the user's --set items, so its teacher is the one the trials name.
    from ctm_core.config import config_to_dict

    spec_path = getattr(spec, "path", None)
    payload.write_bytes(cloudpickle.dumps({
        "spec_path": str(spec_path) if spec_path else None, "spec": None if spec_path else spec,
        "trials": [t.to_dict() for t in prepared], "tracking_uri": tracking_uri, "experiment": experiment,
        "parent_run_id": parent, "max_concurrent": concurrency, "args": _plain_args(args),
        "overrides": list(user_overrides), "tune_name": f"{RAY_DIR}-{stamp}",
        "teacher": config_to_dict(teacher.trials[0].config) if teacher else None,
    }))
    script_path = run_dir / "job.sh"
    script_path.write_text(script)
    proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused the Ray job: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    for t in prepared:
        submission.jobs.append({"trial_index": int(t.index), "job_id": job_id, "array_job_id": job_id,
                                "variant": str(t.variant), "seed": t.seed, "out_dir": str(t.config.runtime.out_dir),
                                "steps": int(t.config.train.steps), "shared_allocation": True})
    _write_jobs_file(sweep_root, {
        "sweep": sweep, "backend": "slurm-ray", "submitted_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "user": getpass.getuser(), "profile": profile.to_dict(), "tracking_uri": tracking_uri, "experiment": experiment,
        "parent_run_id": parent, "submitit_folder": None, "ray_job_id": job_id, "script": str(script_path),
        "array_job_ids": [job_id], "jobs": submission.jobs,
    })
    print(f"submitted Ray allocation {job_id} for {len(prepared)} trial(s) of {sweep!r}; "
          f"status: python sweeps/launch.py status {sweep}", file=out)
    return submission


def _plain_args(args: Any) -> dict:
    if args is None:
        return {}
    items = vars(args) if hasattr(args, "__dict__") else dict(args)
    return {k: v for k, v in items.items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}


# ----------------------------------------------------------------------------------------------
# The driver (runs inside the allocation)

def drive(payload_path: str | Path) -> int:
    """Run the Tune sweep against the allocation's Ray cluster (RAY_ADDRESS, i.e. address=auto)."""
    import cloudpickle

    payload = cloudpickle.loads(Path(payload_path).read_bytes())
    from sweeps import ray_backend  # the sweeps package's Ray Tune engine
    from sweeps.spec import Trial, load_sweep

    spec = load_sweep(payload["spec_path"]) if payload["spec_path"] else payload["spec"]
    payload["spec"] = spec
    trials = [Trial.from_dict(t) for t in payload["trials"]]
    if payload.get("teacher") is not None:   # the trials wait for it (sweeps.trial.wait_for_teacher)
        try:
            train_teacher(payload["teacher"])
        except Exception as err:  # noqa: BLE001 -- no trial can run: close the parent run, fail the job
            print(f"error: the sweep's teacher failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            finalize_parent_run(payload["tracking_uri"], payload["parent_run_id"], spec.name)
            return 1
    ray_backend.run_sweep_on_ray(
        spec, trials, address="auto", tracking_uri=payload["tracking_uri"],
        experiment=payload["experiment"], parent_run_id=payload["parent_run_id"],
        max_concurrent=payload["max_concurrent"], overrides=tuple(payload.get("overrides", ())),
        name=payload.get("tune_name") or f"{RAY_DIR}-{Path(payload_path).parent.name}",
        extra_tags={"ctmlab.slurm_job_id": os.environ.get("SLURM_JOB_ID", "")})
    status = finalize_parent_run(payload["tracking_uri"], payload["parent_run_id"], payload["spec"].name)
    print(f"sweep {payload['spec'].name}: parent run {payload['parent_run_id']} {status}", flush=True)
    return 0 if status == "FINISHED" else 1


# The batch shell of an N-node allocation carries SLURM_PROCID=0 and SLURM_NTASKS=N, which the trainer
# would read as a DDP group of N processes: the driver's teacher is one process.
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")


def train_teacher(config_data: dict) -> str:
    """Train the sweep's teacher (one process) unless its out_dir holds the last step; a requeued
    allocation resumes it from its newest checkpoint. SLURM's rank variables are hidden meanwhile: the
    driver is one process, not rank 0 of a job-wide DDP group."""
    from ctm_core.config import config_from_dict
    from sweeps.trial import train_teacher_once

    config = config_from_dict(config_data)
    saved = {name: os.environ.pop(name) for name in _RANK_VARS if name in os.environ}
    try:
        train_teacher_once(config, log=lambda line: print(line, flush=True))
    finally:
        os.environ.update(saved)
    return str(config.runtime.out_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.slurm_ray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("drive", help="(inside the allocation) run the Tune sweep of a payload file")
    d.add_argument("payload")
    args = parser.parse_args(argv)
    return drive(args.payload)


if __name__ == "__main__":
    sys.exit(main())
