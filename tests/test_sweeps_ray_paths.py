"""The launcher's other Ray paths, end to end on a real local Ray and a real MLflow store:
a DDP trial (one process per GPU; on a machine without CUDA, 2 gloo processes on GPUs declared to Ray) and
a search (Optuna sampling a log-uniform lr, ASHA stopping trials early)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from ctm_core.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "sweeps" / "launch.py"
SMALL = {"model.hidden": 32, "model.depth": 2, "eval.num_samples": 200, "eval.teacher_steps": 4,
         "ctm.num_points": 8, "ctm.max_steps": 7, "eval.nfe": [1], "data.batch_size": 32}
TEACHER = {"base": "configs/toy_teacher.yaml",
           "set": {k: v for k, v in SMALL.items() if not k.startswith(("ctm.", "eval.nfe"))} | {"train.steps": 60}}


def _launch(tmp: Path, name: str, sweep: dict, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(LAUNCH), str(path), "--root", str(tmp / "runs"), *extra],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=420)
    return done, uri


def _trial_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ctm-lab")
    return [r for r in client.search_runs([exp.experiment_id], max_results=100)
            if r.data.tags.get("ctmlab.role") == "trial"]


def test_a_two_gpu_trial_runs_as_two_ddp_processes(tmp_path):
    sweep = {"description": "DDP trial", "base": "configs/toy_ctm.yaml", "set": SMALL, "teacher": TEACHER,
             "axes": {"loss.lambda_dsm": ["1"]}, "seeds": [0], "metric": "eval/sw2/nfe1",
             "budgets": {"smoke": {"set": {"train.steps": 30, "eval.every": 15, "train.ckpt_every": 15,
                                           "train.log_every": 5},
                                   "resources": {"cpus": 1, "gpus": 2}}}}
    done, uri = _launch(tmp_path, "ddp_trial", sweep, "--num-gpus", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = _trial_runs(uri)
    assert run.info.status == "FINISHED" and run.data.tags["ctmlab.world_size"] == "2"
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss_ctm")]
    assert steps == [5, 10, 15, 20, 25, 30]  # rank 0 alone logs: each step once
    (out_dir,) = [p for p in (tmp_path / "runs" / "trials").iterdir() if p.is_dir()]
    step, path = list_checkpoints(out_dir)[-1]
    assert step == 30 and load_checkpoint(path)["world_size"] == 2


def test_optuna_search_with_asha_stops_trials_early(tmp_path):
    sweep = {"description": "lr search", "base": "configs/toy_ctm.yaml", "set": SMALL, "teacher": TEACHER,
             "axes": {"optim.lr": {"loguniform": [1.0e-4, 3.0e-3]}}, "seeds": [0], "metric": "eval/sw2/nfe1",
             "mode": "min", "search": {"algo": "optuna", "num_samples": 4, "seed": 0},
             "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 2},
             "budgets": {"smoke": {"set": {"train.steps": 40, "eval.every": 10, "train.ckpt_every": 20,
                                           "train.log_every": 10},
                                   "resources": {"cpus": 1, "gpus": 0}}}}
    done, uri = _launch(tmp_path, "lr_search", sweep, "--max-concurrent", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = _trial_runs(uri)
    assert len(runs) == 4
    lrs = sorted(float(r.data.params["optim.lr"]) for r in runs)
    assert len(set(lrs)) == 4 and all(1.0e-4 <= lr <= 3.0e-3 for lr in lrs)  # sampled, not a grid
    stopped = [r for r in runs if r.data.tags.get("ctmlab.stopped_by") == "scheduler"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert stopped and finished and len(stopped) + len(finished) == 4
    assert all(r.info.status == "KILLED" for r in stopped)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    last_step = {r.info.run_id: max(m.step for m in client.get_metric_history(r.info.run_id, "train/loss_ctm"))
                 for r in runs}
    # A stopped trial never reached the trainer's end (no end-of-run summary); it may have trained on for
    # a few steps while the driver decided (the trainer does not wait for Tune at its reports).
    assert all("time/train_seconds" not in r.data.metrics for r in stopped)
    assert all(last_step[r.info.run_id] == 40 and "time/train_seconds" in r.data.metrics for r in finished)
    assert "stopped early by the asha scheduler" in done.stdout
    assert "| optim.lr" in done.stdout or "optim.lr" in done.stdout  # the end table, one row per sampled lr


_STOP_RAY_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path
import ray
from sweeps.ray_backend import kill_autoscaler_monitor, start_ray, stop_ray

def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def descendants():
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found

start_ray(None, Path(sys.argv[1]), 1, 0, {})
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
processes = ray._private.worker._global_node.all_processes
pids = {kind: [i.process.pid for i in infos] for kind, infos in processes.items()}
before = descendants()
killed = kill_autoscaler_monitor()
state = {"killed": killed, "monitor_alive": any(alive(p) for p in pids["monitor"]),
         "raylet_alive": all(alive(p) for p in pids["raylet"]), "n_before": len(before)}
stop_ray()
deadline = time.time() + 20
while time.time() < deadline and any(alive(p) for p in before):
    time.sleep(0.2)
state["left"] = sorted(p for p in before if alive(p))
print(json.dumps(state))
"""


def test_stop_ray_kills_the_monitor_first_and_leaves_no_ray_process(tmp_path):
    """The launcher's fast Ray shutdown (the monitor killed while the GCS is still up, then ray.shutdown)
    must not leave any of Ray's processes behind: agents and workers included."""
    done = subprocess.run([sys.executable, "-c", _STOP_RAY_SCRIPT, str(tmp_path / "r")], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state["killed"] and not state["monitor_alive"] and state["raylet_alive"]
    assert state["n_before"] >= 6  # GCS, raylet, monitor, dashboard, log monitor, agents, a worker
    assert state["left"] == []
