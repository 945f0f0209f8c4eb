"""How long does analysis.load_runs take for a large sweep?

Creates a synthetic sweep (one parent + N trials with the contract's schema: ~80 dotted params,
ctmlab.* tags, train/* and eval/* histories, best/<key> summaries) in a temporary sqlite store,
using MlflowClient.log_batch so creation stays fast, then times load_runs (and, for reference,
mlflow.search_runs into pandas) a few times and prints a small table.

    python benchmarks/load_runs_bench.py [--runs 2000] [--repeats 3] [--steps 10] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from analysis import ablation_table, load_runs  # noqa: E402

SWEEP = "bench_sweep"
EVAL_KEYS = [f"eval/{m}/nfe{n}" for m in ("sw2", "energy") for n in (1, 2, 4)] + [
    "eval/sw2/nfe2/gamma0.5", "eval/sw2/teacher_nfe35", "eval/energy/teacher_nfe35"]
TRAIN_KEYS = ["train/loss", "train/loss_ctm", "train/loss_dsm", "train/loss_gan", "train/loss_disc",
              "train/lr", "train/it_per_s"]


def _params(variant: float, seed: int, count: int) -> list[Param]:
    fixed = {"ema.mu": repr(variant), "train.seed": str(seed), "optim.lr": "0.0002", "loss.lambda_dsm": "1.0",
             "ema.rates": "[0.999, 0.9999]", "train.use_gan": "False", "model.pretrained": "None",
             "loss.lambda_gan": "ramp@200->0.1", "data.name": "gmm8"}
    filler = {f"cfg.block{i // 10}.opt{i % 10}": str(i * 0.5) for i in range(max(0, count - len(fixed)))}
    return [Param(k, v) for k, v in {**fixed, **filler}.items()]


def _log_in_batches(client: MlflowClient, run_id: str, metrics: list, params: list, tags: list) -> None:
    while metrics or params or tags:
        take_p, take_t = params[:100], tags[:100]
        room = 1000 - len(take_p) - len(take_t)
        take_m = metrics[:room]
        client.log_batch(run_id, metrics=take_m, params=take_p, tags=take_t, synchronous=True)
        metrics, params, tags = metrics[len(take_m):], params[100:], tags[100:]


def build_store(uri: str, artifacts: Path, runs: int, steps: int, params: int) -> float:
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("ctm-lab", artifact_location=str(artifacts))
    rng = random.Random(0)
    started = time.perf_counter()
    parent = client.create_run(exp_id, tags={"ctmlab.sweep": SWEEP, "ctmlab.role": "sweep"})
    variants = [0.9, 0.99, 0.999, 0.9999]
    for i in range(runs):
        variant, seed = variants[i % len(variants)], i // len(variants)
        run = client.create_run(exp_id, run_name=f"trial-{i}", tags={
            "mlflow.parentRunId": parent.info.run_id, "ctmlab.sweep": SWEEP, "ctmlab.role": "trial"})
        now = int(time.time() * 1000)
        metrics = [Metric(k, rng.random(), now + s, s * 100) for k in TRAIN_KEYS for s in range(steps)]
        metrics += [Metric(k, rng.random(), now + s, s * 100) for k in EVAL_KEYS for s in range(steps)]
        metrics += [Metric(f"best/{k}", rng.random() * 0.1, now + steps, steps * 100) for k in EVAL_KEYS]
        tags = [RunTag("ctmlab.seed", str(seed)), RunTag("ctmlab.variant", f"ema.mu={variant}"),
                RunTag("ctmlab.axes", json.dumps({"ema.mu": variant})), RunTag("ctmlab.config_hash", f"{i:08x}"),
                RunTag("ctmlab.git_commit", "deadbeef"), RunTag("ctmlab.git_dirty", "False"),
                RunTag("ctmlab.host", "node01"), RunTag("ctmlab.ray_trial_id", f"trial_{i:05d}")]
        _log_in_batches(client, run.info.run_id, metrics, _params(variant, seed, params), tags)
        client.set_terminated(run.info.run_id, "FINISHED" if i % 50 else "FAILED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="logged steps per metric history")
    parser.add_argument("--params", type=int, default=80, help="params per run")
    parser.add_argument("--keep", default=None, help="build the store in this folder and keep it")
    parser.add_argument("--reuse", action="store_true", help="time an existing --keep store instead of building")
    args = parser.parse_args()

    # tmpfs when there is one: creating 2,000 runs is fsync-bound on disk; reads are page-cached either way.
    scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ctmlab-bench-", dir=scratch))
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder}/mlflow.db"
    if args.reuse:
        if not (folder / "mlflow.db").exists():
            raise SystemExit(f"--reuse: no store at {folder}/mlflow.db")
        create_s = math.nan
    else:
        create_s = build_store(uri, folder / "artifacts", args.runs, args.steps, args.params)

    rows = []
    for method in ("auto", "search"):
        times, frame = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            frame = load_runs("ctm-lab", sweep=SWEEP, tracking_uri=uri, method=method)
            times.append(time.perf_counter() - t)
        rows.append((f"analysis.load_runs(method={method!r}) -> {frame.attrs['method']}", times,
                     f"{frame.shape[0]} x {frame.shape[1]}"))
        if method == "auto":
            fast = frame

    t = time.perf_counter()
    table = ablation_table(fast, rows="axis", metric="sw2", nfe=(1, 2, 4))
    rows.append(("analysis.ablation_table", [time.perf_counter() - t], f"{len(table.frame)} rows"))

    mlflow.set_tracking_uri(uri)  # reference only: the fluent API needs the global URI
    reference = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        pdf = mlflow.search_runs(experiment_names=["ctm-lab"], filter_string=f"tags.`ctmlab.sweep` = '{SWEEP}'")
        reference.append(time.perf_counter() - t)
    rows.append(("mlflow.search_runs (untyped, reference)", reference, f"{pdf.shape[0]} x {pdf.shape[1]}"))

    print(f"store: sqlite, {args.runs} trials + 1 parent, {args.params} params, {len(TRAIN_KEYS) + len(EVAL_KEYS)} "
          f"metric keys x {args.steps} steps + {len(EVAL_KEYS)} best/ summaries per run; created in {create_s:.1f} s")
    print(f"{'what':<50} {'best s':>8} {'median s':>9}  result")
    for name, ts, result in rows:
        print(f"{name:<50} {min(ts):>8.2f} {statistics.median(ts):>9.2f}  {result}")
    if args.keep:
        print(f"(store kept at {folder})")
    else:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
