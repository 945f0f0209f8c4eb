"""How much of a sweep's wall time is the sweep machinery rather than training?

    python benchmarks/sweep_overhead.py [NAME] [--max-concurrent K] [--set key=value ...] [--keep]

Runs `python sweeps/launch.py NAME` (smoke budget, embedded default: local Ray, a fresh SQLite
MLflow store and sweep root in a temp dir) and prints:

  wall time                 command start -> launcher exit (measured here)
  teacher compute           the teacher's train() call, as for a trial (set-up, steps, evals,
                            checkpoints; time/train_seconds in its final_metrics.json); its process
                            start counts as overhead. Printed beside it: the span from its config.yaml
                            (written after the set-up) to its last checkpoint, the accounting before
                            2026-11-24
  sum of trial compute      sum over trials of the trainer's own wall time in train() (set-up,
                            steps, evals, checkpoints; MLflow metric time/train_seconds); the MLflow
                            runs' durations (from the run's creation after the trainer's set-up)
                            are printed beside it
  overhead                  (wall - teacher - sum of trial compute / K) / wall, K = trials at once;
                            with K = 1 (the default) exactly (wall - compute) / wall
  command -> first step     until the first training step of anything (the teacher, if trained)
  command -> first trial    until the first trial's first step

Everything else -- interpreter start, imports, Ray start, actor start-up, data loading, MLflow
queries and the final table -- counts as overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _train_span(run) -> tuple[float, float]:
    """(start, end) in seconds of a trial's train() call; the MLflow run's span where the trainer did not say."""
    end = run.info.end_time / 1000
    seconds = run.data.metrics.get("time/train_seconds")
    return (end - seconds, end) if seconds is not None else (run.info.start_time / 1000, end)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", default="ablation_gan")
    parser.add_argument("--max-concurrent", type=int, default=1,
                        help="trials at once (1: overhead is exactly (wall - compute) / wall)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (store and runs)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    uri = f"sqlite:///{work}/mlflow.db"
    command = [sys.executable, str(REPO / "sweeps" / "launch.py"), args.name, "--root", str(work / "runs" / args.name),
               "--max-concurrent", str(args.max_concurrent), *[f"--set={o}" for o in args.overrides]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    t0 = time.time()
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        print(f"launcher failed with exit status {proc.returncode}; kept {work}")
        return 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ctm-lab")
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    trials = [r for r in runs if r.data.tags.get("ctmlab.role") == "trial"]
    run_time = sum((r.info.end_time - r.info.start_time) / 1000 for r in trials)
    spans = sorted(_train_span(r) for r in trials)
    compute = sum(end - begin for begin, end in spans)
    first_trial = min(r.info.start_time for r in trials) / 1000 - t0
    state = json.loads(next((work / "runs" / args.name / "launches").glob("*.json")).read_text())
    timings = state["timings"]
    teacher_dirs = list((work / "runs" / args.name / "teachers").glob("*/config.yaml"))  # written at its step 0
    teacher_trained = bool(teacher_dirs)
    stepping_from = min((p.stat().st_mtime for p in teacher_dirs), default=0.0)
    teacher_steps = timings.get("teacher_end", 0) - stepping_from if teacher_trained else 0.0
    teacher = sum(json.loads((p.parent / "final_metrics.json").read_text())["time/train_seconds"]
                  for p in teacher_dirs)
    first_step = stepping_from - t0 if teacher_trained else first_trial
    slots = max(1, min(args.max_concurrent, len(trials)))
    busy = teacher + compute / slots
    overhead = (wall - busy) / wall
    # Where the rest goes (exact with one trial at a time): start-up, gaps between trials, the end.
    parent = min(r.info.start_time for r in runs if r.data.tags.get("ctmlab.role") == "sweep") / 1000
    ready = max(timings.get("teacher_end", t0), timings.get("ray_ready", t0))
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    breakdown = [
        ("  command -> parent run (imports, validation, store)", f"{parent - t0:.1f} s"),
        ("  teacher done and Ray ready -> first trial's train()", f"{spans[0][0] - ready:.1f} s"),
        ("  between trials (sum; median)" if slots == 1 else "  between trials: n/a with trials in parallel",
         f"{sum(gaps):.1f} s; {statistics.median(gaps):.2f} s" if slots == 1 and gaps else "-"),
        ("  last trial's end -> exit (Ray shutdown, table)", f"{t0 + wall - spans[-1][1]:.1f} s"),
    ]
    if "tune_done" in timings:
        shutdown = timings.get("ray_shutdown_s", 0.0)
        breakdown += [
            ("    last trial's end -> Tuner.fit returns", f"{timings['tune_done'] - spans[-1][1]:.1f} s"),
            ("    Tuner.fit returns -> exit (MLflow bookkeeping, table)", f"{t0 + wall - timings['tune_done']:.1f} s"),
            ("    of it, ray.shutdown() alongside (a thread)", f"{shutdown:.1f} s"),
        ]

    rows = [
        ("sweep", f"{args.name} (smoke), {len(trials)} trials, {slots} at once"),
        ("wall time", f"{wall:.1f} s"),
        ("teacher compute", f"{teacher:.1f} s (config.yaml -> last checkpoint: {teacher_steps:.1f} s)"
         if teacher_trained else "cached"),
        ("sum of trial compute", f"{compute:.1f} s (MLflow run durations: {run_time:.1f} s)"),
        ("overhead", f"{100 * overhead:.1f} % ({wall - busy:.1f} s)"),
        *breakdown,
        ("command -> first training step", f"{first_step:.1f} s"),
        ("command -> first trial step", f"{first_trial:.1f} s"),
        ("command -> Ray ready (the teacher trains meanwhile)", f"{timings['ray_ready'] - t0:.1f} s"),
        ("load average (1 min) at the end", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'quantity':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key:<{width}} | {value} |")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
