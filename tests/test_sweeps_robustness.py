"""The launcher's failure paths: a resumed forced launch, a teacher killed by a signal, DDP ranks of a
stopped trial, pre-drawn random search, a refused MLflow store, tracking URIs that are not paths, the out-dir
lock of equal samples."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from sweeps import launch
from sweeps.spec import parse_sweep
from sweeps.tracking import resolve_tracking_uri

REPO = Path(__file__).resolve().parents[1]


def _raw(**changes) -> dict:
    raw = {"description": "robustness", "base": "configs/toy_ctm.yaml", "teacher": {"base": "configs/toy_teacher.yaml"},
           "axes": {"ema.target_rate": [0.9, 0.99]}, "seeds": [0], "metric": "eval/sw2/nfe1",
           "budgets": {"smoke": {"set": {"train.steps": 20}, "resources": {"cpus": 1, "gpus": 0}}}}
    raw.update(changes)
    return raw


def _plan(tmp_path: Path, **changes):
    return parse_sweep(_raw(**changes), name="robust").plan("smoke", [], tmp_path / "runs")


# ----------------------------------------------------------------------------------------------
# 1. --resume keeps --force


def test_resume_of_a_forced_launch_stays_forced(tmp_path):
    """A forced launch resumed without --force must still re-run its trials, not reuse old FINISHED runs."""
    plan = _plan(tmp_path)
    started = argparse.Namespace(overrides=[], backend="local", force=True)
    launch._write_state(plan, launch._new_state(plan, started, "smoke-1", "parent", plan.trials(), {},
                                                "sqlite:////x.db", "e"))
    resumed = argparse.Namespace(overrides=[], force=False)
    state = launch._resume_state(plan, resumed)
    assert state["launch_id"] == "smoke-1" and resumed.force is True
    unforced = argparse.Namespace(**{**vars(started), "force": False})
    launch._write_state(plan, {**launch._new_state(plan, unforced, "smoke-2", "p2", plan.trials(), {},
                                                   "sqlite:////x.db", "e"),
                               "created": time.time() + 1})
    again = argparse.Namespace(overrides=[], force=False)
    assert launch._resume_state(plan, again)["launch_id"] == "smoke-2" and again.force is False


# ----------------------------------------------------------------------------------------------
# 2. A teacher killed by a signal


def test_a_teacher_killed_by_sigkill_fails_the_waiting_trials_promptly(tmp_path):
    """The OOM killer leaves no Python exception to write the failure marker: the launcher's wait on the
    teacher's process writes it, so wait_for_teacher raises instead of polling forever."""
    from sweeps.trial import TeacherJob, wait_for_teacher

    plan = _plan(tmp_path, teacher={"base": "configs/toy_teacher.yaml", "set": {"train.steps": 10_000_000}})
    job = TeacherJob(plan, log=lambda *_: None).start()
    try:
        time.sleep(1.0)
        os.kill(job._process.pid, signal.SIGKILL)
        job.wait()
        raised: list[BaseException] = []

        def trial_side():
            try:
                wait_for_teacher(plan, poll_s=0.05)
            except BaseException as err:  # noqa: BLE001
                raised.append(err)

        waiter = threading.Thread(target=trial_side, daemon=True)
        waiter.start()
        waiter.join(timeout=10)
        assert not waiter.is_alive(), "wait_for_teacher still polls for a teacher that is dead"
        assert isinstance(raised[0], RuntimeError) and "SIGKILL" in str(raised[0])
        with pytest.raises(RuntimeError, match="SIGKILL"):
            job.join()
    finally:
        job.cancel()


def _exit_with(code: int) -> None:
    os._exit(code)


def test_exit_status_of_a_killed_child_is_read_as_soon_as_its_sentinel_fires_even_under_load():
    """A killed child's sentinel fires when its files close, a moment before the kernel makes it waitable:
    a non-blocking look in between saw nothing, so no failure marker was written and the sweep's trials
    waited for a dead teacher forever (~3% of kills with both cores busy). Two busy processes load the
    machine while 200 children are killed and read; exit codes, and a child multiprocessing reaped
    first, are read too."""
    import multiprocessing
    import multiprocessing.connection

    from sweeps.trial import _exit_status

    ctx = multiprocessing.get_context("fork")
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for _ in range(200):
            child = ctx.Process(target=_sleeper, args=(600,), daemon=True)
            child.start()
            os.kill(child.pid, signal.SIGKILL)
            multiprocessing.connection.wait([child.sentinel])
            assert "signal SIGKILL" in (_exit_status(child) or "no status"), "read before the child was waitable"
            child.join()
    finally:
        for process in load:
            process.kill()
            process.wait()
    for code, expected in ((3, "exited with code 3"), (0, None)):
        child = ctx.Process(target=_exit_with, args=(code,))
        child.start()
        multiprocessing.connection.wait([child.sentinel])
        status = _exit_status(child)
        assert status == expected or (expected is not None and expected in status)
        child.join()
    reaped = ctx.Process(target=_sleeper, args=(600,))
    reaped.start()
    os.kill(reaped.pid, signal.SIGKILL)
    reaped.join()  # multiprocessing reaps it and keeps the exit code
    assert "signal SIGKILL" in _exit_status(reaped)


# ----------------------------------------------------------------------------------------------
# 3. DDP ranks of a trial Tune stops


def _sleeper(seconds: float) -> None:
    time.sleep(seconds)


def test_stop_processes_terminates_and_reaps_running_ranks():
    from sweeps.ray_backend import _stop_processes

    ctx = __import__("multiprocessing").get_context("fork")
    procs = [ctx.Process(target=_sleeper, args=(600,)) for _ in range(2)]
    for p in procs:
        p.start()
    _stop_processes(procs, grace_s=5)
    assert all(not p.is_alive() and p.exitcode == -signal.SIGTERM for p in procs)


# ----------------------------------------------------------------------------------------------
# 4. Random search runs the pre-drawn trials


def test_random_search_runs_exactly_the_pre_drawn_trials(tmp_path):
    """Tune must not draw its own unseeded values (nor crash on a grid axis): the trials of a random
    search are the seeded samples the dry run showed, each once."""
    from ray import tune

    from sweeps.ray_backend import SweepContext, _num_samples, _param_space

    plan = _plan(tmp_path, axes={"ema.target_rate": [0.9, 0.99], "optim.lr": {"loguniform": [1.0e-4, 3.0e-3]}},
                 search={"algo": "random", "num_samples": 5, "seed": 3})
    trials = plan.trials()
    space = _param_space(plan, trials)
    assert space == {"trial": tune.grid_search([t.config_hash for t in trials])} and _num_samples(plan) == 1
    ctx = SweepContext(plan, {t.config_hash: t for t in trials}, "sqlite:////x.db", "e", "p")
    picked = [ctx.trial_for({"trial": h}, f"t_{i:05d}") for i, h in enumerate(space["trial"]["grid_search"])]
    assert [(t.axes, t.config_hash) for t in picked] == [(t.axes, t.config_hash) for t in trials]
    optuna = _plan(tmp_path, axes={"optim.lr": {"loguniform": [1.0e-4, 3.0e-3]}},
                   search={"algo": "optuna", "num_samples": 5})
    assert "optim.lr" in _param_space(optuna, optuna.trials()) and _num_samples(optuna) == 5


# ----------------------------------------------------------------------------------------------
# 5. A store that refuses the launch


def _session_pids(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry))
    return found


def test_a_deleted_experiment_is_refused_and_leaves_no_teacher_running(tmp_path):
    """The store answers after the teacher started: a clear error, status 2, and no orphaned teacher
    (the launcher's exit handler ends it with os._exit, before multiprocessing could kill it)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("ctm-lab"))
    path = tmp_path / "refused.yaml"
    path.write_text(yaml.safe_dump(_raw(teacher={"base": "configs/toy_teacher.yaml",
                                                 "set": {"train.steps": 10_000_000}})))
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_file, "w") as out, open(err_file, "w") as err:  # files: an orphan would hold pipes open
        proc = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "launch.py"), str(path), "--root",
                                 str(tmp_path / "runs"), "--num-cpus", "1"], cwd=tmp_path, text=True,
                                stdout=out, stderr=err, start_new_session=True,
                                env={**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_AUTH_MODE": "disabled"})
    try:
        proc.wait(timeout=300)
        out, err = out_file.read_text(), err_file.read_text()
        deadline = time.time() + 30
        while _session_pids(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        left = _session_pids(proc.pid)
    finally:
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    assert "error: MLflow store" in err and "deleted" in err and "Traceback" not in err, err[-2000:]
    assert left == [], f"processes of the launch still running: {left}"


# ----------------------------------------------------------------------------------------------
# 6. Tracking URIs


def test_tracking_uris_that_are_not_paths_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("databricks", "databricks://profile", "http://mlflow:5000", "file:/abs/mlruns", "file:///abs/mlruns",
                f"sqlite:///{tmp_path}/m.db"):
        assert resolve_tracking_uri(uri) == uri
    assert resolve_tracking_uri("file:./mlruns") == f"file://{tmp_path}/mlruns"
    assert resolve_tracking_uri("mlruns") == str(tmp_path / "mlruns")
    assert resolve_tracking_uri("sqlite:///m.db") == f"sqlite:///{tmp_path}/m.db"


# ----------------------------------------------------------------------------------------------
# 7. Equal search samples take turns on one out dir


def test_out_dir_lock_makes_a_second_process_wait_for_the_first(tmp_path):
    """Two processes (as two Tune actors of equal samples) on one out dir: the second enters only after
    the first has left, so it finds the first's finished trial instead of training it a second time."""
    out_dir, log = tmp_path / "runs" / "trial_0", tmp_path / "log.txt"
    holder = ("import sys, time\nfrom pathlib import Path\nfrom sweeps.trial import out_dir_lock\n"
              "log = open(sys.argv[2], 'a', buffering=1)\n"
              "with out_dir_lock(Path(sys.argv[1])):\n"
              "    log.write(f'{sys.argv[3]} in {time.time()}\\n'); time.sleep(float(sys.argv[4]))\n"
              "    log.write(f'{sys.argv[3]} out {time.time()}\\n')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-c", holder, str(out_dir), str(log), "first", "1.5"], env=env)
    deadline = time.time() + 60
    while not (log.exists() and "first in" in log.read_text()):
        assert time.time() < deadline and first.poll() is None, "the first process never took the lock"
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", holder, str(out_dir), str(log), "second", "0"], env=env,
                            timeout=60)
    assert first.wait(timeout=60) == 0 and second.returncode == 0
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[:2] for e in events] == [["first", "in"], ["first", "out"], ["second", "in"], ["second", "out"]]
    assert float(events[2][2]) >= float(events[1][2])  # the second entered after the first left
    assert (out_dir.parent / ".trial_0.lock").exists()


def test_out_dir_lock_goes_on_unlocked_where_the_filesystem_has_no_locks(tmp_path, monkeypatch, capsys):
    """Lustre without `-o flock` answers flock with ENOSYS: the sweep warns and goes on instead of failing;
    any other error is raised."""
    import errno

    from sweeps import trial

    def no_locks(handle, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(trial.fcntl, "flock", no_locks)
    entered = []
    with trial.out_dir_lock(tmp_path / "runs" / "t0"):
        entered.append(True)
    assert entered == [True] and "does not support file locks" in capsys.readouterr().err

    def denied(handle, op):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(trial.fcntl, "flock", denied)
    with pytest.raises(OSError, match="Permission denied"):
        with trial.out_dir_lock(tmp_path / "runs" / "t1"):
            pass
