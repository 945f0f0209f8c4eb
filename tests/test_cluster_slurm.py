"""`launch.py --backend slurm` on a real single-node SLURM (cluster/testing): no mocks.

Trials run on CPU; the node declares fake GPUs so `--gpus-per-node` schedules, and a 2-"GPU"
trial runs as two SLURM tasks joined by gloo DDP. MLflow is a sqlite store in the test's temp dir.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cluster.testing.conftest_slurm import slurm_cluster  # noqa: F401  (session fixture)


TINY = """\
name: {name}
description: tiny EDM sweep for the SLURM tests
set:
  mode: edm
  data.spec: toy:gmm2d_8
  data.batch_size: {batch}
  model.arch: mlp
  model.hidden: {hidden}
  model.depth: 2
  model.emb_dim: 16
  eval.every: 0
  eval.nfe: [1]
  eval.teacher_steps: 4
  eval.num_samples: 200
  train.steps: {steps}
  train.log_every: {log_every}
  train.ckpt_every: {ckpt_every}
axes:
  optim.lr: {lrs}
seeds: {seeds}
metric: train/loss_dsm
resources: {{cpus: 1, gpus: {gpus}}}
"""


def _sweep_file(tmp_path: Path, name: str, **kw) -> Path:
    values = dict(name=name, batch=32, hidden=32, steps=30, log_every=10, ckpt_every=10, lrs="[0.001]", seeds="[0]",
                  gpus=0)
    values.update(kw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(**values))
    return path


def _launch(capsys, *args: str) -> str:
    """`python sweeps/launch.py ARGS` in this process (its main(), saving an interpreter start-up);
    the SLURM_CONF the fixture exported reaches sbatch/squeue as it would from a shell."""
    from sweeps.launch import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, f"launch.py {' '.join(args)} exited {code}:\n{out.out}\n{out.err}"
    return out.out


def _squeue(*args: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", *args], capture_output=True, text=True, timeout=30)
    return out.stdout.split() if out.returncode == 0 else []


def _wait_for(predicate, timeout: float, what: str, on_fail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{on_fail()}")
        time.sleep(0.5)


def _logs(folder: Path) -> str:
    parts = []
    for path in sorted(folder.glob("*_log.*"))[-6:]:
        parts.append(f"--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(parts)


def _jobs_record(root: Path) -> dict:
    return json.loads((root / "slurm_jobs.json").read_text())["submissions"][-1]


def _job_state(job_id: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", ""), fields.get("Restarts", "")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, sweep: str) -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name("ctm-lab")
    return client.search_runs([exp.experiment_id], f"tags.`ctmlab.sweep` = '{sweep}'", max_results=1000)


class _RunningPeak(threading.Thread):
    """Polls squeue for the array's RUNNING tasks; `peak` is the most seen at once."""

    def __init__(self, array_id: str):
        super().__init__(daemon=True)
        self.array_id, self.peak, self.samples, self._halt = array_id, 0, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            running = [j for j in _squeue("-t", "RUNNING", "-o", "%i") if j.startswith(f"{self.array_id}_")]
            self.peak, self.samples = max(self.peak, len(running)), self.samples + 1
            time.sleep(0.3)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def test_launch_smoke_sweep_on_slurm_finishes_every_trial_within_the_array_limit(slurm_cluster, tmp_path, capsys):
    sweep = _sweep_file(tmp_path, "slurm_smoke", lrs="[0.001, 0.002, 0.003]")   # 3 trials, at most 2 at once
    root, uri = tmp_path / "root", f"sqlite:///{tmp_path / 'mlflow.db'}"
    stdout = _launch(capsys, str(sweep), "--budget", "smoke", "--backend", "slurm", "--profile", "local",
                     "--root", str(root), "--tracking-uri", uri, "--max-concurrent", "2")
    record = _jobs_record(root)
    (array_id,) = record["array_job_ids"]
    peak = _RunningPeak(array_id)
    peak.start()
    assert f"as job(s) {array_id} (at most 2 at once)" in stdout
    assert [j["job_id"] for j in record["jobs"]] == [f"{array_id}_{i}" for i in range(3)]
    # Launching again while the array is queued/running would put two jobs on one out_dir: refused.
    with pytest.raises(SystemExit) as refused:
        _launch(capsys, str(sweep), "--budget", "smoke", "--backend", "slurm", "--profile", "local",
                "--root", str(root), "--tracking-uri", uri)
    assert refused.value.code == 2 and "still queued or running" in capsys.readouterr().err

    def all_done() -> bool:
        gone = not [j for j in _squeue("-o", "%i") if j.split("_")[0] in (array_id, record["finalize_job_id"])]
        return gone and all((Path(j["out_dir"]) / "final_metrics.json").is_file() for j in record["jobs"])

    try:
        _wait_for(all_done, 240, "the array and its finalizer to finish", lambda: _logs(root / "slurm"))
    finally:
        peak.stop()

    # Every trial is one FINISHED child run of the launch's parent, tagged with its array task.
    runs = _runs(uri, "slurm_smoke")
    trials = [r for r in runs if r.data.tags.get("ctmlab.role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("ctmlab.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_id == record["parent_run_id"]
    assert sorted(r.data.tags["ctmlab.slurm_job_id"] for r in trials) == [f"{array_id}_{i}" for i in range(3)]
    assert all(r.info.status == "FINISHED" for r in trials), [r.info.status for r in trials]
    assert all(r.data.tags["mlflow.parentRunId"] == record["parent_run_id"] for r in trials)
    assert all(r.data.metrics.get("train/loss_dsm") is not None for r in trials)
    # The finalizer job (afterany on the array) closed the parent run.
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["ctmlab.trials_finished"] == "3/3"

    # %K: never more than 2 array tasks RUNNING at once (squeue, polled), and the trials' own
    # start/end times agree.
    assert peak.samples > 20 and 1 <= peak.peak <= 2, (peak.peak, peak.samples)
    spans = []
    for job in record["jobs"]:
        start = json.loads((Path(job["out_dir"]) / "slurm_attempts.jsonl").read_text().splitlines()[0])["time"]
        spans.append((start, (Path(job["out_dir"]) / "final_metrics.json").stat().st_mtime))
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running, most = 0, 0
    for _, delta in events:
        running += delta
        most = max(most, running)
    assert most <= 2

    status = _launch(capsys, "status", str(sweep), "--budget", "smoke", "--root", str(root))
    assert status.count("COMPLETED") == 3 + 1 and "3 trials: 3 COMPLETED" in status   # rows + summary line
    assert all(f"{array_id}_{i}" in status for i in range(3)) and "30/30" in status


def test_requeued_ddp_trial_resumes_from_its_checkpoint_in_the_same_mlflow_run(slurm_cluster, tmp_path, capsys):
    """Two interruptions of one 2-task DDP trial: `scontrol requeue` (as an admin or preemption would),
    then SIGUSR2 (what SLURM sends before the time limit), which goes through submitit's handler:
    TrialJob.checkpoint() resubmits the trial and the job requeues itself."""
    # submitit ignores the SIGTERM of `scontrol requeue`, so an attempt trains on for KillWait (5 s) before
    # SIGKILL: the trial must outlast that by far, or the first attempt finishes (~100 steps/s here).
    steps, log_every, ckpt_every = 3000, 20, 25
    sweep = _sweep_file(tmp_path, "slurm_requeue", batch=64, hidden=32, steps=steps, log_every=log_every,
                        ckpt_every=ckpt_every, gpus=2)
    root, uri = tmp_path / "root", f"sqlite:///{tmp_path / 'mlflow.db'}"
    _launch(capsys, str(sweep), "--budget", "smoke", "--backend", "slurm", "--profile", "local",
            "--root", str(root), "--tracking-uri", uri)
    record = _jobs_record(root)
    (job,) = record["jobs"]
    job_id, out_dir = job["job_id"], Path(job["out_dir"])
    assert "_" not in job_id            # one trial: a plain job, not an array

    from ctm_core.checkpoint import list_checkpoints

    def attempts() -> list[dict]:
        path = out_dir / "slurm_attempts.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def newest_ckpt() -> int:
        found = list_checkpoints(out_dir)
        return found[-1][0] if found else 0

    # 1. scontrol requeue once the first attempt has a checkpoint.
    _wait_for(lambda: _job_state(job_id)[0] == "RUNNING" and newest_ckpt() > 0, 120,
              "the trial to run and write its first checkpoint", lambda: _logs(root / "slurm"))
    first_ckpt = newest_ckpt()
    assert 0 < first_ckpt < steps
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True)
    # 2. SIGUSR2 as soon as the second attempt trains (signalled at once, so it cannot finish first).
    _wait_for(lambda: len(attempts()) == 2 and _job_state(job_id)[0] == "RUNNING", 150,
              "the requeued attempt to start", lambda: _logs(root / "slurm"))
    second_ckpt = newest_ckpt()
    assert second_ckpt < steps, "the trial finished before it could be signalled; raise `steps`"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, capture_output=True)
    _wait_for(lambda: (out_dir / "final_metrics.json").is_file() and job_id not in _squeue("-o", "%i"), 240,
              "the twice-interrupted trial to finish", lambda: _logs(root / "slurm"))

    runs = attempts()
    assert [a["restart_count"] for a in runs] == [0, 1, 2] and all(a["world_size"] == 2 for a in runs)
    assert runs[0]["start_step"] == 0 and runs[0]["resumed_from"] is None
    assert runs[1]["start_step"] >= first_ckpt and runs[2]["start_step"] >= second_ckpt   # resumed, not restarted
    for a in runs[1:]:
        assert a["start_step"] % ckpt_every == 0 and a["resumed_from"].endswith(f"ckpt_{a['start_step']:09d}.pt")
    assert json.loads((out_dir / "final_metrics.json").read_text())["step"] == steps
    logs = "\n".join(p.read_text(errors="replace") for p in (root / "slurm").glob(f"{job_id}_0_log.*"))
    assert "this job is preempted" in logs and "Exiting gracefully after preemption/timeout" in logs
    assert _job_state(job_id)[1] in ("2", "")   # Restarts=2 while slurmctld still lists the job

    trials = [r for r in _runs(uri, "slurm_requeue") if r.data.tags.get("ctmlab.role") == "trial"]
    assert len(trials) == 1, "a requeued trial must continue its MLflow run, not start a second one"
    run = trials[0]
    assert run.info.status == "FINISHED" and run.data.tags["ctmlab.slurm_job_id"] == job_id
    history = _client(uri).get_metric_history(run.info.run_id, "train/loss_dsm")
    assert sorted(m.step for m in history) == list(range(log_every, steps + 1, log_every))   # each step once


def test_slurm_ray_runs_the_tune_sweep_on_a_private_ray_cluster_in_one_allocation(slurm_cluster, tmp_path, capsys):
    from cluster.slurm_ray import ray_ports, ray_temp_dir

    sweep = _sweep_file(tmp_path, "slurm_ray_smoke", lrs="[0.001, 0.002]")
    root, uri = tmp_path / "root", f"sqlite:///{tmp_path / 'mlflow.db'}"
    stdout = _launch(capsys, str(sweep), "--budget", "smoke", "--backend", "slurm-ray", "--profile", "local",
                     "--root", str(root), "--tracking-uri", uri, "--max-concurrent", "2")
    record = _jobs_record(root)
    job_id = record["ray_job_id"]
    assert f"submitted Ray allocation {job_id} for 2 trial(s)" in stdout
    assert [j["job_id"] for j in record["jobs"]] == [job_id, job_id]
    log = root / "slurm-ray" / f"{job_id}.out"
    _wait_for(lambda: job_id not in _squeue("-o", "%i"), 300, "the Ray allocation to finish",
              lambda: "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else "(no log)")

    text = log.read_text(errors="replace")
    assert "Ray runtime started" in text and f":{ray_ports(job_id)['gcs']}" in text   # the job's own port block
    assert not Path(ray_temp_dir(job_id)).exists()                                     # its temp dir is cleaned up
    runs = _runs(uri, "slurm_ray_smoke")
    trials = [r for r in runs if r.data.tags.get("ctmlab.role") == "trial"]
    (parent,) = [r for r in runs if r.data.tags.get("ctmlab.role") == "sweep"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials), [r.info.status for r in trials]
    assert all(r.data.tags["ctmlab.slurm_job_id"] == job_id and r.data.tags.get("ctmlab.ray_trial_id") for r in trials)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert parent.info.status == "FINISHED" and parent.data.tags["ctmlab.backend"] == "slurm-ray"
    status = _launch(capsys, "status", str(sweep), "--budget", "smoke", "--root", str(root))
    assert "2 trials: 2 COMPLETED" in status


# The student and its teacher share the data, the network and the evaluation (a student loads its
# teacher's weights); each adds its own lines.
_SHARED = ["data.spec: toy:gmm2d_8", "data.batch_size: 32", "model.arch: mlp", "model.hidden: 32", "model.depth: 2",
           "model.emb_dim: 16", "eval.every: 0", "eval.nfe: [1]", "eval.teacher_steps: 4", "eval.num_samples: 200"]
TEACHER_SWEEP = "\n".join([
    "name: {name}",
    "description: tiny CTM sweep with its own EDM teacher, for the SLURM tests",
    "set:",
    *(f"  {line}" for line in ["mode: ctm", *_SHARED, "ctm.num_points: 8", "ctm.max_steps: 7", "train.steps: 20",
                               "train.log_every: 10", "train.ckpt_every: 10"]),
    "teacher:",
    "  set:",
    *(f"    {line}" for line in [*_SHARED, "train.steps: 40", "train.log_every: 20", "train.ckpt_every: 20"]),
    "axes:",
    "  optim.lr: [0.001]",
    "seeds: [0]",
    "metric: train/loss_ctm",
    "resources: {{cpus: 1, gpus: 0}}",
    "",
])


def _ray_log(root: Path, job_id: str):
    log = root / "slurm-ray" / f"{job_id}.out"
    return lambda: "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else "(no log)"


def _wait_for_ray_job(root: Path, job_id: str, timeout: float = 300) -> None:
    _wait_for(lambda: job_id not in _squeue("-o", "%i"), timeout, f"Ray allocation {job_id} to finish",
              _ray_log(root, job_id))


def test_slurm_ray_trains_the_sweeps_teacher_before_its_trials(slurm_cluster, tmp_path, capsys):
    """The trials wait for the teacher (sweeps.trial.wait_for_teacher): the allocation's driver trains it
    first, with the --set items of the launch, instead of leaving the trials polling for ever."""
    from sweeps.spec import load_sweep

    sweep = tmp_path / "ray_teacher.yaml"
    sweep.write_text(TEACHER_SWEEP.format(name="ray_teacher"))
    root, uri = tmp_path / "root", f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A --set item shared with the teacher changes the teacher (its hash and out_dir): the driver must
    # build the plan with it, or it trains one teacher while the trials wait for another.
    stdout = _launch(capsys, str(sweep), "--budget", "smoke", "--backend", "slurm-ray", "--profile", "local",
                     "--root", str(root), "--tracking-uri", uri, "--set", "data.batch_size=16")
    job_id = _jobs_record(root)["ray_job_id"]
    assert f"submitted Ray allocation {job_id}" in stdout
    plan = load_sweep(str(sweep)).plan("smoke", ["data.batch_size=16"], root)
    teacher_dir = Path(plan.teacher_config.runtime.out_dir)
    assert teacher_dir != Path(load_sweep(str(sweep)).plan("smoke", [], root).teacher_config.runtime.out_dir)
    _wait_for_ray_job(root, job_id, 240)

    from ctm_core.checkpoint import list_checkpoints

    assert list_checkpoints(teacher_dir)[-1][0] == 40
    assert "teacher: training" in (root / "slurm-ray" / f"{job_id}.out").read_text(errors="replace")
    trials = [r for r in _runs(uri, "ray_teacher") if r.data.tags.get("ctmlab.role") == "trial"]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED", [r.info.status for r in trials]
    assert trials[0].data.params["teacher.checkpoint"] == str(teacher_dir)


def test_slurm_ray_refuses_a_second_allocation_while_the_first_is_queued_or_running(slurm_cluster, tmp_path,
                                                                                     capsys):
    sweep = _sweep_file(tmp_path, "ray_twice", steps=3000, ckpt_every=500)
    root, uri = tmp_path / "root", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = (str(sweep), "--budget", "smoke", "--backend", "slurm-ray", "--profile", "local", "--root", str(root),
            "--tracking-uri", uri)
    _launch(capsys, *args)
    job_id = _jobs_record(root)["ray_job_id"]
    try:
        with pytest.raises(SystemExit) as refused:
            _launch(capsys, *args)
        err = capsys.readouterr().err
        assert refused.value.code == 2 and "still queued or running" in err and f"job {job_id}" in err
        assert len(json.loads((root / "slurm_jobs.json").read_text())["submissions"]) == 1   # nothing submitted
        assert len(list((root / "slurm-ray").glob("*/job.sh"))) == 1
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
        _wait_for(lambda: job_id not in _squeue("-t", "PENDING,RUNNING,COMPLETING", "-o", "%i"), 60,
                  "the cancelled allocation to leave the queue")


def test_a_later_slurm_ray_launch_runs_its_own_tune_experiment(slurm_cluster, tmp_path, capsys):
    """Each submission has its own Tune experiment (a requeued allocation restores its own): a second
    launch must run its trials, not restore the first launch's finished experiment."""
    root, uri = tmp_path / "root", f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents = []
    for lr in ("0.001", "0.002"):
        sweep = _sweep_file(tmp_path, "ray_again", lrs=f"[{lr}]")
        _launch(capsys, str(sweep), "--budget", "smoke", "--backend", "slurm-ray", "--profile", "local",
                "--root", str(root), "--tracking-uri", uri)
        record = _jobs_record(root)
        _wait_for_ray_job(root, record["ray_job_id"])
        parents.append(record["parent_run_id"])
        out_dir = Path(record["jobs"][0]["out_dir"])
        assert json.loads((out_dir / "final_metrics.json").read_text())["step"] == 30, f"lr {lr} did not run"
    runs = _runs(uri, "ray_again")
    trials = [r for r in runs if r.data.tags.get("ctmlab.role") == "trial"]
    assert sorted(r.data.params["optim.lr"] for r in trials) == ["0.001", "0.002"]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags.get("ctmlab.role"), r.info.status) for r in runs]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == set(parents)
    assert len(list((root / "tune").iterdir())) == 2          # one Tune experiment per submission


def test_force_on_slurm_moves_a_finished_trials_out_dir_aside_and_trains_it_again(slurm_cluster, tmp_path, capsys):
    """--force re-runs a FINISHED config. Left in place, its out_dir would make the job resume at the last
    step, train nothing and pull the old MLflow run over to the new launch."""
    sweep = _sweep_file(tmp_path, "slurm_force")
    root, uri = tmp_path / "root", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = (str(sweep), "--budget", "smoke", "--backend", "slurm", "--profile", "local", "--root", str(root),
            "--tracking-uri", uri)
    records = []
    for extra in ((), ("--force",)):
        stdout = _launch(capsys, *args, *extra)
        record = _jobs_record(root)
        records.append(record)
        job = record["jobs"][0]
        _wait_for(lambda: not [j for j in _squeue("-o", "%i") if j.split("_")[0] in
                               (job["array_job_id"], record["finalize_job_id"])], 180,
                  "the trial and its finalizer to finish", lambda: _logs(root / "slurm"))
    assert "moved its out dir aside" in stdout
    out_dir = Path(records[1]["jobs"][0]["out_dir"])
    (old,) = out_dir.parent.glob(f"{out_dir.name}.old-*")
    assert (old / "final_metrics.json").is_file() and (out_dir / "final_metrics.json").is_file()
    attempts = [json.loads(line) for line in (out_dir / "slurm_attempts.jsonl").read_text().splitlines()]
    assert [a["start_step"] for a in attempts] == [0]              # trained from scratch, not resumed at 30
    trials = [r for r in _runs(uri, "slurm_force") if r.data.tags.get("ctmlab.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert sorted(r.data.tags["mlflow.parentRunId"] for r in trials) == sorted(r["parent_run_id"] for r in records)
