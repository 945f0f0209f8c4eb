"""Launch a named sweep: the platform's front door.

    python sweeps/launch.py --list
    python sweeps/launch.py NAME [--budget smoke|paper] [--dry-run] [--resume] [--force]
                                 [--set key=value ...] [--max-concurrent K]
                                 [--backend local|ray://ADDR|slurm|slurm-ray]
    python sweeps/launch.py status NAME [--budget B]

One launch = one MLflow parent run with one nested child run per trial. Trials whose config hash
already has a FINISHED run in the experiment are skipped and reported (--force runs them again).
The sweep file is validated completely before anything starts; --dry-run prints the trial table
and starts nothing. At the end the sweep's ablation table is printed (analysis.ablation_table).
Exit status: 0 all trials finished, 1 some did not, 2 refused input.
"""
from __future__ import annotations

import time

T_COMMAND = time.time()  # before the heavy imports: "time from command to first training step"

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

if __package__ in (None, ""):
    # Run as a script (python sweeps/launch.py): import the package, not this folder's modules, from any CWD.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from sweeps.spec import (SweepError, SweepPlan, Trial, UnknownSweepError, format_value,  # noqa: E402
                         list_sweeps, load_sweep)

LOCAL_BACKENDS = ("local",)
STATE_DIR = "launches"


# ----------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python sweeps/launch.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="subcommands: status NAME (where is each trial of a sweep)")
    parser.add_argument("name", nargs="?", metavar="NAME", help="sweep name (sweeps/NAME.yaml) or a path to a sweep file")
    parser.add_argument("--list", action="store_true", help="list the sweeps with one-line descriptions")
    parser.add_argument("--budget", default=None,
                        help="smoke (toy, CPU, minutes) or paper (CIFAR-10, cluster); default: paper for the "
                             "SLURM backends, smoke otherwise")
    parser.add_argument("--dry-run", action="store_true", help="print the trial table; start nothing")
    parser.add_argument("--resume", action="store_true", help="continue the last interrupted launch of this budget")
    parser.add_argument("--force", action="store_true", help="run trials even if their config already FINISHED")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every trial, e.g. --set train.steps=300 (repeatable)")
    parser.add_argument("--max-concurrent", type=int, default=None, metavar="K", help="trials running at once")
    parser.add_argument("--backend", default="local",
                        help="local (a Ray instance started here), ray://ADDR (an existing Ray cluster), "
                             "slurm or slurm-ray (cluster/)")
    parser.add_argument("--root", default=None, help="sweep root (default ./runs/NAME or $CTM_LAB_SWEEP_ROOT/NAME)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default $MLFLOW_TRACKING_URI, the sweep file, else sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default ctm-lab)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs of the local Ray instance (default: all)")
    try:
        from cluster.cli import add_cluster_arguments
    except ImportError:
        pass
    else:
        add_cluster_arguments(parser)
    return parser


def _cluster_backends() -> tuple[str, ...]:
    try:
        from cluster.cli import CLUSTER_BACKENDS
    except ImportError:
        return ("slurm", "slurm-ray")
    return tuple(CLUSTER_BACKENDS)


def _split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(cluster.* items for the SLURM profile, the rest for the trainer configs)."""
    cluster = [i for i in items if i.strip().startswith("cluster.")]
    return cluster, [i for i in items if not i.strip().startswith("cluster.")]


# ----------------------------------------------------------------------------------------------
# Printing


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def print_trial_table(plan: SweepPlan, trials: Sequence[Trial], skipped: dict[str, Any] | None = None,
                      out=None) -> None:
    out = out or sys.stdout
    skipped = skipped or {}
    axes = list(plan.axes)
    header = ["#", *axes, "seed", "config hash", "steps", "cpus", "gpus", "est. GPU-h", "status"]
    rows = []
    for t in trials:
        status = f"skip: FINISHED run {skipped[t.config_hash].info.run_id[:8]}" if t.config_hash in skipped else "run"
        rows.append([t.index, *(format_value(t.axes.get(a)) for a in axes), t.seed, t.config_hash,
                     t.config.train.steps, format_value(t.resources.cpus), format_value(t.resources.gpus),
                     f"{t.estimated_gpu_hours:.2f}", status])
    spec = plan.spec
    print(f"sweep {spec.name} [{plan.budget.name}]: {spec.description}", file=out)
    print(f"metric {plan.metric} ({plan.mode}); seeds {list(plan.seeds)}; root {plan.root}", file=out)
    if plan.search:
        print(f"search: {plan.search.algo}, {plan.search.num_samples} samples "
              f"({'values below are a pre-drawn preview; Optuna picks them at run time' if plan.search.algo == 'optuna' else 'pre-drawn'})",
              file=out)
    if plan.scheduler:
        print(f"scheduler: {plan.scheduler.type} (grace {plan.scheduler.grace_period} steps, "
              f"reduction {plan.scheduler.reduction_factor:g})", file=out)
    print(_table(header, rows), file=out)
    to_run = [t for t in trials if t.config_hash not in skipped]
    gpu_h = sum(t.estimated_gpu_hours for t in to_run)
    teacher_wall, teacher_gpu = plan.teacher_estimate_hours()
    if plan.teacher_config is not None:
        from sweeps.trial import teacher_is_trained

        cached = teacher_is_trained(plan)
        print(f"teacher: {plan.teacher_config.runtime.out_dir} (edm, {plan.teacher_config.train.steps} steps, "
              f"{'cached' if cached else f'to train, est. {teacher_gpu:.2f} GPU-h'})", file=out)
        if cached:
            teacher_gpu = 0.0
    elif plan.teacher_checkpoint:
        print(f"teacher: existing checkpoint {plan.teacher_checkpoint}", file=out)
    print(f"{len(trials)} trial(s), {len(to_run)} to run, {len(trials) - len(to_run)} skipped; "
          f"est. {gpu_h + teacher_gpu:.2f} GPU-h in total", file=out)


def print_ablation_table(name: str, uri: str, experiment: str, parent_run_id: str | None, out=None) -> bool:
    """The sweep's ablation table from this launch's runs (its children, reused trials included)."""
    out = out or sys.stdout
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from analysis import ablation_table, layout_for, load_runs
    except ImportError as err:
        print(f"(no ablation table: the analysis package is missing: {err})", file=out)
        return False

    try:
        df = load_runs(experiment, sweep=name, tracking_uri=uri, parent_run_id=parent_run_id)
        if df.empty:
            print("(no ablation table: no trial runs)", file=out)
            return False
        layout = layout_for(name)
        table = ablation_table(df, layout.rows, layout.cols, layout.metric, nfe=layout.nfe, teacher=layout.teacher,
                               title=f"{layout.title or name} [{name}]")
    except ValueError as err:
        print(f"(no ablation table: {err})", file=out)
        return False
    print(table.to_markdown(), file=out)
    return True


# ----------------------------------------------------------------------------------------------
# Launch state (what --resume continues)


def _state_dir(plan: SweepPlan) -> Path:
    return plan.root / STATE_DIR


def _write_state(plan: SweepPlan, state: dict[str, Any]) -> Path:
    folder = _state_dir(plan)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{state['launch_id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def latest_state(plan: SweepPlan) -> dict[str, Any] | None:
    found = []
    for path in _state_dir(plan).glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except ValueError:
            continue
        if state.get("budget") == plan.budget.name and state.get("sweep") == plan.spec.name:
            found.append(state)
    return max(found, key=lambda s: s["created"]) if found else None


def _new_state(plan: SweepPlan, args: argparse.Namespace, launch_id: str, parent: str, to_run: Sequence[Trial],
               skipped: dict[str, Any], uri: str, experiment: str) -> dict[str, Any]:
    """What --resume needs to continue this launch as it was started (--force included)."""
    return {"launch_id": launch_id, "sweep": plan.spec.name, "budget": plan.budget.name,
            "overrides": list(args.overrides), "backend": args.backend, "tracking_uri": uri,
            "experiment": experiment, "parent_run_id": parent, "tune_name": launch_id,
            "trials": [t.config_hash for t in to_run], "skipped": {h: r.info.run_id for h, r in skipped.items()},
            "force": bool(args.force), "created": time.time(), "status": "running"}


def _resume_state(plan: SweepPlan, args: argparse.Namespace) -> dict[str, Any]:
    """The launch --resume continues; a forced launch stays forced (its trials must not reuse old runs)."""
    state = latest_state(plan)
    if state is None:
        raise SweepError(f"--resume: no earlier launch of {plan.spec.name!r} [{plan.budget.name}] under {plan.root}")
    if args.overrides and list(args.overrides) != state["overrides"]:
        raise SweepError(f"--resume continues launch {state['launch_id']} made with --set {state['overrides']}; "
                         "drop --set (or start a new launch without --resume)")
    args.force = bool(args.force or state.get("force"))
    return state


# ----------------------------------------------------------------------------------------------
# Main


def _shutdown_ray(timings: dict[str, Any]) -> None:
    from sweeps.ray_backend import stop_ray

    started = time.time()
    try:
        stop_ray()
    except Exception as err:  # noqa: BLE001 -- the sweep is done; Ray's atexit hook tries again
        print(f"warning: stopping Ray failed: {type(err).__name__}: {err}", file=sys.stderr)
    timings["ray_shutdown_s"] = time.time() - started


def _import_after(teacher_job, module: str) -> None:
    teacher_job.wait()
    importlib.import_module(module)


def _subcommand(argv: list[str]) -> int | None:
    """`status NAME`: the cluster helper's table (works for any backend)."""
    if not argv or argv[0] != "status":
        return None
    parser = argparse.ArgumentParser(prog="python sweeps/launch.py status")
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--budget", default="smoke")
    parser.add_argument("--root", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv[1:])
    try:
        from cluster.status import print_status
    except ImportError:
        print("error: `status` needs cluster/status.py (print_status), which is not installed", file=sys.stderr)
        return 2
    try:
        spec = load_sweep(args.name)
        plan = spec.plan(args.budget, _split_overrides(args.overrides)[1], args.root)
        trials = plan.trials()
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_status(plan.root, trials)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = _subcommand(argv)
    if code is not None:
        return code
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        known = list_sweeps()
        width = max((len(n) for n in known), default=0)
        for name, text in known.items():
            print(f"{name:<{width}}  {text}")
        return 0
    if not args.name:
        parser.print_usage(sys.stderr)
        print("error: give a sweep NAME (see --list)", file=sys.stderr)
        return 2
    if args.max_concurrent is not None and args.max_concurrent < 1:
        print(f"error: --max-concurrent must be >= 1, got {args.max_concurrent}", file=sys.stderr)
        return 2
    backend = args.backend
    if backend not in LOCAL_BACKENDS + _cluster_backends() and not backend.startswith("ray://"):
        print(f"error: --backend {backend!r}: expected local, ray://ADDR, {' or '.join(_cluster_backends())}",
              file=sys.stderr)
        return 2
    if args.budget is None:  # a cluster launch means the paper setting unless told otherwise
        args.budget = "paper" if backend in _cluster_backends() else "smoke"
    _, trainer_overrides = _split_overrides(args.overrides)

    # 1. Everything is validated here, before any store, teacher or Ray is touched.
    try:
        spec = load_sweep(args.name)
        plan = spec.plan(args.budget, trainer_overrides, args.root)
        state = _resume_state(plan, args) if args.resume else None
        if state is not None:
            plan = spec.plan(args.budget, _split_overrides(state["overrides"])[1], args.root)
        trials = plan.trials()
    except UnknownSweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # 2. A local launch's teacher starts training now, in its own process, before the MLflow import and
    #    the store: it is the launch's critical path (it is cancelled below if de-duplication leaves
    #    nothing to run, and on any error: the exit handler's os._exit would leave it running).
    teacher_job = None
    teacher_start = time.time()
    if not args.dry_run and backend not in _cluster_backends():
        from sweeps.trial import TeacherJob

        teacher_job = TeacherJob(plan).start()
    try:
        return _launch(args, spec, plan, trials, state, teacher_job, teacher_start)
    except SweepError as err:  # refused by the store (e.g. a deleted experiment)
        print(f"error: {err}", file=sys.stderr)
        _stop_after_error(teacher_job)
        return 2
    except BaseException:
        _stop_after_error(teacher_job)
        raise


def _stop_after_error(teacher_job) -> None:
    """Nothing may outlive a failed launch: its teacher process and its local Ray instance."""
    if teacher_job is not None:
        teacher_job.cancel()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        _shutdown_ray({})


def _launch(args: argparse.Namespace, spec, plan: SweepPlan, trials: list[Trial], state: dict[str, Any] | None,
            teacher_job, teacher_start: float) -> int:
    """The rest of main (the dry run, steps 3-6), once the sweep is validated and its teacher has started."""
    backend = args.backend
    from sweeps import tracking

    uri = tracking.resolve_tracking_uri(args.tracking_uri, spec.tracking.get("uri"))
    experiment = args.experiment or spec.tracking.get("experiment") or tracking.DEFAULT_EXPERIMENT
    args.tracking_uri, args.experiment, args.budget = uri, experiment, plan.budget.name
    args.root = str(plan.root)

    if args.dry_run:
        skipped = {}
        local_db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
        if not args.force and (local_db is None or Path(local_db).is_file()):
            try:  # read-only look-up; a store that does not exist yet is not created
                skipped = tracking.finished_runs(uri, tracking.ensure_experiment(uri, experiment),
                                                 [t.config_hash for t in trials]) if local_db is None or \
                    tracking.client(uri).get_experiment_by_name(experiment) else {}
            except Exception as err:  # noqa: BLE001 -- a dry run must not fail on an unreachable store
                print(f"(could not query MLflow at {uri} for finished trials: {err})")
        print_trial_table(plan, trials, skipped)
        if backend in _cluster_backends():
            from cluster.cli import dispatch_cluster

            dispatch_cluster(spec, [t for t in trials if t.config_hash not in skipped], args)
        print("dry run: nothing started")
        return 0

    # 3. A local launch starts Ray now, while a helper thread opens (or creates) the MLflow store: each
    #    takes seconds, mostly waiting, and the first trial actors should be up before the teacher is
    #    done. If de-duplication then leaves nothing to run, Ray is shut down again.
    ray_env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
               "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
               "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    ray_ready = None
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlflow-store") as pool:
        store = pool.submit(tracking.ensure_experiment, uri, experiment)
        if backend not in _cluster_backends():
            from sweeps import ray_backend

            ray_backend.start_ray(backend if backend.startswith("ray://") else None, plan.root, args.num_cpus,
                                  args.num_gpus, ray_env)
            ray_ready = time.time()
        try:
            experiment_id = store.result()
        except ValueError as err:  # e.g. a deleted experiment: refused input, not a crash
            raise SweepError(f"MLflow store {uri}: {err}") from err

    # 4. De-duplication and the parent run.
    if args.resume:
        skipped = {}
        reused_ids = state.get("skipped", {})
        if reused_ids:
            c = tracking.client(uri)
            skipped = {h: tracking.retry(lambda rid=rid: c.get_run(rid)) for h, rid in reused_ids.items()}
        to_run = [t for t in trials if t.config_hash in set(state["trials"])]
        parent = state["parent_run_id"]
        tracking.set_status(uri, parent, "RUNNING")
        launch_id = state["launch_id"]
        print(f"resuming launch {launch_id} (MLflow parent run {parent})")
    else:
        finished = tracking.finished_runs(uri, experiment_id, [t.config_hash for t in trials])
        skipped = {} if args.force else finished
        to_run = [t for t in trials if t.config_hash not in skipped]
        launch_id = f"{plan.budget.name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if backend not in _cluster_backends():  # the cluster backends do it once no earlier job is busy
            from sweeps.trial import move_aside_stale

            move_aside_stale(to_run, finished, launch_id)
        parent = None
    for t in trials:
        if t.config_hash not in skipped:
            continue
        run = skipped[t.config_hash]
        print(f"skip {t.name}: config {t.config_hash} already FINISHED as MLflow run {run.info.run_id} "
              f"(sweep {run.data.tags.get('ctmlab.sweep', '?')}); --force runs it again")

    if backend in _cluster_backends():
        from cluster.cli import dispatch_cluster

        if not to_run:
            print("nothing to submit: every trial already FINISHED")
            return 0
        dispatch_cluster(spec, to_run, args)
        return 0

    if parent is None:
        params = {"budget": plan.budget.name, "n_trials": len(trials), "n_run": len(to_run), "n_skipped": len(skipped),
                  "axes": json.dumps({p: a.describe() for p, a in plan.axes.items()}), "seeds": list(plan.seeds),
                  "metric": plan.metric, "mode": plan.mode, "overrides": list(args.overrides), "root": str(plan.root),
                  "backend": backend}
        tags = {"ctmlab.launch_id": launch_id, "ctmlab.backend": backend, "ctmlab.sweep_root": str(plan.root)}
        if skipped:
            tags["ctmlab.reused_runs"] = json.dumps({h: r.info.run_id for h, r in skipped.items()})
        parent = tracking.start_parent_run(uri, experiment_id, spec.name, plan.budget.name,
                                           f"{spec.name} [{plan.budget.name}] {launch_id}", params, tags)
        state = _new_state(plan, args, launch_id, parent, to_run, skipped, uri, experiment)
        _write_state(plan, state)
        print(f"launch {launch_id}: {len(to_run)} trial(s) to run, {len(skipped)} skipped; "
              f"MLflow parent run {parent} in {uri} (experiment {experiment!r})")
    if skipped:  # the reused trials become children of this launch too (idempotent on --resume)
        tracking.record_reused(uri, experiment_id, parent, trials, skipped)
    timings = dict(state.get("timings", {}))
    timings.update({"command": T_COMMAND, "teacher_start": teacher_start, "ray_ready": ray_ready})
    if not to_run and teacher_job is not None:
        teacher_job.cancel()
        ray_backend.stop_ray()

    ok, ray_down = True, None
    try:
        if to_run:
            # 5. The teacher (once per sweep root, cached by its config hash) trains in a process while
            #    the first trial actors start; the trials wait for it (sweeps.trial.wait_for_teacher).
            if teacher_job.cached and plan.teacher_config is not None:
                print(f"teacher: cached {plan.teacher_checkpoint} (hash {plan.teacher_hash})")
            state["timings"] = timings
            _write_state(plan, state)
            ctx = ray_backend.SweepContext(plan, {t.config_hash: t for t in to_run}, uri, experiment, parent,
                                           args.force, max(1, int(plan.resources.cpus)), ray_env)
            # The driver idles while trials train: load what the final table needs then, not after it
            # (and not before: until the teacher ends, the cores are busy starting the first trial).
            threading.Thread(target=_import_after, args=(teacher_job, "analysis"), daemon=True).start()
            try:
                if teacher_job.failed:  # no trial starts on a teacher that already failed
                    raise RuntimeError("the teacher failed")
                results = ray_backend.run_tune(ctx, to_run, plan.root / "tune", state["tune_name"], args.resume,
                                               args.max_concurrent or plan.max_concurrent)
            except Exception as err:  # noqa: BLE001 -- report, close the parent run, print what finished
                print(f"error: the Tune run stopped: {type(err).__name__}: {str(err)[-2000:]}", file=sys.stderr)
            else:
                for r in results:
                    if r.error is not None:
                        print(f"trial failed: {r.config} -> {type(r.error).__name__}: "
                              f"{str(r.error).strip().splitlines()[-1][:300]}")
            timings["tune_done"] = time.time()
            # Ray's shutdown mostly waits for its processes to exit; nothing below needs Ray.
            ray_down = threading.Thread(target=_shutdown_ray, args=(timings,), name="ray-shutdown")
            ray_down.start()
            try:
                teacher = teacher_job.join()
            except Exception as err:  # noqa: BLE001
                print(f"error: teacher {plan.teacher_checkpoint}: {type(err).__name__}: {err}", file=sys.stderr)
                teacher = None
            timings["teacher_end"] = teacher_job.finished_at
            if teacher and teacher.get("trained"):
                tracking.log_metrics(uri, parent, 0, {f"teacher/{k}": v for k, v in teacher["metrics"].items()
                                                      if isinstance(v, (int, float)) and k != "step"})
                tracking.log_metrics(uri, parent, 0, {"sweep/teacher_seconds":
                                                      timings["teacher_end"] - timings["teacher_start"]})
            if teacher:
                tracking.log_params_and_tags(uri, parent, {}, {"ctmlab.teacher_checkpoint": teacher["checkpoint"],
                                                               "ctmlab.teacher_hash": str(teacher["hash"])})
    finally:
        timings["end"] = time.time()
        state["timings"] = timings
        _write_state(plan, state)

    # 6. Close the parent run and print the table.
    runs = [r for r in tracking.children(uri, experiment_id, parent)
            if not (tracking.REUSED_FROM in r.data.tags and r.data.tags.get("ctmlab.config_hash") in skipped)]
    done = {r.data.tags.get("ctmlab.config_hash") for r in runs
            if r.info.status == "FINISHED" or r.data.tags.get("ctmlab.stopped_by") == "scheduler"}
    stopped = sum(r.data.tags.get("ctmlab.stopped_by") == "scheduler" for r in runs)
    if plan.search is None:
        unfinished = [t.name for t in to_run if t.config_hash not in done]
        status = {r.data.tags.get("ctmlab.config_hash"): r.info.status for r in runs}
        for t in to_run:
            if t.config_hash not in done:
                print(f"not finished: {t.name} ({t.config_hash}): MLflow status {status.get(t.config_hash, 'no run')}")
    else:  # the searcher picked the points: count runs, not the dry-run preview
        unfinished = ["sample"] * max(0, (len(to_run) if to_run else 0) - len(done))
        if unfinished:
            print(f"not finished: {len(unfinished)} of {len(to_run)} sampled trial(s)")
    if stopped:
        print(f"{stopped} trial(s) stopped early by the {plan.scheduler.type if plan.scheduler else ''} scheduler "
              "(MLflow status KILLED, tag ctmlab.stopped_by=scheduler)")
    ok = not unfinished
    tracking.log_metrics(uri, parent, 0, {"sweep/wall_seconds": timings["end"] - T_COMMAND,
                                          "sweep/trials_done": len(done)})
    tracking.set_status(uri, parent, "FINISHED" if ok else "FAILED")
    state["status"] = "finished" if ok else "incomplete"
    _write_state(plan, state)
    print()
    print_ablation_table(spec.name, uri, experiment, parent)
    print(f"MLflow: parent run {parent} in {uri} (experiment {experiment!r}); "
          f"`mlflow ui --backend-store-uri {uri}` shows it")
    if ray_down is not None:
        ray_down.join()
        _write_state(plan, state)  # with Ray's shutdown time
    return 0 if ok else 1


def _exit_without_teardown(code: list[int]) -> None:
    """The last exit handler (registered first): the others (Ray's, MLflow's, logging's) have run and
    the output is flushed; what is left is the interpreter freeing torch's, Ray's and MLflow's
    modules, ~2 s on a laptop that the user would wait for after the table."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code[0])


if __name__ == "__main__":
    import atexit

    exit_code = [1]  # an uncaught exception: its traceback, then status 1
    atexit.register(_exit_without_teardown, exit_code)
    try:
        exit_code[0] = main()
    except SystemExit as stop:  # argparse: usage errors (2), --help (0)
        exit_code[0] = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        raise
    except KeyboardInterrupt:
        exit_code[0] = 130
        raise
    sys.exit(exit_code[0])
