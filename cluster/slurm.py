"""Submit a sweep's trials to SLURM from a login node, through submitit.

    python sweeps/launch.py NAME --backend slurm --profile v100 [--max-concurrent K] [--dry-run]

The trials of one sweep go out as ONE job array (`--array=0-(n-1)%K`, K from --max-concurrent or
the profile), so the scheduler -- not a process on the login node -- throttles them, and one
`scancel` stops the sweep. A trial asking for g GPUs gets ceil(g / gpus_per_node) nodes and one
task per GPU; each task exports MASTER_ADDR (first node of the allocation) and MASTER_PORT (derived
from the job id, so two jobs sharing a node never collide) and calls `sweeps.trial.run_trial`,
whose trainer joins the DDP group from SLURM_PROCID/SLURM_NTASKS. Only rank 0 reports to MLflow
(the trainer calls callbacks on rank 0 only).

Time limits and preemption: SLURM sends SIGUSR2 `signal_delay_s` before the end; submitit calls
`TrialJob.checkpoint()`, which resubmits the same trial, and requeues the array task. The trainer
resumes from the newest checkpoint in the trial's out_dir, and the MLflow run id travels inside
that checkpoint, so a requeued trial continues its own run (one run per trial in the UI).
The same holds for a job requeued by the admin or by `scontrol requeue`.

Job ids go to <sweep root>/slurm_jobs.json (read by `launch.py status`); submitit's logs and
pickles to <sweep root>/slurm/.
"""
from __future__ import annotations

import dataclasses
import datetime
import getpass
import json
import math
import os
import shlex
import socket
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import submitit
from ctm_core.train import Callback, RunInfo

from .profiles import ClusterProfile, ProfileError, load_profile, split_overrides
from .status import JOBS_FILE, load_job_records, squeue_states, sweep_root_of

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBMITIT_DIR = "slurm"
PORT_BASE, PORT_SPAN = 20000, 30000
DEFAULT_EXPERIMENT = "ctm-lab"


class SubmitError(ValueError):
    """A sweep that cannot run as asked on this profile; the message names the key to change."""


# ----------------------------------------------------------------------------------------------
# Inside the job

def rendezvous_port(job_id: str | int) -> int:
    """A port from the (numeric) SLURM job id: stable across requeues, distinct for jobs sharing a node."""
    return PORT_BASE + int(str(job_id).split("_")[0]) % PORT_SPAN


def export_rendezvous(environ: Optional[dict] = None) -> tuple[str, int]:
    """Set MASTER_ADDR/MASTER_PORT for torch.distributed's env:// rendezvous, from the allocation."""
    environ = os.environ if environ is None else environ
    job_env = submitit.JobEnvironment()
    addr = job_env.hostnames[0]
    port = rendezvous_port(environ.get("SLURM_JOB_ID", job_env.raw_job_id))
    environ["MASTER_ADDR"], environ["MASTER_PORT"] = addr, str(port)
    return addr, port


ATTEMPTS_FILE = "slurm_attempts.jsonl"


class AttemptLog(Callback):
    """Appends one line per start of a trial to <out_dir>/slurm_attempts.jsonl: the job, SLURM's
    restart count and the step the trainer resumed from -- the history `status` shows and that
    tells a requeue that resumed apart from one that started over."""

    def __init__(self, job_id: str):
        self.job_id = job_id

    def on_start(self, run: RunInfo) -> None:
        record = {"time": time.time(), "job_id": self.job_id, "host": socket.gethostname(),
                  "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                  "start_step": int(run.start_step), "world_size": int(run.world_size),
                  "resumed_from": str(run.resumed_from) if run.resumed_from else None}
        Path(run.out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run.out_dir) / ATTEMPTS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


class TrialJob(submitit.helpers.Checkpointable):
    """One trial as a SLURM task's callable; requeued as itself on time-out or preemption.

    Nothing is saved in `checkpoint()`: the trainer checkpoints every `train.ckpt_every` steps and
    resumes from its out_dir, and the MLflow run id is part of that checkpoint. The trial travels as
    plain data (Trial.to_dict), not as pickled config classes, so a job that starts or restarts after
    the checkout's code changed re-validates its config instead of failing to unpickle.
    """

    def __init__(self, trial: Any, tracking_uri: Optional[str], experiment: str, parent_run_id: Optional[str],
                 extra_tags: Optional[Mapping[str, str]] = None):
        self.trial_data = trial.to_dict()
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.extra_tags = dict(extra_tags or {})

    @property
    def trial(self) -> Any:
        from sweeps.spec import Trial

        return Trial.from_dict(self.trial_data)

    def __call__(self) -> dict:
        job_env = submitit.JobEnvironment()
        if job_env.num_tasks > 1:
            export_rendezvous()
        tags = {**self.extra_tags, "ctmlab.slurm_job_id": str(job_env.job_id)}
        from sweeps.trial import run_trial

        return run_trial(self.trial, self.tracking_uri, self.experiment, self.parent_run_id, extra_tags=tags,
                         callbacks=[AttemptLog(str(job_env.job_id))])

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class TeacherJob(submitit.helpers.Checkpointable):
    """Trains the sweep's EDM teacher (every rank); the trial array waits for it (afterok).

    Resumes from the teacher's out_dir when requeued; does nothing when it already holds the last step.
    The config travels as plain data (see TrialJob)."""

    def __init__(self, config: Any):
        from ctm_core.config import config_to_dict

        self.config_data = config_to_dict(config)

    def __call__(self) -> str:
        from ctm_core import checkpoint as ckpt
        from ctm_core.config import config_from_dict
        from ctm_core.train import train

        config = config_from_dict(self.config_data)
        if ckpt.reached_step(config.runtime.out_dir, config.train.steps):
            return str(config.runtime.out_dir)
        if submitit.JobEnvironment().num_tasks > 1:
            export_rendezvous()
        train(config)
        return str(config.runtime.out_dir)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def finalize_parent_run(tracking_uri: Optional[str], parent_run_id: str, sweep: str) -> str:
    """Close the sweep's parent MLflow run once its arrays left the queue: FINISHED if every child did."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=50_000)
    expected = int(parent.data.tags.get("ctmlab.n_trials", len(children)))
    finished = sum(run.info.status == "FINISHED" for run in children)
    status = "FINISHED" if finished >= expected else "FAILED"
    client.set_tag(parent_run_id, "ctmlab.trials_finished", f"{finished}/{expected}")
    client.set_terminated(parent_run_id, status)
    return status


# ----------------------------------------------------------------------------------------------
# Planning: trials -> job layouts

@dataclass(frozen=True)
class JobLayout:
    """How one trial maps onto an allocation: one task per GPU, or one CPU task."""
    nodes: int
    tasks_per_node: int
    gpus_per_node: int      # 0: a CPU trial
    cpus_per_task: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def _resources(trial: Any) -> tuple[float, int]:
    res = getattr(trial, "resources", None)
    if isinstance(res, Mapping):
        gpus, cpus = res.get("gpus", 0), res.get("cpus", 1)
    else:
        gpus, cpus = getattr(res, "gpus", 0), getattr(res, "cpus", 1)
    return float(gpus or 0), max(1, math.ceil(float(cpus or 1)))


def job_layout(gpus: float, cpus: int, profile: ClusterProfile) -> JobLayout:
    """One task per GPU over as few nodes as hold them; a fraction of a GPU gets a whole one here
    (SLURM cannot share a device between jobs: pack fractional trials with --backend slurm-ray)."""
    if gpus < 0:
        raise SubmitError(f"resources.gpus must be >= 0, got {gpus:g}")
    if gpus == 0:
        return JobLayout(1, 1, 0, max(1, cpus))
    if gpus > 1 and gpus != int(gpus):
        raise SubmitError(f"resources.gpus={gpus:g}: SLURM jobs take whole GPUs above one")
    whole = max(1, int(gpus))
    nodes = math.ceil(whole / profile.gpus_per_node)
    if whole % nodes:
        raise SubmitError(f"resources.gpus={whole} cannot be split evenly over {nodes} nodes of "
                          f"cluster.gpus_per_node={profile.gpus_per_node}; use a multiple of {profile.gpus_per_node}")
    per_node = whole // nodes
    return JobLayout(nodes, per_node, per_node, profile.cpus_per_gpu)


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    per_gpu: int
    micro: int
    gan_micro: Optional[int]   # None: the GAN loss is never on in this trial

    @property
    def accumulation(self) -> str:
        """Microbatches per step (before -> with the GAN loss)."""
        text = f"{math.ceil(self.per_gpu / self.micro)}"
        if self.gan_micro:
            text += f"->{math.ceil(self.per_gpu / self.gan_micro)}"
        return text


def batch_plan(config: Any, world_size: int, trial_label: str = "") -> BatchPlan:
    """Per-process batch and microbatches as the trainer will use them (a microbatch is a memory
    ceiling: the last one of a step may be smaller); refuses a global batch the processes cannot share."""
    batch = int(config.data.batch_size)
    where = f" (trial {trial_label})" if trial_label else ""
    if batch % world_size:
        raise SubmitError(f"data.batch_size={batch} is not divisible by the {world_size} processes{where}; "
                          f"use a multiple of {world_size}")
    local = batch // world_size
    gan_on = not config.loss.lambda_gan.is_off and config.mode != "edm"
    micro = min(config.data.micro_batch or local, local)
    gan_micro = min(config.gan.micro_batch or micro, local) if gan_on else None
    return BatchPlan(batch, local, micro, gan_micro)


def _override_keys(overrides: Sequence[str]) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in overrides if "=" in item}


def prepare_config(config: Any, profile: ClusterProfile, protected: set[str] = frozenset(), world_size: int = 1) -> Any:
    """The trainer config as it will run on this profile, with an absolute out_dir.

    The profile's trainer overrides (per-GPU microbatches that fit the GPU's memory, precision)
    apply where the key is not `protected` -- set by the sweep's axes or the user's --set."""
    from ctm_core.config import apply_overrides, config_from_dict, config_to_dict

    items = [item for item in profile.trainer_overrides() if item.split("=", 1)[0] not in protected]
    items.append(f"runtime.out_dir={json.dumps(str(Path(config.runtime.out_dir).absolute()))}")
    return config_from_dict(apply_overrides(config_to_dict(config), items))


def prepare_trial(trial: Any, profile: ClusterProfile, user_overrides: Sequence[str] = (), world_size: int = 1) -> Any:
    """The trial with prepare_config applied (axes and the user's --set keys win over the profile).

    Its config_hash -- the trial's identity, used to skip configs that already FINISHED and to find
    a trial's run again -- is kept: what a profile changes is how the hardware runs the trial
    (microbatches, precision), which the MLflow params still record in full."""
    protected = set(getattr(trial, "axes", {}) or {}) | _override_keys(user_overrides)
    return dataclasses.replace(trial, config=prepare_config(trial.config, profile, protected, world_size))


@dataclass
class ArrayPlan:
    layout: JobLayout
    trials: list
    batches: list
    parameters: dict          # submitit SlurmExecutor parameter names

    @property
    def n(self) -> int:
        return len(self.trials)


def job_setup_lines(profile: ClusterProfile, tracking_uri: Optional[str]) -> list[str]:
    lines = [f"# ctm-lab job setup (profile {profile.name})", *profile.setup]
    for name, value in profile.env.items():
        lines.append(f'export {name}="{value}"')
    lines.append(f'export PYTHONPATH={shlex.quote(str(REPO_ROOT))}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    if tracking_uri:
        lines.append(f"export MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)}")
    return lines


def slurm_parameters(profile: ClusterProfile, layout: JobLayout, job_name: str, parallelism: int,
                     setup: Sequence[str]) -> dict[str, Any]:
    """sbatch parameters in submitit's SlurmExecutor names (the keys of `_make_sbatch_string`)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": profile.time_limit_min,
        "nodes": layout.nodes,
        "ntasks_per_node": layout.tasks_per_node,
        "cpus_per_task": layout.cpus_per_task,
        "signal_delay_s": profile.signal_delay_s,
        "array_parallelism": parallelism,
        "setup": list(setup),
        "additional_parameters": {"requeue": True, **dict(profile.sbatch_extra)},
    }
    if layout.gpus_per_node:
        params["gpus_per_node"] = layout.gpus_per_node
        if profile.mem_per_gpu:
            params["mem_per_gpu"] = profile.mem_per_gpu
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(profile, key)
        if value:
            params[key] = value
    return params


def plan_arrays(trials: Sequence[Any], profile: ClusterProfile, parallelism: int, tracking_uri: Optional[str],
                job_name: str, user_overrides: Sequence[str] = ()) -> list[ArrayPlan]:
    """Trials (prepared for the profile) grouped by layout -- normally one group: one job array each."""
    groups: "OrderedDict[JobLayout, list]" = OrderedDict()
    for trial in trials:
        gpus, cpus = _resources(trial)
        layout = job_layout(gpus, cpus, profile)
        groups.setdefault(layout, []).append(prepare_trial(trial, profile, user_overrides, layout.world_size))
    setup = job_setup_lines(profile, tracking_uri)
    plans = []
    for layout, members in groups.items():
        batches = [batch_plan(t.config, layout.world_size, str(getattr(t, "index", "?"))) for t in members]
        params = slurm_parameters(profile, layout, job_name, min(parallelism, len(members)), setup)
        plans.append(ArrayPlan(layout, members, batches, params))
    return plans


@dataclass(frozen=True)
class TeacherWork:
    """The sweep's teacher as a unit of work (shaped like a trial for planning and printing)."""
    config: Any
    teacher_hash: str
    estimated_gpu_hours: Optional[float] = None
    index: str = "teacher"
    seed: int = 0

    @property
    def variant(self) -> str:
        return f"edm teacher {self.teacher_hash}"


def plan_teacher(spec: Any, trials: Sequence[Any], profile: ClusterProfile, user_overrides: Sequence[str],
                 sweep_root: Path, tracking_uri: Optional[str], job_name: str) -> Optional[ArrayPlan]:
    """A job for the sweep's EDM teacher when its trials need one that is not trained yet (else None)."""
    if not hasattr(spec, "plan") or not any(getattr(t, "teacher_hash", None) for t in trials):
        return None
    from sweeps.trial import teacher_is_trained

    plan = spec.plan(getattr(trials[0], "budget", "smoke"), [o for o in user_overrides], sweep_root)
    config = plan.teacher_config
    if config is None or teacher_is_trained(plan):
        return None
    res = plan.teacher_resources
    layout = job_layout(float(res.gpus), max(1, math.ceil(res.cpus)), profile)
    ready = prepare_config(config, profile, _override_keys(user_overrides), layout.world_size)
    work = TeacherWork(ready, plan.teacher_hash, plan.teacher_estimate_hours()[1])
    bp = batch_plan(ready, layout.world_size, "teacher")
    params = slurm_parameters(profile, layout, job_name, 1, job_setup_lines(profile, tracking_uri))
    return ArrayPlan(layout, [work], [bp], params)


def _depend_on(plan: ArrayPlan, job_id: str) -> None:
    plan.parameters["dependency"] = f"afterok:{job_id}"
    plan.parameters["additional_parameters"] = {**plan.parameters["additional_parameters"],
                                                "kill-on-invalid-dep": "yes"}   # teacher failed: drop the array


def required_weights(config: Any) -> list[str]:
    """Pretrained files (ctm_core.pretrained names) a trial will load: compute nodes cannot download."""
    from ctm_core.data import parse_data_spec

    kind = parse_data_spec(config.data.spec).kind
    names = []
    if config.mode != "edm" and config.ctm.distance == "lpips":
        names.append("vgg16_lpips")
    gan_on = config.mode != "edm" and not config.loss.lambda_gan.is_off
    if gan_on and (config.gan.discriminator == "projected" or (config.gan.discriminator == "auto" and kind != "toy")):
        names += ["tf_efficientnet_lite0", "deit_base_distilled_patch16_224"]
    if kind in ("cifar10", "folder") and config.eval.inception is None:
        names.append("inception_fid")
    return names


def missing_weights(configs: Sequence[Any], profile: ClusterProfile) -> dict[str, Path]:
    """{name: expected path} of needed weights absent from the cache the jobs will read
    (runtime.cache_dir, else the profile's CTM_LAB_CACHE, else this shell's)."""
    from ctm_core.pretrained import weights_path

    missing: dict[str, Path] = {}
    for config in configs:
        cache = config.runtime.cache_dir or (os.path.expandvars(profile.env["CTM_LAB_CACHE"])
                                             if "CTM_LAB_CACHE" in profile.env else None)
        for name in required_weights(config):
            path = weights_path(name, cache)
            if not path.is_file():
                missing[name] = path
    return missing


def _weights_note(configs: Sequence[Any], profile: ClusterProfile) -> Optional[str]:
    missing = missing_weights(configs, profile)
    if not missing:
        return None
    where = ", ".join(f"{n} ({p})" for n, p in missing.items())
    return (f"# WARNING: compute nodes have no internet and these weights are not in the cache: {where}. "
            f"On the login node run: python -m cluster.prefetch --only {' '.join(missing)}"
            + (f" --cache-dir {os.path.dirname(next(iter(missing.values())))}" if missing else ""))


# ----------------------------------------------------------------------------------------------
# Rendering (dry run) and submission

def submitit_command(folder: Path, python: Optional[str] = None) -> str:
    return f"{python or shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def render_sbatch(plan: ArrayPlan, folder: Path, python: Optional[str] = None) -> str:
    """The sbatch script submitit writes for this array (same function submitit itself uses)."""
    from submitit.slurm.slurm import _make_sbatch_string

    map_count = plan.n if plan.n > 1 else None
    return _make_sbatch_string(command=submitit_command(folder, python), folder=folder, map_count=map_count,
                               **plan.parameters)


def describe_plan(plan: ArrayPlan, profile: ClusterProfile, index: int, total: int, sweep: str) -> str:
    lay = plan.layout
    k = plan.parameters["array_parallelism"]
    what = f"job array of {plan.n} trials, at most {k} at once" if plan.n > 1 else \
        f"single job ({'the teacher' if isinstance(plan.trials[0], TeacherWork) else '1 trial'})"
    res = (f"{lay.nodes} node(s) x {lay.tasks_per_node} task(s), {lay.gpus} GPU(s) ({lay.gpus_per_node}/node), "
           f"{lay.cpus_per_task} CPUs/task" if lay.gpus else f"1 task, no GPU, {lay.cpus_per_task} CPUs")
    if lay.gpus and profile.mem_per_gpu:
        res += f", {profile.mem_per_gpu}/GPU"
    lines = [
        f"== {sweep}: job {index}/{total}: {what} (profile {profile.name}) ==",
        f"per trial: {res}; time limit {profile.time_limit} ({profile.time_limit_min} min); "
        f"requeued on time-out/preemption (up to {profile.max_requeues} time-outs)",
    ]
    header = ("trial", "variant", "seed", "gpus", "batch", "batch/GPU", "micro/GPU", "GAN micro/GPU", "micro/step",
              "est GPU-h")
    rows = []
    for trial, bp in zip(plan.trials, plan.batches):
        est = getattr(trial, "estimated_gpu_hours", None)
        rows.append((str(getattr(trial, "index", "?")), str(getattr(trial, "variant", "")) or "-",
                     str(getattr(trial, "seed", "-")), str(lay.gpus), str(bp.global_batch), str(bp.per_gpu),
                     str(bp.micro), str(bp.gan_micro) if bp.gan_micro else "-", bp.accumulation,
                     f"{est:.3g}" if isinstance(est, (int, float)) else "-"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    over = [t for t in plan.trials if isinstance(getattr(t, "estimated_gpu_hours", None), (int, float))
            and lay.gpus and t.estimated_gpu_hours / lay.gpus * 60 > profile.time_limit_min]
    if over:
        lines.append(f"note: {len(over)} trial(s) need longer than the time limit; they will be requeued and resume")
    return "\n".join(lines)


@dataclass
class Submission:
    sweep: str
    sweep_root: Path
    folder: Path
    jobs: list           # [{"trial_index", "job_id", "array_job_id", ...}]
    parent_run_id: Optional[str]
    finalize_job_id: Optional[str] = None
    teacher_job_id: Optional[str] = None
    scripts: list = dataclasses.field(default_factory=list)   # rendered sbatch texts

    @property
    def job_ids(self) -> list[str]:
        return [job["job_id"] for job in self.jobs]


def submission_inputs(spec: Any, trials: Sequence[Any], args: Any) -> tuple[Any, list[str], str]:
    """(profile, the user's non-cluster --set items, sweep name): what every SLURM backend starts from."""
    if not trials:
        raise SubmitError("the sweep produced no trials")
    profile = profile_from_args(args)
    _, user_overrides = split_overrides(_arg(args, "overrides", []))
    return profile, user_overrides, str(getattr(spec, "name", None) or getattr(trials[0], "sweep"))


def _arg(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default) if args is not None else default
    return default if value is None else value


def profile_from_args(args: Any) -> ClusterProfile:
    source = _arg(args, "profile") or os.environ.get("CTM_LAB_PROFILE")
    if not source:
        raise ProfileError("--profile is required for the SLURM backends (a name in cluster/profiles, "
                           "e.g. v100 or a100, or a YAML path); or set CTM_LAB_PROFILE")
    cluster_overrides, _ = split_overrides(_arg(args, "overrides", []))
    return load_profile(source, cluster_overrides)


def _create_parent_run(tracking_uri: str, experiment: str, sweep: str, n_trials: int, backend: str,
                       budget: str, extra: Mapping[str, str]) -> str:
    """One parent run per launch, tagged per the MLflow schema; the trials become its children."""
    from sweeps.tracking import ensure_experiment, start_parent_run

    experiment_id = ensure_experiment(tracking_uri, experiment)
    tags = {"ctmlab.backend": backend, "ctmlab.n_trials": str(n_trials), **extra}
    return start_parent_run(tracking_uri, experiment_id, sweep, budget, f"{sweep} [{budget}, {backend}]",
                            {"n_trials": n_trials, "backend": backend}, tags)


def resolve_tracking(spec: Any, args: Any) -> tuple[str, str]:
    """(tracking URI, experiment): --tracking-uri > $MLFLOW_TRACKING_URI > the sweep file > ./mlflow.db."""
    from sweeps.tracking import resolve_tracking_uri

    tracking = getattr(spec, "tracking", None) or {}
    uri = resolve_tracking_uri(_arg(args, "tracking_uri"), tracking.get("uri"))
    return uri, _arg(args, "experiment") or tracking.get("experiment") or DEFAULT_EXPERIMENT


ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def active_jobs_for(sweep_root: Path, out_dirs: Sequence[str]) -> dict[str, str]:
    """{out_dir: job id} of trials that an earlier submission still has queued or running: submitting
    them again would let two jobs train into one out_dir."""
    records, _ = load_job_records(sweep_root)
    wanted = {str(Path(d).absolute()) for d in out_dirs}
    mine = {r["job_id"]: str(Path(r["out_dir"]).absolute()) for r in records.values()
            if r.get("job_id") and str(Path(r.get("out_dir", "")).absolute()) in wanted}
    live = squeue_states(mine) if mine else {}
    return {mine[j]: j for j, state in live.items() if j in mine and state.split()[0] in ACTIVE_STATES}


def refuse_busy(sweep_root: Path, out_dirs: Sequence[str], sweep: str, args: Any, out) -> None:
    """Refuse (a warning in a dry run) trials whose out_dir an earlier submission still trains into."""
    busy = active_jobs_for(sweep_root, out_dirs)
    if not busy:
        return
    listing = ", ".join(f"job {j} ({Path(d).name})" for d, j in busy.items())
    message = (f"{len(busy)} trial(s) of {sweep!r} are still queued or running from an earlier submission: "
               f"{listing}; wait for them or scancel them first (python sweeps/launch.py status {sweep})")
    if not _arg(args, "dry_run", False):
        raise SubmitError(message)
    print(f"# WARNING: {message}", file=out)


def move_aside_finished(trials: Sequence[Any], tracking_uri: str, experiment: str, args: Any, out) -> list[Path]:
    """The local backend's rule before a launch (sweeps.trial.move_aside_stale), on a real submission.
    Left in place, a job would resume at the last step, train nothing and re-attach the old MLflow run
    to this launch. Call it only after refuse_busy (no job of an earlier submission may still write there)."""
    from sweeps.trial import move_aside_stale

    if _arg(args, "dry_run", False):
        return []
    finished: dict = {}
    existing = [t for t in trials if Path(t.config.runtime.out_dir).exists()]
    if _arg(args, "force", False) and existing:
        from sweeps.tracking import ensure_experiment, finished_runs

        finished = finished_runs(tracking_uri, ensure_experiment(tracking_uri, experiment),
                                 [t.config_hash for t in existing])
    stamp = f"{getattr(trials[0], 'budget', '')}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}".lstrip("-")
    return move_aside_stale(existing, finished, stamp, out)


def _write_jobs_file(sweep_root: Path, record: dict) -> Path:
    path = sweep_root / JOBS_FILE
    data = json.loads(path.read_text()) if path.is_file() else {"sweep": record["sweep"], "submissions": []}
    data["submissions"].append(record)
    sweep_root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _generic_and_slurm(params: Mapping[str, Any]) -> dict[str, Any]:
    """submitit.AutoExecutor wants its generic names where they exist, `slurm_` + name elsewhere."""
    generic = {"time": "timeout_min", "nodes": "nodes", "ntasks_per_node": "tasks_per_node",
               "cpus_per_task": "cpus_per_task", "gpus_per_node": "gpus_per_node", "job_name": "name"}
    return {generic.get(k, f"slurm_{k}"): v for k, v in params.items()}


def submit_sweep(spec: Any, trials: Sequence[Any], args: Any = None, *, out=None) -> Submission:
    """Submit (or with args.dry_run, print) the sweep's trials as SLURM job arrays.

    args (argparse namespace or any object) may carry: profile, overrides (--set items; the
    `cluster.` ones adjust the profile), max_concurrent, dry_run, tracking_uri, experiment,
    parent_run_id, budget.
    """
    out = out or sys.stdout
    profile, user_overrides, sweep = submission_inputs(spec, trials, args)
    sweep_root = sweep_root_of(spec, trials, sweep).absolute()
    folder = sweep_root / SUBMITIT_DIR
    parallelism = int(_arg(args, "max_concurrent", profile.array_parallelism))
    if parallelism < 1:
        raise SubmitError(f"--max-concurrent must be >= 1, got {parallelism}")
    tracking_uri, experiment = resolve_tracking(spec, args)
    plans = plan_arrays(trials, profile, parallelism, tracking_uri, f"ctm-{sweep}", user_overrides)
    prepared = [t for plan in plans for t in plan.trials]
    teacher = plan_teacher(spec, trials, profile, user_overrides, sweep_root, tracking_uri, f"ctm-{sweep}-teacher")
    python = profile.python
    submission = Submission(sweep, sweep_root, folder, [], None)
    note = _weights_note([t.config for t in prepared] + ([teacher.trials[0].config] if teacher else []), profile)
    if note:
        print(note, file=out)
    if all(plan.layout.gpus == 0 for plan in plans):
        budget = getattr(prepared[0], "budget", None)
        print(f"# note: these trials ask for no GPU{f' (budget {budget})' if budget else ''} and run as CPU tasks on "
              f"{profile.name} nodes; the GPU setting is usually another budget (e.g. --budget paper)", file=out)
    refuse_busy(sweep_root, [t.config.runtime.out_dir for t in prepared], sweep, args, out)
    move_aside_finished(prepared, tracking_uri, experiment, args, out)

    if _arg(args, "dry_run", False):
        jobs = ([teacher] if teacher else []) + plans
        print(f"# dry run: {len(prepared)} trial(s) of sweep {sweep!r} -> {len(jobs)} SLURM job(s)"
              f"{' (the EDM teacher first, the trials after it)' if teacher else ''}; nothing submitted", file=out)
        print(f"# tracking: {tracking_uri}, experiment {experiment!r}; submitit folder {folder}", file=out)
        for plan in plans:
            if teacher:
                _depend_on(plan, "<teacher job id>")
        for i, plan in enumerate(jobs, 1):
            script = render_sbatch(plan, folder, python)
            submission.scripts.append(script)
            print(describe_plan(plan, profile, i, len(jobs), sweep), file=out)
            print("--- sbatch script ---", file=out)
            print(script, file=out)
        return submission

    if not (tracking_uri or "").startswith(("http://", "https://")):
        print("# note: jobs write the tracking store directly; for many concurrent trials start a server "
              "(cluster/mlflow_server.sh) and use MLFLOW_TRACKING_URI=http://...", file=out)
    parent = _arg(args, "parent_run_id") or _create_parent_run(
        tracking_uri, experiment, sweep, len(prepared), "slurm", str(getattr(prepared[0], "budget", "")),
        {"ctmlab.slurm_profile": profile.name, "ctmlab.sweep_root": str(sweep_root)})
    submission.parent_run_id = parent
    folder.mkdir(parents=True, exist_ok=True)
    teacher_id = None
    if teacher is not None:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=profile.max_requeues,
                                         slurm_python=python)
        executor.update_parameters(**_generic_and_slurm(teacher.parameters))
        teacher_id = str(executor.submit(TeacherJob(teacher.trials[0].config)).job_id)
        submission.scripts.append(render_sbatch(teacher, folder, python))
        print(f"teacher {teacher.trials[0].teacher_hash}: job {teacher_id} -> {teacher.trials[0].config.runtime.out_dir}",
              file=out)
    array_ids = []
    for plan in plans:
        if teacher_id:
            _depend_on(plan, teacher_id)
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=profile.max_requeues,
                                         slurm_python=python)
        executor.update_parameters(**_generic_and_slurm(plan.parameters))
        callables = [TrialJob(t, tracking_uri, experiment, parent) for t in plan.trials]
        with executor.batch():
            jobs = [executor.submit(c) for c in callables]
        for trial, bp, job in zip(plan.trials, plan.batches, jobs):
            submission.jobs.append({
                "trial_index": int(getattr(trial, "index", len(submission.jobs))),
                "job_id": str(job.job_id), "array_job_id": str(job.job_id).split("_")[0],
                "variant": str(getattr(trial, "variant", "")), "seed": getattr(trial, "seed", None),
                "out_dir": str(trial.config.runtime.out_dir), "steps": int(trial.config.train.steps),
                "gpus": plan.layout.gpus, "per_gpu_batch": bp.per_gpu,
            })
        array_ids.append(str(jobs[0].job_id).split("_")[0])
        submission.scripts.append(render_sbatch(plan, folder, python))
    submission.teacher_job_id = teacher_id
    submission.finalize_job_id = _submit_finalizer(folder, profile, array_ids, tracking_uri, parent, sweep, python)
    _write_jobs_file(sweep_root, {
        "sweep": sweep, "backend": "slurm", "submitted_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "user": getpass.getuser(), "profile": profile.to_dict(), "tracking_uri": tracking_uri,
        "experiment": experiment, "parent_run_id": parent, "submitit_folder": str(folder),
        "array_job_ids": array_ids, "finalize_job_id": submission.finalize_job_id, "teacher_job_id": teacher_id,
        "jobs": submission.jobs,
    })
    limit = f" (at most {min(parallelism, len(submission.jobs))} at once)" if len(submission.jobs) > 1 else ""
    print(f"submitted {len(submission.jobs)} trial(s) of {sweep!r} as job(s) {', '.join(array_ids)}{limit}; "
          f"status: python sweeps/launch.py status {sweep}", file=out)
    return submission


def _submit_finalizer(folder: Path, profile: ClusterProfile, array_ids: Sequence[str], tracking_uri: Optional[str],
                      parent_run_id: str, sweep: str, python: Optional[str]) -> str:
    """A 1-CPU job that closes the parent run after every array left the queue (afterany)."""
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_python=python)
    params: dict[str, Any] = {"name": f"ctm-{sweep}-finalize", "timeout_min": 10, "nodes": 1, "tasks_per_node": 1,
                              "cpus_per_task": 1, "slurm_dependency": "afterany:" + ":".join(array_ids),
                              "slurm_setup": job_setup_lines(profile, tracking_uri),
                              "slurm_signal_delay_s": 30}
    for key in ("partition", "account", "qos"):
        if getattr(profile, key):
            params[f"slurm_{key}"] = getattr(profile, key)
    executor.update_parameters(**params)
    return str(executor.submit(finalize_parent_run, tracking_uri, parent_run_id, sweep).job_id)
