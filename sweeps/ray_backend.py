"""Ray Tune backend: the trainer as a function trainable, one Tune experiment per sweep launch.

- Local (default): the launcher starts Ray itself (`ray.init(num_cpus=...)`, no dashboard, a temp
  dir of its own under the sweep root so two users on one machine do not collide); `ray://ADDR`
  attaches to a running cluster (the sweep root must then be on storage every node sees).
- A trial reports the trainer's metrics (eval results as they come, training losses at most every
  `REPORT_EVERY_S`) through `ray.tune.report`, with a Tune checkpoint at every trainer checkpoint.
  The Tune checkpoint is a *pointer* (step and path of the trainer's own atomic checkpoint in the
  trial's out_dir), so nothing large is copied; a restored trial resumes from its out_dir.
- `--resume` = `Tuner.restore`: finished trials stay finished, unfinished ones run again and the
  trainer continues from its newest checkpoint, the MLflow callback from the run id in it.
- Whole-GPU trials (gpus >= 2) run one DDP process per GPU (torch.multiprocessing, rank 0 reports).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctm_core.train import Callback, RunInfo, TrainResult

from .spec import SweepPlan, Trial
from .trial import out_dir_lock, run_trial, wait_for_teacher

REPORT_EVERY_S = 30.0
POINTER_FILE = "trainer_checkpoint.json"
POINTER_FOLDER = ".tune_pointer"  # in a trial's out_dir: the folder reported to Tune as its checkpoint
# Unix sockets live under Ray's temp dir; their paths must stay below 108 bytes.
_MAX_TEMP_DIR = 40  # + "/session_<date>_<time>_<pid>/sockets/plasma_store" (~65)


# ----------------------------------------------------------------------------------------------
# What the workers need (pickled once into the object store by tune.with_parameters)


@dataclass
class SweepContext:
    plan: SweepPlan
    trials: dict[str, Trial]                  # config hash -> trial (grid sweeps)
    tracking_uri: str
    experiment: str
    parent_run_id: str
    force: bool = False
    threads: int = 1
    env: dict[str, str] = field(default_factory=dict)
    extra_tags: dict[str, str] = field(default_factory=dict)

    def trial_for(self, config: dict[str, Any], trial_id: str) -> Trial:
        if "trial" in config:
            return self.trials[config["trial"]]
        axes = {path: config[path] for path in self.plan.axes}
        tail = trial_id.rsplit("_", 1)[-1]  # grid ids end in _00003; searchers' ids are random hex
        index = int(tail) if tail.isdigit() else int(hashlib.sha1(trial_id.encode()).hexdigest()[:6], 16)
        return self.plan.make_trial(axes, self.plan.seeds[0], index)


# ----------------------------------------------------------------------------------------------
# Reporting from inside a trial


def _numeric(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _report_to_tune(payload: dict[str, Any], checkpoint_path: Path | None, out_dir: Path) -> None:
    """`tune.report`, with a small Tune checkpoint naming the trainer checkpoint when there is one.

    The trainer resumes from out_dir itself; Tune only needs the pointer. Tune copies the pointer's
    folder into its storage inside `report`. The folder lives in out_dir and is rewritten at each
    report: a temporary folder was left behind in /tmp whenever a SIGKILL landed inside `report`.
    """
    from ray import tune
    from ray.tune import Checkpoint

    if checkpoint_path is None:
        tune.report(payload)
        return
    folder = out_dir / POINTER_FOLDER
    folder.mkdir(exist_ok=True)
    (folder / POINTER_FILE).write_text(json.dumps(
        {"step": payload["step"], "path": str(checkpoint_path), "out_dir": str(out_dir)}))
    tune.report(payload, checkpoint=Checkpoint.from_directory(folder))


class TuneReporter(Callback):
    """Trainer -> Tune: merged latest metrics on evaluations and checkpoints (plus a heartbeat)."""

    def __init__(self, trial: Trial, sink=None, metric: str | None = None):
        self.trial = trial
        self.metric = metric                # reports wait until it exists (searchers read it from each one)
        self.latest: dict[str, Any] = {}
        self.last_report = 0.0
        self.mlflow_run_id: str | None = None
        self._sink = sink                   # None: tune.report directly; else a queue (DDP rank 0)

    def bind(self, tracker) -> None:
        self._tracker = tracker

    def _report(self, step: int, checkpoint_path: Path | None = None) -> None:
        if self.metric and self.metric not in self.latest:
            return  # nothing Tune can rank yet (the trainer resumes from out_dir without Tune's checkpoint)
        tracker = getattr(self, "_tracker", None)
        payload = {**_numeric(self.latest), "step": step,
                   "mlflow_run_id": getattr(tracker, "run_id", None) or "", "config_hash": self.trial.config_hash}
        self.last_report = time.monotonic()
        if self._sink is not None:
            self._sink.put(("report", payload, None if checkpoint_path is None else str(checkpoint_path)))
            return
        _report_to_tune(payload, checkpoint_path, self.trial.out_dir)

    def on_start(self, run: RunInfo) -> None:
        self.latest["start_step"] = run.start_step

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.latest.update(metrics)
        if any(k.startswith("eval/") for k in metrics) or time.monotonic() - self.last_report > REPORT_EVERY_S:
            self._report(step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._report(step, path)

    def on_end(self, result: TrainResult) -> None:
        self.latest.update(result.metrics)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, ctx: SweepContext, trial: Trial, tags: dict, sink) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch

    torch.set_num_threads(ctx.threads)
    reporter = TuneReporter(trial, sink, ctx.plan.metric) if rank == 0 else None
    result = run_trial(trial, ctx.tracking_uri, ctx.experiment, ctx.parent_run_id, tags,
                       [reporter] if reporter else [])
    if rank == 0:
        sink.put(("done", _numeric(result), None))


def _run_ddp(ctx: SweepContext, trial: Trial, tags: dict) -> dict[str, Any]:
    """One process per GPU; rank 0's reports are forwarded to Tune from this (the trial's) thread."""
    import torch.multiprocessing as mp

    mpc = mp.get_context("spawn")
    sink = mpc.Queue()
    world = trial.resources.processes
    procs = mp.start_processes(_ddp_worker, args=(world, _free_port(), ctx, trial, tags, sink), nprocs=world,
                               join=False, start_method="spawn")
    final: dict[str, Any] = {}
    try:
        while True:
            try:
                kind, payload, path = sink.get(timeout=1.0)
            except queue.Empty:
                if procs.join(timeout=0):
                    break
                continue
            if kind == "done":
                final = payload
                continue
            _report_to_tune(payload, Path(path) if path else None, trial.out_dir)
        while not procs.join():
            pass
    finally:  # Tune stopping the trial raises out of tune.report: the ranks must not train on
        _stop_processes(procs.processes)
    return final


def _stop_processes(processes, grace_s: float = 10.0) -> None:
    """Terminate and reap processes still running (SIGKILL for those that ignore SIGTERM)."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _finished_run(ctx: SweepContext, trial: Trial):
    """A FINISHED MLflow run that makes training this trial again pointless, else None.

    Tune persists its experiment state only every few seconds, so after a driver crash a trial that
    had finished may come back as unfinished; its run under this launch's parent says it is done.
    Without --force, a FINISHED run of the same config anywhere in the experiment counts too.
    """
    from .tracking import PARENT_TAG, ensure_experiment, finished_runs

    experiment_id = ensure_experiment(ctx.tracking_uri, ctx.experiment)
    run = finished_runs(ctx.tracking_uri, experiment_id, [trial.config_hash]).get(trial.config_hash)
    if run is None:
        return None
    if ctx.force and run.data.tags.get(PARENT_TAG) != ctx.parent_run_id:
        return None
    return run


def trainable(config: dict[str, Any], ctx: SweepContext) -> None:
    """The Tune function trainable: one trial = run_trial (+ a final report)."""
    import torch
    from ray import tune

    os.environ.update(ctx.env)
    torch.set_num_threads(ctx.threads)
    trial_id = tune.get_context().get_trial_id() or ""
    trial = ctx.trial_for(config, trial_id)
    tags = {**ctx.extra_tags, "ctmlab.ray_trial_id": trial_id}
    # Two equal samples of a search share an out dir and a run: one trains, the other then finds it FINISHED.
    with out_dir_lock(trial.out_dir):
        _run_or_reuse(ctx, trial, tags)


def _run_or_reuse(ctx: SweepContext, trial: Trial, tags: dict[str, str]) -> None:
    """Report the trial's FINISHED run if it has one, else train it (the out-dir lock is held)."""
    from ray import tune

    done = _finished_run(ctx, trial)
    if done is not None:  # finished in this launch before a crash of the driver, or (a search) sampled twice
        from .tracking import PARENT_TAG, ensure_experiment, record_reused

        if ctx.parent_run_id and done.data.tags.get(PARENT_TAG) != ctx.parent_run_id:  # an earlier launch's run
            record_reused(ctx.tracking_uri, ensure_experiment(ctx.tracking_uri, ctx.experiment), ctx.parent_run_id,
                          [trial], {trial.config_hash: done})
        tune.report({**done.data.metrics, "step": trial.config.train.steps, "mlflow_run_id": done.info.run_id,
                     "config_hash": trial.config_hash, "skipped": 1})
        return
    import torch._dynamo  # noqa: F401 -- torch.optim imports it at the first optimiser (~2 s): pay it while waiting
    wait_for_teacher(ctx.plan)  # the launcher may still be training it (trial start-up overlaps it)
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            pointer = json.loads((Path(folder) / POINTER_FILE).read_text())
        print(f"[{trial.name}] Tune restored the trial at step {pointer['step']}; the trainer resumes from "
              f"{trial.out_dir}")
    if trial.resources.processes > 1:
        final = _run_ddp(ctx, trial, tags)
    else:
        reporter = TuneReporter(trial, metric=ctx.plan.metric)
        result = run_trial(trial, ctx.tracking_uri, ctx.experiment, ctx.parent_run_id, tags, [reporter])
        final = _numeric(result)
    tune.report({**final, "config_hash": trial.config_hash})


# ----------------------------------------------------------------------------------------------
# The driver side


class _MlflowStatusCallback:
    """Tune driver hook: a trial Tune ended without the trainer ending it (stopped early by ASHA,
    errored past max_failures) must not stay RUNNING in MLflow."""

    def __new__(cls, *args, **kwargs):
        from ray.tune import Callback as TuneCallback

        class Impl(TuneCallback):
            def __init__(self, uri: str):
                self.uri = uri

            def _close(self, trial, status: str, why: str) -> None:
                run_id = (trial.last_result or {}).get("mlflow_run_id")
                if not run_id:
                    return
                from .tracking import client, log_params_and_tags, retry, set_status

                try:
                    run = retry(lambda: client(self.uri).get_run(run_id))
                    if run.info.status == "RUNNING":
                        log_params_and_tags(self.uri, run_id, {}, {"ctmlab.stopped_by": why})
                        set_status(self.uri, run_id, status)
                except Exception as err:  # noqa: BLE001
                    print(f"warning: could not close MLflow run {run_id}: {err}")

            def on_trial_complete(self, iteration, trials, trial, **info):
                # The run is still RUNNING only when Tune ended the trial early (the scheduler's decision).
                self._close(trial, "KILLED", "scheduler")

            def on_trial_error(self, iteration, trials, trial, **info):
                self._close(trial, "FAILED", "error")

        return Impl(*args, **kwargs)


def ray_temp_dir(root: Path) -> str:
    """Ray's session folder under the sweep root, or a short private /tmp folder when that path is too long."""
    wanted = root / ".ray"
    if len(str(wanted)) <= _MAX_TEMP_DIR:
        wanted.mkdir(parents=True, exist_ok=True)
        return str(wanted)
    import hashlib

    short = Path(tempfile.gettempdir()) / f"ray-{os.getuid()}-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"
    short.mkdir(parents=True, exist_ok=True)
    return str(short)


def start_ray(address: str | None, root: Path, num_cpus: int | None, num_gpus: int | None, env: dict[str, str]) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.update(env)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private single-user instance
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _temp_dir=ray_temp_dir(root),
             log_to_driver=True, configure_logging=True, logging_level="WARNING")


def stop_ray() -> None:
    """ray.shutdown(), less the second it stalls on a local instance.

    Ray stops the processes it started one type after another, the GCS before the autoscaler monitor.
    The monitor's SIGTERM handler then reports its termination to the GCS that is gone and hangs until
    Ray falls back to SIGKILL a second later. A single-node instance's monitor has nothing to save, so
    it is killed first. The process handles are Ray's private state: if they move, only the stall is back.
    """
    import ray

    kill_autoscaler_monitor()
    ray.shutdown()


def kill_autoscaler_monitor() -> bool:
    """SIGKILL the monitor of the Ray instance this process started; False if there is none."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # None when attached to a cluster
    monitors = getattr(node, "all_processes", {}).get("monitor", [])
    for info in monitors:
        info.process.kill()
        info.process.wait()
    return bool(monitors)


def _pre_drawn(plan: SweepPlan) -> bool:
    """Trials fixed before the launch (a grid, or a random search's seeded samples), not picked by a searcher."""
    return plan.search is None or plan.search.algo == "random"


def _num_samples(plan: SweepPlan) -> int:
    """Tune's num_samples repeats the whole param space: 1 over a grid of pre-drawn trials."""
    return 1 if _pre_drawn(plan) else plan.search.num_samples


def _param_space(plan: SweepPlan, trials: list[Trial]) -> dict[str, Any]:
    from ray import tune

    if _pre_drawn(plan):  # random search too: exactly the seeded points the dry run showed
        return {"trial": tune.grid_search([t.config_hash for t in trials])}
    space: dict[str, Any] = {}
    for path, axis in plan.axes.items():
        if axis.kind == "choice":
            space[path] = tune.choice(list(axis.values))
        elif axis.kind == "uniform":
            space[path] = tune.uniform(axis.low, axis.high)
        else:
            space[path] = tune.loguniform(axis.low, axis.high)
    return space


def _trial_dirname(trial) -> str:
    cfg = trial.config
    name = cfg.get("trial") or "_".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else
                                        f"{k.rsplit('.', 1)[-1]}={v}" for k, v in cfg.items())
    return f"{trial.trial_id}-{name}"[:80]


def _wrapped_trainable(ctx: SweepContext):
    from ray import tune

    res = ctx.plan.resources
    return tune.with_resources(tune.with_parameters(trainable, ctx=ctx), {"cpu": res.cpus, "gpu": res.gpus})


def run_tune(ctx: SweepContext, trials: list[Trial], storage: Path, name: str, resume: bool,
             max_concurrent: int | None):
    """Run (or restore) the Tune experiment `storage/name`; returns Tune's ResultGrid."""
    from ray import tune

    plan = ctx.plan
    path = storage / name
    trainable_ = _wrapped_trainable(ctx)
    if resume and (path / "tuner.pkl").exists():
        tuner = tune.Tuner.restore(str(path), trainable=trainable_, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    scheduler = search_alg = None
    if plan.scheduler is not None:
        from ray.tune.schedulers import ASHAScheduler

        steps = max(t.config.train.steps for t in trials) if trials else 1
        # stop_last_trials=False: a trial that reaches max_t ends by itself (its run then FINISHES).
        scheduler = ASHAScheduler(time_attr="step", max_t=plan.scheduler.max_t or steps,
                                  grace_period=plan.scheduler.grace_period,
                                  reduction_factor=plan.scheduler.reduction_factor, stop_last_trials=False)
    if plan.search is not None and plan.search.algo == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=plan.search.seed)
    tune_config = tune.TuneConfig(
        metric=plan.metric, mode=plan.mode, scheduler=scheduler, search_alg=search_alg,
        num_samples=_num_samples(plan),
        max_concurrent_trials=max_concurrent, reuse_actors=True, trial_dirname_creator=_trial_dirname)
    run_config = tune.RunConfig(
        name=name, storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=plan.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[_MlflowStatusCallback(ctx.tracking_uri)], verbose=1)
    tuner = tune.Tuner(trainable_, param_space=_param_space(plan, trials), tune_config=tune_config,
                       run_config=run_config)
    return tuner.fit()


def run_sweep_on_ray(spec, trials: list[Trial], address: str | None = "auto", tracking_uri: str | None = None,
                     experiment: str | None = None, parent_run_id: str | None = None,
                     max_concurrent: int | None = None, extra_tags: dict[str, str] | None = None,
                     overrides: tuple[str, ...] = (), resume: bool = True, name: str | None = None,
                     force: bool = False):
    """Run prepared trials as a Tune experiment on a Ray cluster (used by cluster.slurm_ray's driver).

    The trials are run as given (e.g. with a cluster profile's microbatches); the spec supplies
    metric, mode, scheduler, search and resources. The Tune state lives in <root>/tune/<name>.
    """
    from .tracking import DEFAULT_EXPERIMENT, ensure_experiment, resolve_tracking_uri, start_parent_run

    if not trials:
        raise ValueError("run_sweep_on_ray: no trials")
    out_parent = Path(trials[0].config.runtime.out_dir).parent
    root = out_parent.parent if out_parent.name == "trials" else out_parent
    plan = spec.plan(trials[0].budget, overrides, root)
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.get("uri"))
    experiment = experiment or spec.tracking.get("experiment") or DEFAULT_EXPERIMENT
    if parent_run_id is None:
        parent_run_id = start_parent_run(uri, ensure_experiment(uri, experiment), spec.name, plan.budget.name,
                                         f"{spec.name} [{plan.budget.name}, ray]", {"n_trials": len(trials)},
                                         {"ctmlab.backend": "ray"})
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    start_ray(address, root, None, None, env)
    ctx = SweepContext(plan, {t.config_hash: t for t in trials}, uri, experiment, parent_run_id, force,
                       max(1, int(plan.resources.cpus)), env, dict(extra_tags or {}))
    return run_tune(ctx, trials, root / "tune", name or f"{plan.budget.name}-ray", resume, max_concurrent)
