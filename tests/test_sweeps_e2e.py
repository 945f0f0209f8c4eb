"""End to end on a real local Ray and a real MLflow store: SIGKILL mid-sweep, --resume, de-dup, --force.

One tiny sweep (a 100-step teacher, two 40-step CTM trials, one at a time) is launched as
`python sweeps/launch.py FILE` in its own session, killed with SIGKILL once the first trial has
finished and the second has a checkpoint, then resumed; the later tests read the same store.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "sweeps" / "launch.py"
SMALL = {"model.hidden": 32, "model.depth": 2, "eval.num_samples": 200, "eval.teacher_steps": 4}
SWEEP = {
    "description": "end-to-end test sweep",
    "base": "configs/toy_ctm.yaml",
    "set": {**SMALL, "ctm.num_points": 8, "ctm.max_steps": 7, "eval.nfe": [1, 2], "data.batch_size": 32},
    "teacher": {"base": "configs/toy_teacher.yaml", "set": {**SMALL, "train.steps": 100}},
    "axes": {"loss.lambda_gan": ["off", "0.1@20"]},
    "seeds": [0],
    "metric": "eval/sw2/nfe1",
    "max_concurrent": 1,
    "budgets": {"smoke": {"set": {"train.steps": 40, "eval.every": 20, "train.ckpt_every": 20, "train.log_every": 10},
                          "resources": {"cpus": 1, "gpus": 0}}},
}


def _session_pids(sid: int) -> list[int]:
    """Processes of the session the launcher led (Ray's workers set their own process groups)."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # after the command: state ppid pgrp session ...
            pids.append(int(Path(stat).parent.name))
    return pids


def _kill_session(sid: int, timeout: float = 60.0) -> None:
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [p for p in _session_pids(sid) if p != os.getpid()]
        if not left:
            return
        for pid in left:  # stragglers that left the process group (e.g. idle Ray workers)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"processes of the killed launcher still alive: {_session_pids(sid)}")


def _tune_pointer_folders() -> set[Path]:
    """Temporary folders of the trainer-checkpoint pointers reported to Tune (shared /tmp: compare sets)."""
    return set(Path(tempfile.gettempdir()).glob("ctm-tune-ckpt-*"))


class Sweep:
    def __init__(self, base: Path):
        self.base = base
        self.file = base / "e2e.yaml"
        self.file.write_text(yaml.safe_dump(SWEEP))
        self.root = base / "runs"
        self.uri = f"sqlite:///{base}/mlflow.db"
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri, "PYTHONUNBUFFERED": "1"}

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, str(LAUNCH), str(self.file), "--root", str(self.root), *extra]

    def run(self, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*extra), cwd=self.base, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def runs(self, role: str | None = None) -> list:
        c = self.client()
        exp = c.get_experiment_by_name("ctm-lab")
        found = c.search_runs([exp.experiment_id], max_results=1000)
        return [r for r in found if role is None or r.data.tags.get("ctmlab.role") == role]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    sweep = Sweep(tmp_path_factory.mktemp("sweep_e2e"))
    pointers_before = _tune_pointer_folders()
    log = open(sweep.base / "first.log", "w")
    proc = subprocess.Popen(sweep.command(), cwd=sweep.base, env=sweep.env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    trials = sweep.root / "trials"
    started = time.time()
    deadline = started + 200
    try:
        while time.time() < deadline:
            done = [d for d in trials.glob("*") if (d / "final_metrics.json").exists()]
            midway = [d for d in trials.glob("*") if list(d.glob("ckpt_*.pt")) and not (d / "final_metrics.json").exists()]
            if done and midway:
                break
            assert proc.poll() is None, (sweep.base / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        else:
            raise AssertionError("the sweep never reached 'one trial finished, one mid-way'")
    finally:
        _kill_session(proc.pid)
        proc.wait()
        log.close()
    killed_at = time.time()
    finished_before = {d.name: (d / "final_metrics.json").stat().st_mtime for d in done}
    t0 = time.time()
    resumed = sweep.run("--resume")
    print(f"[timing] first launch until the kill {killed_at - started:.1f} s, resume {time.time() - t0:.1f} s")
    return sweep, resumed, killed_at, finished_before, [d.name for d in midway], pointers_before


def test_sigkill_then_resume_reruns_nothing_finished_and_duplicates_no_run(killed_and_resumed):
    sweep, resumed, killed_at, finished_before, midway, pointers_before = killed_and_resumed
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "resuming launch" in resumed.stdout
    # The trial that had finished before the kill was not trained again.
    for name, mtime in finished_before.items():
        assert (sweep.root / "trials" / name / "final_metrics.json").stat().st_mtime == mtime
    # The interrupted one continued from its checkpoint: its metrics log has each step once.
    records = [json.loads(line) for line in (sweep.root / "trials" / midway[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss_ctm" in r] == list(range(10, 41, 10))
    parents = sweep.runs("sweep")
    children = sweep.runs("trial")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    c = sweep.client()
    for run in children:  # no metric point was logged twice across the kill
        history = [m.step for m in c.get_metric_history(run.info.run_id, "train/loss_ctm")]
        assert history == sorted(set(history)) and history[-1] == 40
    # The final table is complete: both variants, one finished seed each, nothing missing.
    table = resumed.stdout[resumed.stdout.index("| loss.lambda_gan"):]
    rows = [line for line in table.splitlines() if line.startswith("| 0.1@20") or line.startswith("| off")]
    assert len(rows) == 2 and all("(1)" in row and "0/1" not in row for row in rows)
    # Tune copied each checkpoint pointer into its storage; no temporary folder of one is left behind.
    assert _tune_pointer_folders() <= pointers_before


def test_store_holds_the_contract_schema(killed_and_resumed):
    sweep = killed_and_resumed[0]
    c = sweep.client()
    parent = sweep.runs("sweep")[0]
    assert parent.data.tags["ctmlab.sweep"] == "e2e" and parent.data.params["budget"] == "smoke"
    for run in sweep.runs("trial"):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        axes = json.loads(tags["ctmlab.axes"])
        assert set(axes) == {"loss.lambda_gan"} and tags["ctmlab.variant"] == f"loss.lambda_gan={axes['loss.lambda_gan']}"
        assert tags["ctmlab.seed"] == "0" and len(tags["ctmlab.config_hash"]) == 12
        assert tags["ctmlab.git_commit"] and tags["ctmlab.git_dirty"] in ("true", "false") and tags["ctmlab.host"]
        assert tags["ctmlab.ray_trial_id"]
        assert params["optim.lr"] == "0.0004" and params["model.hidden"] == "32" and params["ctm.num_points"] == "8"
        assert "loss.lambda_gan.value" in params and params["mode"] == "ctm"
        for key in ("eval/sw2/nfe1", "eval/sw2/nfe2", "eval/sw2/teacher_nfe7", "best/eval/sw2/nfe1", "train/loss_ctm"):
            assert key in metrics, key
        assert [m.step for m in c.get_metric_history(run.info.run_id, "eval/sw2/nfe1")] == [20, 40]
        artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "final_metrics.json", "samples"} <= artifacts
        pngs = [a.path for a in c.list_artifacts(run.info.run_id, "samples")]
        assert len(pngs) == 2 and all(p.endswith(".png") for p in pngs)
        config = yaml.safe_load(Path(c.download_artifacts(run.info.run_id, "config.yaml", str(sweep.base))).read_text())
        assert config["loss"]["lambda_gan"]["value"] == (0.0 if axes["loss.lambda_gan"] == "off" else 0.1)


def _computed(runs: list) -> list:
    return [r for r in runs if "ctmlab.reused_from" not in r.data.tags]


def test_relaunch_skips_finished_configs_and_force_reruns_them(killed_and_resumed):
    from analysis import load_runs

    sweep = killed_and_resumed[0]
    before = {r.info.run_id for r in sweep.runs("trial")}
    t0 = time.time()
    again = sweep.run()
    t1 = time.time()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("already FINISHED as MLflow run") == 2 and "0 trial(s) to run, 2 skipped" in again.stdout
    assert {r.info.run_id for r in _computed(sweep.runs("trial"))} == before  # nothing trained again
    assert "| off" in again.stdout  # the table is built from the reused runs
    newest = max(sweep.runs("sweep"), key=lambda r: r.info.start_time)
    assert set(json.loads(newest.data.tags["ctmlab.reused_runs"]).values()) == before
    # The relaunch shows its trials as copies under its own parent: same params and histories.
    copies = [r for r in sweep.runs("trial") if r.data.tags["mlflow.parentRunId"] == newest.info.run_id]
    assert len(copies) == 2 and {r.data.tags["ctmlab.reused_from"] for r in copies} == before
    c = sweep.client()
    for copy in copies:
        origin = c.get_run(copy.data.tags["ctmlab.reused_from"])
        assert copy.info.status == "FINISHED" and copy.data.params == origin.data.params
        assert copy.data.metrics == origin.data.metrics
        assert [(m.step, m.value) for m in c.get_metric_history(copy.info.run_id, "eval/sw2/nfe1")] == \
            [(m.step, m.value) for m in c.get_metric_history(origin.info.run_id, "eval/sw2/nfe1")]
    # ... and analysis counts every trial once: the copies stand in only for this launch's view.
    assert sorted(load_runs(sweep="e2e", tracking_uri=sweep.uri)["run_id"]) == sorted(before)
    launch = load_runs(sweep="e2e", tracking_uri=sweep.uri, parent_run_id=newest.info.run_id)
    assert len(launch) == 2 and launch.attrs["reused"] == 2

    forced = sweep.run("--force", "--max-concurrent", "2")
    print(f"[timing] relaunch (all skipped) {t1 - t0:.1f} s, --force {time.time() - t1:.1f} s")
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    trials = _computed(sweep.runs("trial"))
    assert len(trials) == 4 and {r.info.status for r in trials} == {"FINISHED"}
    newest = max(sweep.runs("sweep"), key=lambda r: r.info.start_time)
    fresh = [r for r in trials if r.data.tags["mlflow.parentRunId"] == newest.info.run_id]
    assert len(fresh) == 2 and not ({r.info.run_id for r in fresh} & before)
    assert len(list((sweep.root / "trials").glob("*.old-*"))) == 2  # the earlier out dirs were kept, aside


def test_another_sweep_reusing_a_trial_lists_it_under_its_own_name(killed_and_resumed, tmp_path):
    """A sweep whose trial was computed by another sweep: load_runs(sweep=...), the table and the
    sample montage all see it under the new sweep's name, with the original's numbers and PNGs."""
    from analysis import load_runs, plot_sample_grid

    sweep = killed_and_resumed[0]
    other = sweep.base / "e2e_other.yaml"
    other.write_text(yaml.safe_dump({**SWEEP, "axes": {"loss.lambda_gan": ["0.1@20"]}}))
    result = subprocess.run([sys.executable, str(LAUNCH), str(other), "--root", str(sweep.root)], cwd=sweep.base,
                            env=sweep.env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 trial(s) to run, 1 skipped" in result.stdout and "(sweep e2e)" in result.stdout
    assert "| 0.1@20" in result.stdout
    df = load_runs(sweep="e2e_other", tracking_uri=sweep.uri)
    assert len(df) == 1 and df.attrs["reused"] == 1
    row = df.iloc[0]
    assert row["tag.ctmlab.sweep"] == "e2e_other" and row["tag.ctmlab.variant"] == "loss.lambda_gan=0.1@20"
    origin = sweep.client().get_run(row["tag.ctmlab.reused_from"])
    assert origin.data.tags["ctmlab.sweep"] == "e2e"
    assert row["metric.eval/sw2/nfe1"] == origin.data.metrics["eval/sw2/nfe1"]
    assert row["best.eval/sw2/nfe1"] == origin.data.metrics["best/eval/sw2/nfe1"]
    fig = plot_sample_grid(df, out=tmp_path / "montage")  # the copy's PNGs are the original's
    assert (tmp_path / "montage.png").stat().st_size > 1000 and len(fig.axes) == 1
