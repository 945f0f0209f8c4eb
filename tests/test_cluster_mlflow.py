"""cluster/mlflow_server.sh starts a real MLflow tracking server that concurrent jobs can log to.

The server runs on 127.0.0.1 with a sqlite backend (as on a login node), and 8 writer processes,
started at the same instant, log 200 metric points each with log_batch -- into their own runs and
into one shared run -- over HTTP. Every point must arrive exactly once.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "mlflow_server.sh"
WRITERS = 8
POINTS = 200
BATCH = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _script_env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "PYTHON": sys.executable}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    started = subprocess.run(
        [str(SCRIPT), "--detach", "--root", str(root), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=_script_env(), capture_output=True, text=True, timeout=180,
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}"
    pid = int((root / "server.pid").read_text())
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "root": root, "pid": pid}
    finally:
        subprocess.run([str(SCRIPT), "--stop", "--root", str(root)], env=_script_env(), capture_output=True, timeout=60)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", "server survived --stop"
    assert not (root / "server.pid").exists()


def _writer(uri: str, experiment_id: str, shared_run_id: str, index: int, barrier, results) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(experiment_id, tags={"writer": str(index)}).info.run_id
    barrier.wait(timeout=120)  # all writers hit the server at once
    for start in range(0, POINTS, BATCH):
        own = [Metric("train/loss", index * 10_000 + s, 1_700_000_000_000 + s, s) for s in range(start, start + BATCH)]
        shared = [Metric(f"writer{index}/value", float(s), 1_700_000_000_000 + s, s) for s in range(start, start + BATCH)]
        client.log_batch(run_id, metrics=own)
        client.log_batch(shared_run_id, metrics=shared)
    client.set_terminated(run_id, "FINISHED")
    results.put((index, run_id))


def test_server_script_serves_sqlite_store_and_artifacts_on_shared_root(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    exp = client.create_experiment("artifact-check")
    run = client.create_run(exp)
    local = mlflow_server["root"] / "note.txt"
    local.write_text("hello")
    client.log_artifact(run.info.run_id, str(local))
    assert (mlflow_server["root"] / "mlflow.db").is_file()
    # --serve-artifacts: the file lands under the server's artifact root, not a client path.
    assert [p.read_text() for p in (mlflow_server["root"] / "artifacts").rglob("note.txt")] == ["hello"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")


def test_concurrent_writers_lose_no_metric_points(mlflow_server):
    from mlflow.tracking import MlflowClient

    uri = mlflow_server["uri"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("concurrent-writers")
    shared_run_id = client.create_run(exp).info.run_id
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(uri, exp, shared_run_id, i, barrier, results)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    run_ids = dict(results.get(timeout=5) for _ in range(WRITERS))

    for index, run_id in run_ids.items():
        history = client.get_metric_history(run_id, "train/loss")
        assert sorted((m.step, m.value) for m in history) == [(s, index * 10_000 + s) for s in range(POINTS)]
        assert client.get_run(run_id).info.status == "FINISHED"
    shared = client.get_run(shared_run_id)
    assert set(shared.data.metrics) == {f"writer{i}/value" for i in range(WRITERS)}
    for i in range(WRITERS):
        history = client.get_metric_history(shared_run_id, f"writer{i}/value")
        assert sorted(m.step for m in history) == list(range(POINTS))
    assert len(client.search_runs([exp], max_results=100)) == WRITERS + 1


def test_stop_ends_the_server_and_bad_options_are_named(tmp_path):
    bad = subprocess.run([str(SCRIPT), "--port", "70000", "--root", str(tmp_path)], env=_script_env(),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--port" in bad.stderr
    unknown = subprocess.run([str(SCRIPT), "--prot", "1"], env=_script_env(), capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 2 and "--prot" in unknown.stderr
    nothing = subprocess.run([str(SCRIPT), "--stop", "--root", str(tmp_path)], env=_script_env(),
                             capture_output=True, text=True, timeout=30)
    assert nothing.returncode == 0 and "nothing to stop" in nothing.stderr
