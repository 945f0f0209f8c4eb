"""MLflow for sweeps: where the store is, the parent run of a launch, and the trainer callback
that turns one trial into one nested child run (the schema in the project contract).

Why a trainer callback rather than logging from the driver: the callback runs next to the
trainer wherever it runs (a Ray worker, a SLURM task) and its state (the run id, the best value
of every eval metric) travels inside the trainer's checkpoints, so a trial that crashes, is
requeued or is resumed continues *the same* run, and points it already logged are not logged twice.
"""
from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse
from typing import Any, Callable, Iterable, TypeVar

import yaml

from ctm_core.config import config_to_dict, flatten
from ctm_core.train import Callback, RunInfo, TrainResult

from .spec import REPO_ROOT, Trial

DEFAULT_EXPERIMENT = "ctm-lab"
TAG = "ctmlab."
PARENT_TAG = "mlflow.parentRunId"
REUSED_FROM = f"{TAG}reused_from"  # on a trial run that stands for an earlier run of the same config
T = TypeVar("T")
_SCHEMELESS_URIS = ("databricks",)  # MLflow tracking URIs that are not paths although they have no scheme


# ----------------------------------------------------------------------------------------------
# The store


def resolve_tracking_uri(explicit: str | None = None, from_spec: str | None = None) -> str:
    """--tracking-uri > $MLFLOW_TRACKING_URI > the sweep file's tracking.uri > ./mlflow.db.

    The default is the SQLite store `mlflow ui` opens when started in the same folder; it is made
    absolute so that workers with another working directory write to the same store.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or from_spec or "sqlite:///mlflow.db"
    parsed = urlparse(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif parsed.scheme == "file" and not parsed.netloc and not Path(parsed.path).is_absolute():
        uri = "file://" + str(Path(parsed.path).resolve())  # file:./mlruns
    elif parsed.scheme == "" and uri not in _SCHEMELESS_URIS:  # a plain folder: MLflow's file store
        uri = str(Path(uri).resolve())
    return uri


def retry(fn: Callable[[], T], attempts: int = 8, what: str = "mlflow call") -> T:
    """SQLite stores refuse concurrent writers for a moment ('database is locked'): wait and retry."""
    delay = 0.2
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 -- MLflow wraps SQLAlchemy errors in several types
            text = str(err).lower()
            transient = "locked" in text or "busy" in text or "temporarily unavailable" in text or \
                "connection" in text
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=8)
def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, created (race-safely) when missing."""
    c = client(uri)
    found = retry(lambda: c.get_experiment_by_name(name))
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted in {uri}; restore it or pick another name")
        return found.experiment_id
    try:
        return retry(lambda: c.create_experiment(name))
    except Exception:  # another process created it first
        found = retry(lambda: c.get_experiment_by_name(name))
        if found is None:
            raise
        return found.experiment_id


@functools.lru_cache(maxsize=1)
def git_info() -> dict[str, str]:
    """Commit and dirty flag of the checkout the code runs from ('unknown' outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": str(dirty).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown"}


def common_tags() -> dict[str, str]:
    git = git_info()
    tags = {f"{TAG}git_commit": git["commit"], f"{TAG}git_dirty": git["dirty"], f"{TAG}host": socket.gethostname()}
    if os.environ.get("SLURM_JOB_ID"):
        job = os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        tags[f"{TAG}slurm_job_id"] = job
    return tags


def param_value(value: Any) -> str:
    """Params as strings analysis.parse_param_value reads back (lists as JSON)."""
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text[:6000]


def trial_params(trial: Trial) -> dict[str, str]:
    return {k: param_value(v) for k, v in flatten(config_to_dict(trial.config)).items()}


def trial_tags(trial: Trial, parent_run_id: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    tags = {
        f"{TAG}sweep": trial.sweep,
        f"{TAG}role": "trial",
        f"{TAG}config_hash": trial.config_hash,
        f"{TAG}seed": str(trial.seed),
        f"{TAG}variant": trial.variant,
        f"{TAG}axes": json.dumps(trial.axes),
        f"{TAG}budget": trial.budget,
        f"{TAG}trial_index": str(trial.index),
        f"{TAG}out_dir": str(trial.out_dir),
        "mlflow.runName": trial.name,
        **common_tags(),
    }
    if trial.teacher_hash:
        tags[f"{TAG}teacher_hash"] = trial.teacher_hash
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def log_params_and_tags(uri: str, run_id: str, params: dict[str, str], tags: dict[str, str]) -> None:
    from mlflow.entities import Param, RunTag

    c = client(uri)
    plist = [Param(k, v) for k, v in params.items()]
    tlist = [RunTag(k, v) for k, v in tags.items()]
    for chunk in _batches(plist, 100):
        retry(lambda: c.log_batch(run_id, params=chunk))
    for chunk in _batches(tlist, 100):
        retry(lambda: c.log_batch(run_id, tags=chunk))


def log_metrics(uri: str, run_id: str, step: int, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    c = client(uri)
    for chunk in _batches(items, 1000):
        retry(lambda: c.log_batch(run_id, metrics=chunk))


# ----------------------------------------------------------------------------------------------
# Runs of a sweep


def start_parent_run(uri: str, experiment_id: str, sweep: str, budget: str, run_name: str,
                     params: dict[str, Any], tags: dict[str, str]) -> str:
    c = client(uri)
    all_tags = {f"{TAG}sweep": sweep, f"{TAG}role": "sweep", f"{TAG}budget": budget, "mlflow.runName": run_name,
                **common_tags(), **tags}
    run = retry(lambda: c.create_run(experiment_id, tags=all_tags, run_name=run_name))
    log_params_and_tags(uri, run.info.run_id, {k: param_value(v) for k, v in params.items()}, {})
    return run.info.run_id


def set_status(uri: str, run_id: str, status: str) -> None:
    c = client(uri)
    if status == "RUNNING":
        retry(lambda: c.update_run(run_id, status="RUNNING"))
    else:
        retry(lambda: c.set_terminated(run_id, status))


def _search(uri: str, experiment_id: str, filter_string: str) -> list:
    from mlflow.entities import ViewType

    c = client(uri)
    runs, token = [], None
    while True:
        page = retry(lambda: c.search_runs([experiment_id], filter_string, ViewType.ACTIVE_ONLY, 1000,
                                           ["attributes.start_time DESC"], token))
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def finished_runs(uri: str, experiment_id: str, hashes: Iterable[str]) -> dict[str, Any]:
    """{config_hash: newest FINISHED trial run} for the hashes that have one in the experiment."""
    wanted = set(hashes)
    if not wanted:
        return {}
    out: dict[str, Any] = {}
    base = f"attributes.status = 'FINISHED' and tags.`{TAG}role` = 'trial'"
    if len(wanted) <= 4:  # a trial asking about itself: one indexed look-up instead of a scan
        for h in sorted(wanted):
            found = _search(uri, experiment_id, f"{base} and tags.`{TAG}config_hash` = '{h}'")
            if found:
                out[h] = found[0]
        return out
    for run in _search(uri, experiment_id, base):
        h = run.data.tags.get(f"{TAG}config_hash")
        if h in wanted and h not in out:
            out[h] = run
    return out


def children(uri: str, experiment_id: str, parent_run_id: str) -> list:
    return _search(uri, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def record_reused(uri: str, experiment_id: str, parent_run_id: str, trials: Iterable[Trial],
                  reused: dict[str, Any]) -> dict[str, str]:
    """Give every trial answered by an earlier FINISHED run a FINISHED child run of this launch.

    Why a copy rather than a pointer: the launch's parent then shows the whole sweep in the MLflow
    UI, and ``load_runs(sweep=...)`` finds the trial under this sweep's name, axes and seed even when
    the earlier run belonged to another sweep. The copy holds the trial's tags, the source's params
    and full metric histories (steps and timestamps kept) and ``ctmlab.reused_from`` = the original
    run (never a copy), by which analysis drops a copy whose original it already has. Idempotent:
    a trial that already has its copy under this parent is left alone. Returns {config_hash: run id}.
    """
    from mlflow.entities import Metric

    c = client(uri)
    have = {r.data.tags.get(f"{TAG}config_hash"): r.info.run_id
            for r in children(uri, experiment_id, parent_run_id) if REUSED_FROM in r.data.tags}
    for trial in trials:
        source = reused.get(trial.config_hash)
        if source is None or trial.config_hash in have:
            continue
        origin = source.data.tags.get(REUSED_FROM, source.info.run_id)
        kept = {k: v for k, v in source.data.tags.items() if k in (f"{TAG}out_dir", f"{TAG}world_size")}
        tags = trial_tags(trial, parent_run_id, {**kept, REUSED_FROM: origin})
        run = retry(lambda: c.create_run(experiment_id, start_time=source.info.start_time, tags=tags,
                                         run_name=trial.name))
        run_id = run.info.run_id
        log_params_and_tags(uri, run_id, dict(source.data.params), {})
        # key, value, timestamp, step only: the source's run (and model) ids must not travel with them
        history = [Metric(m.key, m.value, m.timestamp, m.step) for key in source.data.metrics
                   for m in retry(lambda key=key: c.get_metric_history(source.info.run_id, key))]
        for chunk in _batches(history, 1000):
            retry(lambda: c.log_batch(run_id, metrics=chunk))
        retry(lambda: c.set_terminated(run_id, "FINISHED", end_time=source.info.end_time))
        have[trial.config_hash] = run_id
    return have


def _metric_watermarks(uri: str, run_id: str) -> dict[str, int]:
    """The last step already logged for every metric of a run (what a resumed trial must not repeat)."""
    c = client(uri)
    run = retry(lambda: c.get_run(run_id))
    marks = {}
    for key in run.data.metrics:
        history = retry(lambda: c.get_metric_history(run_id, key))
        if history:
            marks[key] = max(m.step for m in history)
    return marks


# ----------------------------------------------------------------------------------------------
# The trainer callback


class MlflowTrialCallback(Callback):
    """One nested child run per trial: params, tags, metrics by step, sample PNGs, final metrics.

    state_dict() carries the run id and the running best of each eval metric inside every trainer
    checkpoint; a resumed trial reopens that run (re-attached to the current parent run) instead of
    creating a second one. A trial killed before its first checkpoint is found again by its config
    hash under the same parent.
    """

    def __init__(self, trial: Trial, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT,
                 parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None):
        self.trial = trial
        self.uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.extra_tags = dict(extra_tags or {})
        self.run_id: str | None = None
        self.best: dict[str, list[float]] = {}        # key -> [value, step]
        self.watermarks: dict[str, int] = {}
        self.already_finished = False
        self.resumed = False

    # -- state travelling in checkpoints -----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "best": self.best, "experiment": self.experiment, "tracking_uri": self.uri}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("run_id") and state.get("tracking_uri", self.uri) == self.uri:
            self.run_id = state["run_id"]
            self.best = {k: list(v) for k, v in state.get("best", {}).items()}

    # -- hooks -------------------------------------------------------------------------------
    def _reopen(self, experiment_id: str) -> bool:
        """Continue the run named by the checkpoint, or an unfinished run of this trial under this parent."""
        from mlflow.exceptions import MlflowException

        c = client(self.uri)
        run = None
        if self.run_id:
            try:
                run = retry(lambda: c.get_run(self.run_id))
            except MlflowException:
                run = None
            if run is not None and (run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active"):
                run = None
        if run is None and self.parent_run_id:
            found = _search(self.uri, experiment_id,
                            f"tags.`{TAG}config_hash` = '{self.trial.config_hash}' and "
                            f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'")
            found = [r for r in found if r.info.status != "FINISHED"] or found
            run = found[0] if found else None
        if run is None:
            self.run_id = None
            return False
        self.run_id = run.info.run_id
        self.already_finished = run.info.status == "FINISHED"
        updates = {k: v for k, v in trial_tags(self.trial, self.parent_run_id, self.extra_tags).items()
                   if run.data.tags.get(k) != v and not k.endswith(("git_commit", "git_dirty", "host"))}
        if updates:
            log_params_and_tags(self.uri, self.run_id, {}, updates)
        if not self.already_finished:
            set_status(self.uri, self.run_id, "RUNNING")
        self.watermarks = _metric_watermarks(self.uri, self.run_id)
        return True

    def on_start(self, run: RunInfo) -> None:
        experiment_id = ensure_experiment(self.uri, self.experiment)
        self.extra_tags[f"{TAG}world_size"] = str(run.world_size)
        self.resumed = self._reopen(experiment_id)
        if self.resumed:
            return
        c = client(self.uri)
        tags = trial_tags(self.trial, self.parent_run_id, self.extra_tags)
        created = retry(lambda: c.create_run(experiment_id, tags=tags, run_name=self.trial.name))
        self.run_id = created.info.run_id
        self.best, self.watermarks = {}, {}
        log_params_and_tags(self.uri, self.run_id, trial_params(self.trial), {})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(config_to_dict(self.trial.config), sort_keys=False))
            retry(lambda: c.log_artifact(self.run_id, str(path)))

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.run_id is None:
            return
        for key, value in metrics.items():
            if key.startswith("eval/") and isinstance(value, (int, float)) and math.isfinite(value):
                if key not in self.best or value < self.best[key][0]:
                    self.best[key] = [float(value), int(step)]
        fresh = {k: v for k, v in metrics.items() if step > self.watermarks.get(k, -1)}
        if fresh:
            log_metrics(self.uri, self.run_id, step, fresh)

    def on_sample(self, step: int, path: Path) -> None:
        if self.run_id is None:
            return  # (a resumed trial re-logging a figure overwrites the same file name)
        retry(lambda: client(self.uri).log_artifact(self.run_id, str(path), "samples"))

    def on_end(self, result: TrainResult) -> None:
        if self.run_id is None:
            return
        if self.already_finished:
            return  # a finished run reopened at its last step: nothing new, keep its artifacts
        # best/<key>: the minimum over the history (lower is better for every metric), read by analysis.
        summary = {f"best/{k}": v for k, (v, _) in self.best.items()}
        summary["time/train_seconds"] = result.seconds  # the trainer's own wall time (this process)
        log_metrics(self.uri, self.run_id, result.step, summary)
        final = Path(result.out_dir) / "final_metrics.json"
        if final.is_file():
            retry(lambda: client(self.uri).log_artifact(self.run_id, str(final)))
        set_status(self.uri, self.run_id, "FINISHED")

    def fail(self, status: str = "FAILED") -> None:
        """Mark the run as failed (called by run_trial when train raises)."""
        if self.run_id is not None and not self.already_finished:
            try:
                set_status(self.uri, self.run_id, status)
            except Exception:  # noqa: BLE001 -- never hide the training error behind a logging one
                pass

    def latest_metrics(self) -> dict[str, float]:
        if self.run_id is None:
            return {}
        return dict(retry(lambda: client(self.uri).get_run(self.run_id)).data.metrics)
