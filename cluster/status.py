"""Where is each trial of a sweep? One table from the scheduler and the trials' own out dirs.

    python sweeps/launch.py status NAME        (calls print_status)
    python -m cluster.status runs/NAME          (the same, from a sweep root)

State comes from SLURM (`squeue -r -t all`, which also lists jobs that ended within MinJobAge)
and, once a job has left the queue, from what the trial left behind: final_metrics.json at the
last step means COMPLETED, a submitit error result means FAILED. Progress is read from the
trial's metrics.jsonl (the trainer appends one record per log/eval step), so the table is right
for any backend -- SLURM arrays, Ray on SLURM, or local Ray -- and needs no MLflow server.
"""
from __future__ import annotations

import argparse
import getpass
import json
import math
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

JOBS_FILE = "slurm_jobs.json"
# Preferred "last metric": the newest eval score (student before teacher, the headline metric of the
# data kind first, fewest NFE first), else the newest training loss.
_TRAIN_KEYS = ("train/loss_ctm", "train/loss_dsm", "train/loss")
_FAMILY_RANK = {"fid": 0, "fd_digits": 1, "sw2": 2, "energy": 3}


def _eval_key_rank(key: str) -> tuple:
    parts = key.split("/")
    family = parts[1] if len(parts) > 1 else ""
    nfe = "".join(ch for ch in (parts[2] if len(parts) > 2 else "") if ch.isdigit())
    return ("teacher" in key, _FAMILY_RANK.get(family, 9), int(nfe or 0), key.count("/"), key)


@dataclass(frozen=True)
class TrialStatus:
    index: int
    variant: str
    seed: Optional[int]
    state: str
    step: Optional[int]
    steps: Optional[int]
    last_metric: Optional[str]
    last_value: Optional[float]
    job_id: Optional[str]
    out_dir: str
    starts: int = 0          # SLURM starts of this trial (slurm_attempts.jsonl): 2+ means requeued

    @property
    def progress(self) -> str:
        if self.step is None:
            return "-"
        return f"{self.step}/{self.steps}" if self.steps else str(self.step)


# ----------------------------------------------------------------------------------------------
# Reading what trials and jobs left behind

def read_progress(out_dir: str | Path) -> tuple[Optional[int], Optional[str], Optional[float]]:
    """(last step, name of the last metric worth showing, its value) from metrics.jsonl."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return None, None, None
    step, best_key, best_val, eval_seen = None, None, None, False
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if not isinstance(record, dict) or "step" not in record:
            continue
        step = int(record["step"])
        evals = [k for k in record if k.startswith("eval/")]
        if evals:
            key = min(evals, key=_eval_key_rank)   # e.g. eval/sw2/nfe1 before eval/energy/nfe1
            best_key, best_val, eval_seen = key, record[key], True
        elif not eval_seen:
            for key in _TRAIN_KEYS:
                if key in record:
                    best_key, best_val = key, record[key]
                    break
    return step, best_key, (float(best_val) if isinstance(best_val, (int, float)) else None)


def count_starts(out_dir: str | Path) -> int:
    path = Path(out_dir) / "slurm_attempts.jsonl"
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def read_total_steps(out_dir: str | Path) -> Optional[int]:
    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        return int(((yaml.safe_load(path.read_text()) or {}).get("train") or {}).get("steps"))
    except (ValueError, TypeError, AttributeError):
        return None


def finished_step(out_dir: str | Path) -> Optional[int]:
    path = Path(out_dir) / "final_metrics.json"
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def submitit_outcome(folder: Optional[str | Path], job_id: Optional[str]) -> Optional[str]:
    """'success' / 'error' from submitit's result pickle of task 0 (None: no result yet)."""
    if not folder or not job_id:
        return None
    path = Path(folder) / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            outcome = pickle.load(f)[0]
    except Exception:  # unreadable or written by another version: say nothing rather than guess
        return None
    return outcome if outcome in ("success", "error") else None


def squeue_states(job_ids: Iterable[str], user: Optional[str] = None) -> dict[str, str]:
    """SLURM state per job id ('123_4' for array tasks); {} when squeue is unavailable."""
    wanted = {str(j).split("_")[0] for j in job_ids if j}
    if not wanted:
        return {}
    cmd = ["squeue", "-h", "-r", "-t", "all", "-u", user or getpass.getuser(), "-o", "%i|%T"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:
        return {}
    states = {}
    for line in proc.stdout.splitlines():
        if "|" not in line:
            continue
        job, state = line.strip().split("|", 1)
        if job.split("_")[0] in wanted:
            states[job] = state.strip()
    return states


# ----------------------------------------------------------------------------------------------
# The table

def load_job_records(sweep_root: str | Path) -> tuple[dict[int, dict[str, Any]], Optional[str]]:
    """Newest submission record per trial index from <sweep_root>/slurm_jobs.json, and the submitit folder."""
    path = Path(sweep_root) / JOBS_FILE
    if not path.is_file():
        return {}, None
    data = json.loads(path.read_text())
    records: dict[int, dict[str, Any]] = {}
    folder = None
    for submission in data.get("submissions", []):
        folder = submission.get("submitit_folder", folder)
        for job in submission.get("jobs", []):
            if job.get("trial_index") is not None:
                records[int(job["trial_index"])] = {**job, "submitit_folder": submission.get("submitit_folder")}
    return records, folder


def _trial_rows(trials: Sequence[Any]) -> dict[int, dict[str, Any]]:
    rows = {}
    for trial in trials:
        rows[int(trial.index)] = {
            "trial_index": int(trial.index), "variant": getattr(trial, "variant", ""),
            "seed": getattr(trial, "seed", None), "out_dir": str(trial.config.runtime.out_dir),
            "steps": int(trial.config.train.steps),
        }
    return rows


def collect_status(sweep_root: str | Path, trials: Sequence[Any] = (), user: Optional[str] = None,
                   ask_slurm: bool = True) -> list[TrialStatus]:
    """Rows for every trial known from `trials` or from the sweep's slurm_jobs.json
    (ask_slurm=False: from the files alone, e.g. where no SLURM client is configured)."""
    records, _ = load_job_records(sweep_root)
    rows: dict[int, dict[str, Any]] = _trial_rows(trials)
    for index, record in records.items():
        rows[index] = {**rows.get(index, {}), **{k: v for k, v in record.items() if v is not None}}
    live = squeue_states([r.get("job_id") for r in rows.values()], user) if ask_slurm else {}
    out = []
    for index in sorted(rows):
        row = rows[index]
        out_dir = row.get("out_dir", "")
        job_id = row.get("job_id")
        step, metric, value = read_progress(out_dir) if out_dir else (None, None, None)
        steps = row.get("steps") or (read_total_steps(out_dir) if out_dir else None)
        done_at = finished_step(out_dir) if out_dir else None
        if job_id and job_id in live:
            state = live[job_id]
            if row.get("shared_allocation") and state == "RUNNING":   # Ray on SLURM: one job, many trials
                if done_at is not None and (steps is None or done_at >= steps):
                    state = "COMPLETED"
                elif step is None:
                    state = "WAITING_IN_RAY"
        elif done_at is not None and (steps is None or done_at >= steps):
            state = "COMPLETED"
        elif submitit_outcome(row.get("submitit_folder"), job_id) == "error":
            state = "FAILED"
        elif job_id:
            state = "LEFT_QUEUE" if step is not None else "UNKNOWN"   # gone without a result: see its log
        else:
            state = "STARTED" if step is not None else "NOT_SUBMITTED"
        out.append(TrialStatus(index, str(row.get("variant", "")), row.get("seed"), state, step, steps,
                               metric, value, job_id, out_dir, count_starts(out_dir) if out_dir else 0))
    return out


def _fmt_value(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def format_table(rows: Sequence[TrialStatus]) -> str:
    header = ("trial", "variant", "seed", "state", "step", "last metric", "job id", "starts")
    body = [(str(r.index), r.variant or "-", "-" if r.seed is None else str(r.seed), r.state, r.progress,
             f"{r.last_metric}={_fmt_value(r.last_value)}" if r.last_metric else "-", r.job_id or "-",
             str(r.starts) if r.starts else "-") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


def sweep_root_of(spec: Any = None, trials: Sequence[Any] = (), name: Optional[str] = None) -> Path:
    """The sweep's root directory: the trials' common root (their out dirs live in <root>/trials/),
    else the spec's default root, else runs/<name>."""
    if trials:
        import os

        common = Path(os.path.commonpath([str(Path(t.config.runtime.out_dir).absolute().parent) for t in trials]))
        return common.parent if common.name == "trials" else common
    if spec is not None and callable(getattr(spec, "default_root", None)):
        return Path(spec.default_root())
    if name is None and spec is not None:
        name = getattr(spec, "name", None)
    if not name:
        raise ValueError("sweep_root_of: need trials, a spec or a sweep name")
    return Path("runs") / name


def print_status(sweep_root: str | Path, trials: Sequence[Any] = (), file=None) -> list[TrialStatus]:
    """What `launch.py status NAME` prints; returns the rows for callers that want them."""
    rows = collect_status(sweep_root, trials)
    print(f"sweep root: {sweep_root}", file=file or sys.stdout)
    print(format_table(rows), file=file or sys.stdout)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_root", help="a sweep's root directory (holds slurm_jobs.json)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    args = parser.parse_args(argv)
    if args.json:
        import dataclasses

        for row in collect_status(args.sweep_root):
            print(json.dumps(dataclasses.asdict(row)))
    else:
        print_status(args.sweep_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
