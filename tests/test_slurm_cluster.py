"""The local SLURM test cluster really schedules: GRES, multi-task steps, throttled arrays, requeue.

Everything here talks to real slurmctld/slurmd daemons (no mocks); jobs are submitted with
submitit or sbatch and run as the current user with this interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from cluster.testing.conftest_slurm import slurm_cluster  # noqa: F401  (fixture)
from cluster.testing.slurm_cluster import SlurmCluster, main

# Job functions below live in this test module, which the job's interpreter cannot import by
# name (tests/ is not a package): ship them by value instead.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 90


def _wait_done(job: submitit.Job, timeout: float = JOB_TIMEOUT_S) -> None:
    """Without slurmdbd sacct is unavailable, so a job that dies without a result file would make
    job.result() wait forever; poll with a deadline instead and show the job's stderr on failure."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout} s; stderr:\n{job.stderr()}")
        time.sleep(0.5)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.25)


def _slurm_executor(folder: Path, cluster: SlurmCluster, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder)
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition=cluster.partition, timeout_min=5, nodes=1, cpus_per_task=1, **params)
    return executor


def _describe_task(tag: str) -> dict:
    return {
        "tag": tag,
        "procid": int(os.environ["SLURM_PROCID"]),
        "ntasks": int(os.environ["SLURM_NTASKS"]),
        "gpus_on_node": os.environ.get("SLURM_GPUS_ON_NODE"),
        "python": sys.executable,
    }


def _timed_sleep(index: int, log_dir: str, seconds: float) -> int:
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    Path(log_dir, f"{index}.json").write_text(json.dumps({"index": index, "start": start, "end": end}))
    return index


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    # An end and a start at the same instant do not overlap: ends sort first (False < True).
    events = sorted([(s, True) for s, _ in intervals] + [(e, False) for _, e in intervals])
    running = peak = 0
    for _, is_start in events:
        running += 1 if is_start else -1
        peak = max(peak, running)
    return peak


def test_sinfo_shows_the_node_idle_with_four_gpus(slurm_cluster):
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-p", slurm_cluster.partition, "-o", "%N|%t|%G"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out == ["localhost|idle|gpu:4"]


def test_submitit_multi_task_job_reports_every_rank(slurm_cluster, tmp_path):
    executor = _slurm_executor(tmp_path, slurm_cluster, gpus_per_node=2, tasks_per_node=2)
    job = executor.submit(_describe_task, "hello")
    _wait_done(job)
    results = job.results()
    assert sorted(r["procid"] for r in results) == [0, 1]
    assert all(r["ntasks"] == 2 and r["tag"] == "hello" for r in results)
    assert all(r["gpus_on_node"] == "2" for r in results)
    assert all(r["python"] == sys.executable for r in results)


def test_job_array_respects_parallelism_limit(slurm_cluster, tmp_path):
    log_dir = tmp_path / "times"
    log_dir.mkdir()
    executor = _slurm_executor(tmp_path / "jobs", slurm_cluster, slurm_array_parallelism=2)
    n = 6
    jobs = executor.map_array(_timed_sleep, range(n), [str(log_dir)] * n, [2.0] * n)
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array, not six jobs
    for job in jobs:
        _wait_done(job)
    assert sorted(job.result() for job in jobs) == list(range(n))
    records = [json.loads(p.read_text()) for p in log_dir.glob("*.json")]
    assert sorted(r["index"] for r in records) == list(range(n))
    peak = _max_overlap([(r["start"], r["end"]) for r in records])
    assert 1 <= peak <= 2, f"{peak} array tasks ran at once with slurm_array_parallelism=2"


REQUEUE_SCRIPT = """#!/bin/bash
n=$(( $(cat attempts 2>/dev/null || echo 0) + 1 ))
echo "$n" > attempts
echo "attempt $n restart_count=${SLURM_RESTART_COUNT:-0}" >> attempts.log
if [ "$n" -eq 1 ]; then sleep 300; fi
"""


def test_scontrol_requeue_runs_a_running_job_again(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(REQUEUE_SCRIPT)
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--requeue", "-D", str(tmp_path), "-o", str(tmp_path / "slurm-%j.out"),
         "-p", slurm_cluster.partition, str(script)],
        capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]
    attempts = tmp_path / "attempts"

    def attempt() -> int:
        text = attempts.read_text().strip() if attempts.exists() else ""
        return int(text) if text else 0

    def job_state() -> str:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f).get("JobState", "")

    _wait_for(lambda: attempt() == 1 and job_state() == "RUNNING", 60, "the first attempt to run")
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True)
    # Requeued jobs wait cred_expire + 1 s (10 + 1 here) before they may start again.
    _wait_for(lambda: job_state() == "COMPLETED", 60, f"job {job_id} to complete after requeue")
    assert attempt() == 2
    assert (tmp_path / "attempts.log").read_text().splitlines() == [
        "attempt 1 restart_count=0",
        "attempt 2 restart_count=1",
    ]


def test_start_is_idempotent_and_stop_ends_every_daemon(tmp_path):
    cluster = SlurmCluster(tmp_path / "own", gpus=1)
    with cluster:
        first = cluster.pids()
        assert set(first) == {"munged", "slurmctld", "slurmd"} and all(first.values())
        cluster.start()  # already running: must not start a second set of daemons
        assert cluster.pids() == first
        assert cluster.is_running()
    assert not cluster.is_running()
    for pid in first.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    cluster.stop()  # stopping a stopped cluster is fine


def test_command_line_start_env_status_stop(tmp_path, capsys):
    state = str(tmp_path / "cli")
    conf = f"export SLURM_CONF={tmp_path / 'cli' / 'slurm.conf'}"
    try:
        assert main(["start", "--dir", state, "--gpus", "2"]) == 0
        assert capsys.readouterr().out.strip() == conf
        assert main(["start", "--dir", state]) == 0  # no-op, prints the env again
        assert capsys.readouterr().out.strip() == conf
        assert main(["env", "--dir", state]) == 0
        assert capsys.readouterr().out.strip() == conf
        assert main(["status", "--dir", state]) == 0
        assert "localhost idle gpu:2" in capsys.readouterr().out
    finally:
        assert main(["stop", "--dir", state]) == 0
    assert main(["status", "--dir", state]) == 1
    assert main(["stop", "--dir", state]) == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [({"gpus": -1}, "gpus"), ({"cpus": 0}, "cpus"), ({"start_timeout": 0}, "start_timeout"), ({"cred_expire_s": 1}, "cred_expire_s")],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        SlurmCluster(tmp_path, **kwargs)


def test_missing_binaries_without_install_rights_say_what_to_install(monkeypatch):
    from cluster.testing import slurm_cluster as module

    monkeypatch.setattr(module, "missing_binaries", lambda: ["slurmctld", "munged"])
    with pytest.raises(module.SlurmSetupError, match=r"slurmctld, munged.*apt-get install -y slurm-wlm munge"):
        module.ensure_installed(allow_install=False)
