"""analysis/notebooks: both ablation notebooks run top to bottom (nbclient) on a store made by real smoke sweeps.

The store: a tiny EDM teacher trained once by the trainer CLI, then the sweeps ablation_gan,
ablation_ema and ablation_N launched by the real launcher (`python sweeps/launch.py PATH --budget
smoke --force`, local Ray backend, the three launches side by side) into one sqlite MLflow store
under tmp. To keep this under a few minutes on 2 cores, each sweep is the shipped sweep file with
its smoke budget's axis values cut to a subset (SUBSETS; same name, base, seeds and layout), every
trial is shortened by --set (4 steps, evaluations at steps 2 and 4, a small eval set) and uses that
teacher (--set teacher.checkpoint). --force: the sweeps share configs (e.g. lambda_GAN off = mu 0.99
= N 18) and each must hold its own runs. The store is built once per session (cached under pytest's
base temp dir) and shared with tests/test_report_matches_runs.py.

The notebooks are executed with a `python3` kernel spec written for this interpreter (JUPYTER_PATH
comes first in Jupyter's search path), so they run in the same environment as the tests.
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "analysis" / "notebooks"
EXPERIMENT = "ctm-lab"
SUBSETS = {  # sweep -> (axis, the smoke values kept)
    "ablation_gan": ("loss.lambda_gan", ["off", "0.1", "0.1@25+50"]),
    "ablation_ema": ("ema.target_rate", [0.0, 0.9, 0.999]),
    "ablation_N": ("ctm.num_points", [6, 18]),
}
DATA_SPEC = "toy:gmm2d_8?n=1000&n_test=300"
# ema.eval_rate=0: evaluate (and, for the teacher, hand over) the raw weights, not an EMA that has barely
# left the initial weights after a few steps; otherwise every variant of a sweep would score the same.
TEACHER_OVERRIDES = ["train.steps=20", "train.ckpt_every=20", "ema.eval_rate=0", "eval.num_samples=200",
                     "runtime.progress=off", f"data.spec={DATA_SPEC}"]
TRIAL_OVERRIDES = ["train.steps=4", "eval.every=2", "train.ckpt_every=4", "ema.eval_rate=0", "eval.num_samples=200",
                   "eval.teacher_steps=2", "data.batch_size=16", f"data.spec={DATA_SPEC}"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the shared store


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env.update(extra)
    return env


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def trial_overrides(teacher: str | Path) -> list[str]:
    """The --set items every smoke trial of the store ran with."""
    return [*TRIAL_OVERRIDES, f"teacher.checkpoint={teacher}"]


def trimmed_sweep_file(name: str, folder: Path) -> Path:
    """The shipped sweeps/NAME.yaml with its smoke axis values cut to SUBSETS[name] (validated by the launcher)."""
    axis, values = SUBSETS[name]
    raw = yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())
    assert set(map(str, values)) <= set(map(str, raw["axes"][axis])), f"{name}: {values} not in the shipped axis"
    raw["name"] = name
    raw["budgets"]["smoke"]["axes"] = {axis: values}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def build_smoke_store(tmp_path_factory) -> dict:
    """Build (once per session) the store described in the module docstring; returns its paths.

    {"uri", "root", "teacher", "sweeps": {name: expected trial count}, "seconds"}.
    """
    root = tmp_path_factory.getbasetemp() / "smoke_store"
    ready = root / "store.json"
    if ready.is_file():
        return json.loads(ready.read_text())
    root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    teacher = root / "teacher"
    env = _env(MLFLOW_TRACKING_URI=uri, CTM_LAB_SWEEP_ROOT=str(root / "runs"))

    log = root / "teacher.log"
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "ctm_core.train", "--config", str(REPO / "configs" / "toy_teacher.yaml"),
             *[a for item in TEACHER_OVERRIDES for a in ("--set", item)], "--set", f"runtime.out_dir={teacher}"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, f"teacher training failed:\n{_tail(log)}"

    # The experiment exists before the launchers start, with its artifacts under tmp.
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())

    sets = [a for item in trial_overrides(teacher) for a in ("--set", item)]
    launches, logs = {}, []
    (root / "sweeps").mkdir(exist_ok=True)
    files = {name: trimmed_sweep_file(name, root / "sweeps") for name in SUBSETS}
    for name, path in files.items():
        log = root / f"launch_{name}.log"
        logs.append(open(log, "w"))
        launches[name] = (subprocess.Popen(
            [sys.executable, str(REPO / "sweeps" / "launch.py"), str(path), "--budget", "smoke", *sets, "--force",
             "--num-cpus", "1", "--experiment", EXPERIMENT],
            cwd=root, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True), log)
    failures = []
    deadline = time.monotonic() + 540
    for name, (process, log) in launches.items():
        try:
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and the Ray processes it started
            process.wait()
            code = "timeout"
        if code != 0:
            failures.append(f"launch {name} exited {code}:\n{_tail(log)}")
    for handle in logs:
        handle.close()
    assert not failures, "\n\n".join(failures)

    from sweeps.spec import load_sweep

    expected = {name: len(load_sweep(path).trials("smoke", trial_overrides(teacher))) for name, path in files.items()}
    info = {"uri": uri, "root": str(root), "teacher": str(teacher), "sweeps": expected,
            "seconds": round(time.monotonic() - start, 1)}
    ready.write_text(json.dumps(info))
    return info


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_smoke_store(tmp_path_factory)


def finished_trials(uri: str, sweep: str) -> list:
    """The FINISHED trial runs of one sweep, read with the plain MLflow client (not the analysis package)."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`ctmlab.sweep` = '{sweep}' and tags.`ctmlab.role` = 'trial'", max_results=1000)
    return [r for r in runs if r.info.status == "FINISHED"]


def last_logged(client: MlflowClient, run_id: str, key: str) -> float:
    """The value logged at the highest step (latest timestamp breaking ties), from the full history."""
    history = client.get_metric_history(run_id, key)
    assert history, f"run {run_id} never logged {key}"
    return max(history, key=lambda m: (m.step, m.timestamp)).value


def test_smoke_store_holds_every_trial_finished(store):
    for sweep, count in store["sweeps"].items():
        runs = finished_trials(store["uri"], sweep)
        assert len(runs) == count, f"{sweep}: {len(runs)} FINISHED trial runs, expected {count}"
        assert {r.data.tags["ctmlab.seed"] for r in runs} == {"0", "1"}
        for run in runs:  # the trials really were shortened and evaluated twice
            assert run.data.params["train.steps"] == "4"
            history = MlflowClient(tracking_uri=store["uri"]).get_metric_history(run.info.run_id, "eval/sw2/nfe1")
            assert sorted(m.step for m in history) == [2, 4]


# ----------------------------------------------------------------------------- executing the notebooks


@pytest.fixture(scope="module")
def python3_kernel(tmp_path_factory):
    """A `python3` kernel spec for this interpreter, first on JUPYTER_PATH (user-level specs come later)."""
    folder = tmp_path_factory.mktemp("jupyter")
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python"}))
    return folder


def execute(nb: nbformat.NotebookNode | Path, store: dict, kernel_dir: Path, figures: Path,
            **env: str) -> nbformat.NotebookNode:
    """Run a notebook top to bottom from the notebooks folder; nbclient raises on any cell error."""
    if isinstance(nb, Path):
        nb = nbformat.read(nb, as_version=4)
    settings = {"CTM_LAB_TRACKING_URI": store["uri"], "CTM_LAB_EXPERIMENT": EXPERIMENT,
                "CTM_LAB_FIGURES": str(figures), "JUPYTER_PATH": str(kernel_dir), **env}
    saved = {k: os.environ.get(k) for k in [*settings, "MLFLOW_TRACKING_URI", "CTM_LAB_METRIC", "CTM_LAB_WHICH",
                                            "CTM_LAB_REPO"]}
    try:
        for key in ("MLFLOW_TRACKING_URI", "CTM_LAB_METRIC", "CTM_LAB_WHICH", "CTM_LAB_REPO"):
            os.environ.pop(key, None)
        os.environ.update(settings)
        client = NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=False,
                                resources={"metadata": {"path": str(NOTEBOOKS)}})
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb


def outputs(nb) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def markdown_outputs(nb) -> list[str]:
    return [o.data["text/markdown"] for o in outputs(nb) if "data" in o and "text/markdown" in o.data]


def png_outputs(nb) -> list[bytes]:
    return [base64.b64decode(o.data["image/png"]) for o in outputs(nb) if "data" in o and "image/png" in o.data]


def table_rows(markdown: str, header_start: str) -> dict[str, list[str]]:
    """{row label: cells} of the pipe table whose header starts with `header_start`."""
    lines = markdown.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[top + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


CELL = re.compile(r"^\**(?P<mean>-?[\d.]+) ± (?P<std>[\d.]+) \((?P<n>\d+)(?:/(?P<expected>\d+))?\)\**$")


def assert_cell_matches(cell: str, values: list[float], where: str) -> None:
    """A 'mean ± std (n)' cell equals the mean/std of `values` up to the cell's own rounding."""
    match = CELL.match(cell)
    assert match, f"{where}: cell {cell!r} is not 'mean ± std (n)'"
    decimals = len(match["mean"].split(".")[1]) if "." in match["mean"] else 0
    tolerance = 0.5 * 10 ** -decimals + 1e-12
    assert int(match["n"]) == len(values) and match["expected"] is None, f"{where}: {cell!r} vs {len(values)} seeds"
    assert abs(float(match["mean"]) - np.mean(values)) <= tolerance, f"{where}: {cell!r} vs mean {np.mean(values)}"
    assert abs(float(match["std"]) - np.std(values, ddof=1)) <= tolerance, f"{where}: {cell!r} vs std"


def check_nfe1_column(uri: str, sweep: str, rows: dict[str, list[str]], label_of) -> None:
    """Each row's NFE 1 cell against the last logged eval/sw2/nfe1 of its FINISHED trials."""
    client = MlflowClient(tracking_uri=uri)
    groups: dict[str, list[float]] = {}
    for run in finished_trials(uri, sweep):
        groups.setdefault(label_of(run), []).append(last_logged(client, run.info.run_id, "eval/sw2/nfe1"))
    assert set(rows) == set(groups)
    for label, values in groups.items():
        assert_cell_matches(rows[label][0], values, f"{sweep} {label} NFE 1")


def assert_pngs(images: list[bytes], count: int) -> None:
    assert len(images) == count, f"{len(images)} PNG outputs, expected {count}"
    for image in images:
        assert image[:8] == PNG_MAGIC and len(image) > 2000


def assert_no_error_text(nb) -> None:
    streams = "".join(o.get("text", "") for o in outputs(nb) if o.output_type == "stream")
    assert "Traceback" not in streams and "No trial runs" not in "\n".join(markdown_outputs(nb))


def test_committed_notebooks_are_clean_v4_python3():
    for name in ("ablation_gan.ipynb", "ablation_ema_N.ipynb"):
        raw = json.loads((NOTEBOOKS / name).read_text())
        assert raw["nbformat"] == 4
        nb = nbformat.reads(json.dumps(raw), as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3" and nb.metadata.kernelspec.language == "python"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.outputs == [] and c.execution_count is None for c in code), f"{name}: outputs not cleared"
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code)  # every step is explained


def test_ablation_gan_notebook(store, python3_kernel, tmp_path):
    """The notebook on the smoke store; then, in the same kernel, its cells once more for a sweep without
    runs: a note naming the sweeps that exist instead of a crash or empty figures."""
    nb = nbformat.read(NOTEBOOKS / "ablation_gan.ipynb", as_version=4)
    setup = next(i for i, c in enumerate(nb.cells) if "def find_repo" in c.source)
    again = [nbformat.v4.new_code_cell('SWEEP = "ablation_gan_never_ran"\nFIGURES = None')]
    again += [nbformat.v4.new_code_cell(c.source) for c in nb.cells[setup + 1:] if c.cell_type == "code"]
    for cell in again:
        cell.metadata["second_pass"] = True
    nb.cells += again
    nb = execute(nb, store, python3_kernel, tmp_path / "figures")
    first = nbformat.v4.new_notebook(cells=[c for c in nb.cells if not c.metadata.get("second_pass")])
    second = nbformat.v4.new_notebook(cells=[c for c in nb.cells if c.metadata.get("second_pass")])

    assert_no_error_text(first)
    tables = [m for m in markdown_outputs(first) if "| variant | NFE 1 | NFE 2 | NFE 4 |" in m]
    assert len(tables) == 1 and "GAN loss weight" in tables[0]
    rows = table_rows(tables[0], "| variant |")
    assert set(rows) == {f"loss.lambda_gan={v}" for v in SUBSETS["ablation_gan"][1]}
    assert all(len(cells) == 4 and all(c.rstrip("*").endswith("(2)") for c in cells) for cells in rows.values())
    check_nfe1_column(store["uri"], "ablation_gan", rows, lambda run: run.data.tags["ctmlab.variant"])
    assert_pngs(png_outputs(first), 4)  # metric vs NFE, vs step, vs lambda_GAN, sample grid
    saved = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert saved == sorted(f"ablation_gan_{s}.{e}" for s in ("metric_vs_nfe", "metric_vs_step", "metric_vs_lambda_gan",
                                                             "samples") for e in ("png", "pdf"))

    notes = markdown_outputs(second)
    assert len(notes) == 1 and "No trial runs of `ablation_gan_never_ran`" in notes[0]
    assert "ablation_ema" in notes[0] and "python sweeps/launch.py" in notes[0]
    assert png_outputs(second) == [] and "Traceback" not in str(outputs(second))


def test_ablation_ema_N_notebook(store, python3_kernel, tmp_path):
    nb = execute(NOTEBOOKS / "ablation_ema_N.ipynb", store, python3_kernel, tmp_path / "figures")
    assert_no_error_text(nb)
    markdown = "\n".join(markdown_outputs(nb))
    ema = table_rows(markdown, "| ema.target_rate | NFE 1 | NFE 2 | NFE 4 |")
    grid = table_rows(markdown, "| ctm.num_points | NFE 1 | NFE 2 | NFE 4 |")
    assert list(ema) == ["0", "0.9", "0.999"] and list(grid) == ["6", "18"]
    axis = lambda key: lambda run: f"{json.loads(run.data.tags['ctmlab.axes'])[key]:g}"  # noqa: E731
    check_nfe1_column(store["uri"], "ablation_ema", ema, axis("ema.target_rate"))
    check_nfe1_column(store["uri"], "ablation_N", grid, axis("ctm.num_points"))
    assert_pngs(png_outputs(nb), 8)  # four figures per sweep
    assert len(list((tmp_path / "figures").glob("*.png"))) == 8
