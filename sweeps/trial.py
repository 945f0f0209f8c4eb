"""One trial = one trainer run with an MLflow child run: the function Ray Tune and SLURM both call.

Also here: the sweep's teacher, trained once per sweep root and cached by its config hash.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ctm_core import checkpoint as ckpt
from ctm_core.config import TrainConfig
from ctm_core.train import Callback, train

from .spec import SweepError, SweepPlan, Trial
from .tracking import DEFAULT_EXPERIMENT, MlflowTrialCallback


def run_trial(trial: Trial, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, parent_run_id: str | None = None,
              extra_tags: dict[str, str] | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train `trial.config` (resuming from its out_dir) into one nested MLflow run; return final metrics.

    Call it on every rank of a multi-process trial: the trainer runs callbacks on rank 0 only.
    Extra `callbacks` (e.g. Ray Tune's reporter) run after the MLflow one. The returned dict holds
    the run's latest metrics plus `step` and `mlflow_run_id` (None on ranks other than 0).
    """
    tracker = MlflowTrialCallback(trial, tracking_uri, experiment, parent_run_id, extra_tags)
    for cb in callbacks:  # callbacks that report the MLflow run id (e.g. to Ray Tune) get the tracker
        if hasattr(cb, "bind"):
            cb.bind(tracker)
    try:
        result = train(trial.config, [tracker, *callbacks])
    except (KeyboardInterrupt, SystemExit):
        tracker.fail("KILLED")
        raise
    except BaseException:
        tracker.fail("FAILED")
        raise
    metrics: dict[str, Any] = dict(tracker.latest_metrics())
    metrics.update(result.metrics)
    metrics["step"] = result.step
    metrics["mlflow_run_id"] = tracker.run_id
    return metrics


@contextmanager
def out_dir_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive lock beside an out dir: launches sharing a root train a teacher once, and equal
    search samples take turns on one trial."""
    path = out_dir.parent / f".{out_dir.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        locked = _lock(handle, path)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


_NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)  # errors of filesystems without flock


def _lock(handle, path: Path) -> bool:
    """flock the handle; False (with a warning) where the filesystem has no locks (Lustre mounted without
    -o flock, some NFS set-ups): the sweep goes on unlocked rather than failing."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return True
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
    print(f"warning: {path.parent} does not support file locks; equal samples or launches sharing this "
          "root may train the same run twice", file=sys.stderr, flush=True)
    return False


def teacher_is_trained(plan: SweepPlan) -> bool:
    cfg = plan.teacher_config
    if cfg is None:
        return True
    return ckpt.reached_step(cfg.runtime.out_dir, cfg.train.steps)


def _teacher_threads(plan: SweepPlan) -> int:
    return max(1, int(plan.teacher_resources.cpus))


def train_teacher_once(cfg: TrainConfig, log=print, threads: int | None = None, tag: str = "") -> bool:
    """Train an `edm` teacher config unless its run dir already holds the last step (True: it trained).

    Holds the out-dir lock, so launches (or a launcher and a SLURM driver) sharing a root train it once;
    `threads` caps torch's threads while it trains (small nets: more threads only contend)."""
    out_dir = Path(cfg.runtime.out_dir)
    with out_dir_lock(out_dir):
        if ckpt.reached_step(out_dir, cfg.train.steps):
            log(f"teacher: cached {out_dir}" + (f" ({tag})" if tag else ""))
            return False
        import torch

        log(f"teacher: training {out_dir} ({cfg.train.steps} steps, mode {cfg.mode}" + (f", {tag})" if tag else ")"))
        saved = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            train(cfg)
        finally:
            torch.set_num_threads(saved)
        return True


def ensure_teacher(plan: SweepPlan, log=print) -> dict[str, Any] | None:
    """Train the sweep's teacher unless its run dir (keyed by config hash) already holds the last step.

    Returns {"checkpoint": path, "hash": ..., "trained": bool, "metrics": {...}} or None without a
    teacher. A given `teacher.checkpoint` must exist.
    """
    if plan.teacher_checkpoint is None:
        return None
    if plan.teacher_config is None:
        path = Path(plan.teacher_checkpoint)
        if not path.exists():
            raise SweepError(f"{plan.where}: teacher.checkpoint {path} does not exist")
        return {"checkpoint": str(path), "hash": None, "trained": False, "metrics": {}}
    cfg = plan.teacher_config
    out_dir = Path(cfg.runtime.out_dir)
    trained = train_teacher_once(cfg, log, threads=_teacher_threads(plan), tag=f"hash {plan.teacher_hash}")
    final = out_dir / "final_metrics.json"
    metrics = json.loads(final.read_text()) if final.is_file() else {}
    return {"checkpoint": str(out_dir), "hash": plan.teacher_hash, "trained": trained, "metrics": metrics}


def _failure_marker(plan: SweepPlan) -> Path | None:
    cfg = plan.teacher_config
    if cfg is None:
        return None
    out_dir = Path(cfg.runtime.out_dir)
    return out_dir.parent / f".{out_dir.name}.failed"


def move_aside_stale(trials: Sequence[Trial], finished: Any, stamp: str, out=None) -> list[Path]:
    """Before trials run again, move aside an out dir they would otherwise resume at its last step
    (training nothing and re-attaching the old MLflow run): the dir of a config in `finished` (a FINISHED
    run, re-run by --force), or a complete dir whose store has no FINISHED run. Each goes to
    <out_dir>.old-<stamp>, never deleted. Every backend calls this before its trials start."""
    moved = []
    for t in trials:
        if not t.out_dir.exists():
            continue
        if t.config_hash in finished:
            why = "--force re-runs a FINISHED config"
        elif ckpt.reached_step(t.out_dir, t.config.train.steps):
            why = "its out dir is complete but the store has no FINISHED run"
        else:
            continue
        target = t.out_dir.with_name(f"{t.out_dir.name}.old-{stamp}")
        os.replace(t.out_dir, target)
        moved.append(target)
        print(f"  {t.name}: {why}; moved its out dir aside to {target.name}", file=out or sys.stdout)
    return moved


def wait_for_teacher(plan: SweepPlan, poll_s: float = 0.2) -> None:
    """Block until the sweep's teacher is trained (trials may start while it trains); raise if it failed."""
    marker = _failure_marker(plan)
    while not teacher_is_trained(plan):
        if marker is not None and marker.exists():
            raise RuntimeError(f"the sweep's teacher failed to train: {marker.read_text()[-2000:]}")
        time.sleep(poll_s)


def _mark_failed(plan: SweepPlan, why: str) -> None:
    """Tell waiting trials that the teacher failed (written whole: they may read it at any moment)."""
    marker = _failure_marker(plan)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f"{marker.name}.tmp")
    tmp.write_text(why)
    os.replace(tmp, marker)


def _teacher_process(plan: SweepPlan) -> None:
    """Entry point of the teacher's own process (a spawned interpreter: its own GIL and threads)."""
    try:
        ensure_teacher(plan)
    except BaseException as err:
        _mark_failed(plan, f"{type(err).__name__}: {err}")
        raise


def _exit_status(process) -> str | None:
    """How an ended child exited (None: exit code 0, or unknown), read without reaping it (join() does that).

    Blocking: the child's sentinel fires when its files close, a moment before the kernel makes it
    waitable, and a non-blocking look in between saw nothing (~3% of kills on a loaded 2-core machine)."""
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # reaped already: by multiprocessing's own poll, which kept the exit code
        code = process.exitcode
        if code is None or code == 0:
            return None
        status, exited = (-code, False) if code < 0 else (code, True)
    else:
        status, exited = info.si_status, info.si_code == os.CLD_EXITED
    if exited:
        return None if status == 0 else f"its process exited with code {status}"
    name = signal.Signals(status).name if status in signal.valid_signals() else status
    return f"its process was killed by signal {name} (the OOM killer or kill -9?)"


def _start_method(threads: int) -> str:
    """fork where it is safe, else spawn. A forked teacher starts at once with the launcher's imports
    (torch included); a spawned one starts a new interpreter and imports them again, ~2 s on the
    critical path of a laptop sweep. fork is safe only with no other Python thread alive (a child
    inherits their locks held), with a teacher that trains on one thread (GNU OpenMP hangs in a
    forked child that opens a parallel region once the parent has used one) and without a GPU
    (CUDA does not survive a fork)."""
    if threading.active_count() != 1 or threads != 1:
        return "spawn"
    torch = sys.modules.get("torch")
    return "spawn" if torch is not None and torch.cuda.is_available() else "fork"


class TeacherJob:
    """Train the sweep's teacher in a separate process, so that Ray and the first trial actors start
    meanwhile (a thread would share the launcher's GIL with Tune's driver and slow the teacher down).

    Trials call wait_for_teacher() before training; a failure leaves a marker file they see.
    """

    def __init__(self, plan: SweepPlan, log=print):
        self.plan, self.log = plan, log
        self.cached = teacher_is_trained(plan)
        self.finished_at: float | None = None
        self._process = None
        self._cancelled = False

    def start(self) -> "TeacherJob":
        marker = _failure_marker(self.plan)
        if marker is not None:
            marker.unlink(missing_ok=True)
        if self.plan.teacher_config is not None and not self.cached:
            import multiprocessing

            sys.stdout.flush()  # a forked child would print what is still buffered a second time
            sys.stderr.flush()
            self._process = multiprocessing.get_context(_start_method(_teacher_threads(self.plan))).Process(
                target=_teacher_process, args=(self.plan,), name="ctm-teacher", daemon=True)
            self._process.start()
        else:
            self.finished_at = time.time()
        return self

    def cancel(self) -> None:
        """Stop a teacher nobody needs any more (its checkpoints stay; a later launch resumes it)."""
        self._cancelled = True
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._process = None

    def wait(self) -> None:
        """Block until the teacher's process has ended, without reaping it (join() does that).

        A teacher killed by a signal (the OOM killer) writes no failure marker itself: the marker is
        written here, else the trials waiting for the teacher (wait_for_teacher) would wait forever.
        """
        process = self._process  # cancel() may clear it from another thread meanwhile
        if process is None:
            return
        import multiprocessing.connection

        multiprocessing.connection.wait([process.sentinel])
        why = _exit_status(process)
        marker = _failure_marker(self.plan)
        if why is not None and not self._cancelled and not marker.exists():
            _mark_failed(self.plan, f"the teacher {self.plan.teacher_checkpoint} died: {why}")

    @property
    def failed(self) -> bool:
        marker = _failure_marker(self.plan)
        return (marker is not None and marker.exists()) or \
            (self._process is not None and self._process.exitcode not in (None, 0))

    def join(self) -> dict[str, Any] | None:
        """Wait for the teacher; {"checkpoint", "hash", "trained", "metrics"} or None; raises if it failed."""
        if self._process is not None:
            self._process.join()
            found = ckpt.list_checkpoints(self.plan.teacher_config.runtime.out_dir)
            self.finished_at = found[-1][1].stat().st_mtime if found else time.time()  # not when we asked
            if self._process.exitcode != 0:
                marker = _failure_marker(self.plan)
                why = marker.read_text() if marker.exists() else f"exit code {self._process.exitcode}"
                if not marker.exists():
                    _mark_failed(self.plan, why)
                raise RuntimeError(f"training the teacher {self.plan.teacher_checkpoint} failed: {why}")
        result = ensure_teacher(self.plan, log=lambda *_: None)  # cached now: reads its final metrics
        if result is not None:
            result["trained"] = self._process is not None
        return result
