"""analysis/: load_runs, ablation_table, plots and the report command against a real sqlite MLflow store.

The synthetic sweep "ablation_ema" follows the contract schema: a parent run and nested trials,
axis ema.mu in {0.9, 0.99, 0.999, 0.9999} x seeds {0, 1, 2}, with the gaps a real sweep has:
  0.9999  seeds 0, 1, 2 FINISHED                         -> complete cells "(3)"
  0.999   seeds 0, 1 FINISHED, seed 2 FAILED mid-way      -> "(2/3)", failed seed in notes
  0.99    seeds 0, 2 FINISHED, seed 1 never started       -> "(2/3)", missing seed in notes
  0.9     seed 0 still RUNNING, nothing else              -> "— (0/3 finished)"
A second sweep "ablation_dsm" in the same experiment must never leak into the first.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imsave
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

import analysis
from analysis import DEFAULT_LAYOUTS, ablation_table, load_runs
from analysis.runs import parse_param_value

REPO = Path(__file__).resolve().parents[1]
SWEEP = "ablation_ema"
SEEDS = (0, 1, 2)
STEPS = (0, 100, 200)
NFES = (1, 2, 4)
SHAPE = np.array([1.0, 0.4, 0.5])  # not monotone: best (step 100) differs from the last value
FAILED_SHAPE = np.array([0.4, 0.6])  # the failed trial logged two evals, getting worse
PLAN = {  # mu -> {seed: status}; absent seed = no run at all
    0.9999: {0: "FINISHED", 1: "FINISHED", 2: "FINISHED"},
    0.999: {0: "FINISHED", 1: "FINISHED", 2: "FAILED"},
    0.99: {0: "FINISHED", 2: "FINISHED"},
    0.9: {0: "RUNNING"},
}
PARAMS = {
    "optim.lr": "0.0002",
    "net.channels": "64",
    "train.use_gan": "False",
    "ema.rates": "[0.999, 0.9999]",
    "data.name": "gmm8",
    "model.pretrained": "None",
    "loss.lambda_gan": "ramp@200->0.1",
}


def _scale(mu: float, nfe: int, seed: int, metric: str) -> float:
    base = {0.9999: 0.05, 0.999: 0.04, 0.99: 0.07, 0.9: 0.2}.get(mu, 0.1)
    return base * (1 + 0.3 / nfe) * (1 + 0.1 * seed) * (2.0 if metric == "energy" else 1.0)


def _batched_log(client: MlflowClient, run_id: str, metrics=(), params=(), tags=()) -> None:
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        client.log_batch(run_id, metrics=metrics[:900], params=params[:100], tags=tags[:100], synchronous=True)
        metrics, params, tags = metrics[900:], params[100:], tags[100:]


def _log_trial(client, exp_id, parent_id, sweep, mu, seed, status, tmp: Path) -> dict[str, list[float]]:
    tags = {
        "mlflow.parentRunId": parent_id, "ctmlab.sweep": sweep, "ctmlab.role": "trial",
        "ctmlab.seed": str(seed), "ctmlab.variant": f"ema.mu={mu:g}", "ctmlab.axes": json.dumps({"ema.mu": mu}),
        "ctmlab.config_hash": f"h{mu:g}-{seed}", "ctmlab.git_commit": "abc123", "ctmlab.git_dirty": "False",
        "ctmlab.host": "node01",
    }
    run = client.create_run(exp_id, tags=tags, run_name=f"{sweep}-{mu:g}-s{seed}")
    run_id = run.info.run_id
    shape = SHAPE if status == "FINISHED" else FAILED_SHAPE
    steps = STEPS[: len(shape)]
    now = int(time.time() * 1000)
    history: dict[str, list[float]] = {}
    metrics = []
    for metric in ("sw2", "energy"):
        for nfe in NFES:
            values = [float(_scale(mu, nfe, seed, metric) * s) for s in shape]
            history[f"eval/{metric}/nfe{nfe}"] = values
            metrics += [Metric(f"eval/{metric}/nfe{nfe}", v, now + st, st) for v, st in zip(values, steps)]
        gamma = [float(_scale(mu, 2, seed, metric) * 0.9 * s) for s in shape]
        history[f"eval/{metric}/nfe2/gamma0.5"] = gamma
        metrics += [Metric(f"eval/{metric}/nfe2/gamma0.5", v, now + st, st) for v, st in zip(gamma, steps)]
        teacher = 0.03 + 0.001 * seed
        history[f"eval/{metric}/teacher_nfe35"] = [teacher]
        metrics.append(Metric(f"eval/{metric}/teacher_nfe35", teacher, now + steps[-1], steps[-1]))
    losses = [1.0 / (1 + s / 50) for s in range(0, steps[-1] + 1, 50)]
    history["train/loss"] = losses
    metrics += [Metric("train/loss", v, now + i, i * 50) for i, v in enumerate(losses)]
    if status == "FINISHED":  # the launcher's end-of-trial summaries
        metrics += [Metric(f"best/{k}", min(v), now + 999, steps[-1]) for k, v in history.items() if k.startswith("eval/")]
    params = [Param("ema.mu", repr(mu))] + [Param(k, v) for k, v in PARAMS.items()]
    _batched_log(client, run_id, metrics, params)
    if status == "FINISHED":
        for step, level in ((100, 0.2), (200, 0.8)):
            image = tmp / f"step_{step:06d}.png"
            imsave(image, np.full((8, 24, 3), level))  # wide, like the toy scatter strips
            client.log_artifact(run_id, str(image), artifact_path="samples")
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return history


def _new_store(root: Path) -> tuple[str, MlflowClient, str]:
    """A fresh local sqlite store under root with the platform's experiment: (uri, client, experiment id)."""
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("ctm-lab", artifact_location=str(root / "artifacts"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri, client, exp_id = _new_store(root)
    parent = client.create_run(exp_id, tags={"ctmlab.sweep": SWEEP, "ctmlab.role": "sweep"}, run_name=SWEEP)
    logged: dict[tuple[float, int], dict] = {}
    images = root / "images"
    images.mkdir()
    for mu, seeds in PLAN.items():
        for seed, status in seeds.items():
            history = _log_trial(client, exp_id, parent.info.run_id, SWEEP, mu, seed, status, images)
            logged[(mu, seed)] = {"status": status, "history": history}
    client.set_terminated(parent.info.run_id, "FINISHED")
    other = client.create_run(exp_id, tags={"ctmlab.sweep": "ablation_dsm", "ctmlab.role": "sweep"})
    _log_trial(client, exp_id, other.info.run_id, "ablation_dsm", 0.5, 0, "FINISHED", images)
    client.set_terminated(other.info.run_id, "FINISHED")
    return {"uri": uri, "root": root, "logged": logged}


@pytest.fixture(scope="module")
def runs(store):
    return load_runs("ctm-lab", sweep=SWEEP, tracking_uri=store["uri"])


def _finished_final(store, mu: float, key: str) -> np.ndarray:
    return np.array([v["history"][key][-1] for (m, _), v in sorted(store["logged"].items())
                     if m == mu and v["status"] == "FINISHED"])


# ----------------------------------------------------------------------------- load_runs


def test_parse_param_value_types():
    assert parse_param_value("3") == 3 and isinstance(parse_param_value("3"), int)
    assert parse_param_value("-2e-4") == pytest.approx(-2e-4)
    assert parse_param_value("0.9999") == 0.9999
    assert parse_param_value("True") is True and parse_param_value("false") is False
    assert parse_param_value("None") is None
    assert parse_param_value("[0.999, 0.9999]") == [0.999, 0.9999]
    assert parse_param_value("['a', 'b']") == ["a", "b"]
    assert parse_param_value("(1, 2)") == [1, 2]
    assert parse_param_value("1_000") == "1_000"
    assert parse_param_value("ramp@200->0.1") == "ramp@200->0.1"
    assert parse_param_value("[not json") == "[not json"


def test_load_runs_rows_columns_and_types(store, runs):
    assert len(runs) == sum(len(s) for s in PLAN.values())
    assert set(runs["tag.ctmlab.role"]) == {"trial"}
    assert set(runs["tag.ctmlab.sweep"]) == {SWEEP}
    for column in ("run_id", "run_name", "parent_run_id", "status", "start_time", "end_time", "duration_s"):
        assert column in runs.columns
    assert runs["parent_run_id"].nunique() == 1
    assert sorted(runs["status"].value_counts().items()) == [("FAILED", 1), ("FINISHED", 7), ("RUNNING", 1)]
    assert str(runs["start_time"].dt.tz) == "UTC"
    assert runs.loc[runs["status"] == "RUNNING", "end_time"].isna().all()
    assert runs.loc[runs["status"] == "FINISHED", "duration_s"].ge(0).all()

    assert runs["param.ema.mu"].dtype == np.float64
    assert str(runs["param.net.channels"].dtype) == "Int64" and runs["param.net.channels"].eq(64).all()
    assert str(runs["param.train.use_gan"].dtype) == "boolean" and not runs["param.train.use_gan"].any()
    assert runs["param.optim.lr"].dtype == np.float64 and runs["param.optim.lr"].eq(2e-4).all()
    assert all(v == [0.999, 0.9999] for v in runs["param.ema.rates"])
    assert runs["param.model.pretrained"].isna().all()
    assert set(runs["param.data.name"]) == {"gmm8"}
    assert set(runs["param.loss.lambda_gan"]) == {"ramp@200->0.1"}
    assert str(runs["tag.ctmlab.seed"].dtype) == "Int64"
    assert str(runs["tag.ctmlab.git_dirty"].dtype) == "boolean"
    assert json.loads(runs["tag.ctmlab.axes"].iloc[0]).keys() == {"ema.mu"}

    assert not any(c.startswith("metric.best/") for c in runs.columns)  # summaries become best.*
    assert "best.train/loss" not in runs.columns and "metric.train/loss" in runs.columns
    assert runs.attrs["tracking_uri"] == store["uri"] and runs.attrs["sweep"] == SWEEP


def test_load_runs_final_and_best_values(store, runs):
    for _, row in runs.iterrows():
        logged = store["logged"][(row["param.ema.mu"], row["tag.ctmlab.seed"])]
        for key in ("eval/sw2/nfe1", "eval/energy/nfe4", "eval/sw2/nfe2/gamma0.5", "eval/sw2/teacher_nfe35"):
            history = logged["history"][key]
            assert row[f"metric.{key}"] == pytest.approx(history[-1])
            expected_best = min(history) if logged["status"] == "FINISHED" else history[-1]  # fallback: last
            assert row[f"best.{key}"] == pytest.approx(expected_best)
        assert row["metric.train/loss"] == pytest.approx(logged["history"]["train/loss"][-1])
    # 10 eval keys: 7 finished runs read summaries, the FAILED and RUNNING ones fall back to the last value.
    assert runs.attrs["best_source"] == {"summary": 7 * 10, "last_value": 2 * 10, "history": 0}


def test_load_runs_exact_best_reads_history_only_where_needed(store):
    exact = load_runs("ctm-lab", sweep=SWEEP, tracking_uri=store["uri"], exact_best=True)
    failed = exact[exact["status"] == "FAILED"].iloc[0]
    history = store["logged"][(0.999, 2)]["history"]["eval/sw2/nfe1"]
    assert failed["best.eval/sw2/nfe1"] == pytest.approx(min(history)) and min(history) < history[-1]
    assert exact.attrs["best_source"] == {"summary": 7 * 10, "last_value": 0, "history": 2 * 10}


def test_load_runs_sql_and_search_paths_agree(store, runs, monkeypatch):
    assert runs.attrs["method"] == "sql"  # a sqlite store takes the fast path by default
    monkeypatch.setattr("analysis.runs.PAGE_SIZE", 4)  # make the search path turn several pages
    searched = load_runs("ctm-lab", sweep=SWEEP, tracking_uri=store["uri"], method="search")
    assert searched.attrs["method"] == "search"
    pd.testing.assert_frame_equal(runs, searched)
    everything = load_runs("ctm-lab", tracking_uri=store["uri"], include_parent=True, method="search")
    pd.testing.assert_frame_equal(load_runs("ctm-lab", tracking_uri=store["uri"], include_parent=True), everything)


def test_load_runs_filters(store):
    with_parent = load_runs("ctm-lab", sweep=SWEEP, tracking_uri=store["uri"], include_parent=True)
    assert len(with_parent) == 10 and (with_parent["tag.ctmlab.role"] == "sweep").sum() == 1
    everything = load_runs("ctm-lab", tracking_uri=store["uri"])
    assert len(everything) == 10 and set(everything["tag.ctmlab.sweep"]) == {SWEEP, "ablation_dsm"}
    assert load_runs("ctm-lab", sweep="nope", tracking_uri=store["uri"]).empty
    assert analysis.list_sweeps("ctm-lab", store["uri"]) == ["ablation_dsm", SWEEP]
    with pytest.raises(ValueError, match="experiment"):
        load_runs("missing-experiment", tracking_uri=store["uri"])


# ----------------------------------------------------------------------------- ablation_table


def test_ablation_table_means_stds_counts(store, runs):
    table = ablation_table(runs, rows="axis", metric="sw2")
    assert table.row_names == ["ema.mu"]
    assert list(table.frame.index) == [0.9, 0.99, 0.999, 0.9999]
    assert [c["label"] for c in table.columns] == ["NFE 1", "NFE 2", "NFE 4", "teacher NFE 35"]
    for mu in PLAN:
        for spec in table.columns:
            values = _finished_final(store, mu, spec["column"].removeprefix("metric."))
            cell = table.frame.loc[mu, spec["label"]]
            assert cell["n"] == len(values) and cell["n_expected"] == 3
            if len(values):
                assert cell["mean"] == pytest.approx(np.mean(values), rel=1e-12)
                assert cell["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
            else:
                assert math.isnan(cell["mean"])
    for spec in table.columns:  # best = lowest mean among cells holding data
        means = table.frame[(spec["label"], "mean")]
        assert list(table.frame.index[table.frame[(spec["label"], "is_best")].astype(bool)]) == [means.idxmin()]
    assert table.frame.loc[0.999, ("NFE 1", "is_best")]


def test_ablation_table_marks_failed_missing_and_running(runs):
    table = ablation_table(runs, rows="axis", metric="sw2", nfe=(1,), teacher=False)
    cells = table.cells["NFE 1"]
    assert cells[0.9] == "— (0/3 finished)"
    assert cells[0.99].endswith("(2/3)") and cells[0.999].endswith("(2/3)")
    assert cells[0.9999].endswith("(3)") and " ± " in cells[0.9999]
    notes = "\n".join(table.notes)
    assert "0.999: seed 2 failed/killed" in notes
    assert "0.99: seed 1 no run" in notes
    assert "0.9: seed 0 still running; seed 1, 2 no run" in notes
    long = table.long.set_index("ema.mu")
    assert long.loc[0.999, "n_failed"] == 1 and long.loc[0.99, "n_missing"] == 1 and long.loc[0.9, "n_running"] == 1


def test_ablation_table_options(store, runs):
    best = ablation_table(runs, rows="variant", metric="sw2", which="best", nfe=(2,), teacher=False)
    assert best.row_names == ["variant"]
    finished = np.array([min(v["history"]["eval/sw2/nfe2"]) for (m, _), v in store["logged"].items()
                         if m == 0.9999 and v["status"] == "FINISHED"])
    assert best.frame.loc["ema.mu=0.9999", ("NFE 2", "mean")] == pytest.approx(finished.mean())
    assert any("20 are last logged values" in note for note in best.notes)  # the fallback is disclosed
    gamma = ablation_table(runs, rows="axis", metric="sw2", gamma=0.5, teacher=False)
    assert [c["column"] for c in gamma.columns] == ["metric.eval/sw2/nfe2/gamma0.5"]
    two_d = ablation_table(runs, rows="axis", cols="tag.ctmlab.seed", metric="eval/energy/nfe4")
    assert [c["label"] for c in two_d.columns] == ["0", "1", "2"]
    assert two_d.frame.loc[0.99, ("1", "n")] == 0 and two_d.cells.loc[0.99, "1"] == "— (0/1 finished)"
    assert ablation_table(runs, rows="axis", metric="auto").metric_key == "metric.eval/sw2/nfe*"
    with pytest.raises(ValueError, match="metric"):
        ablation_table(runs, rows="axis", metric="fid")
    with pytest.raises(ValueError, match="rows"):
        ablation_table(runs, rows="param.nope")
    with pytest.raises(ValueError, match="agg"):
        ablation_table(runs, rows="axis", agg=("mode",))
    assert set(DEFAULT_LAYOUTS) == {"ablation_gan", "ablation_ema", "ablation_dsm", "ablation_ode_steps",
                                    "ablation_N", "tune_lr"}


def test_table_renderers(runs, tmp_path):
    table = ablation_table(runs, rows="axis", metric="sw2", nfe=(1, 2, 4))
    md = table.to_markdown()
    lines = md.splitlines()
    assert lines[0] == "| ema.mu | NFE 1 | NFE 2 | NFE 4 | teacher NFE 35 |"
    row = next(line for line in lines if line.startswith("| 0.999 |"))
    assert row.split(" | ")[1].startswith("**") and row.split(" | ")[1].endswith("(2/3)**")
    assert "| 0.9 | — (0/3 finished) |" in md and "Notes:" in md

    tex = table.to_latex(caption="EMA ablation", label="tab:ema")
    for piece in ("\\begin{table}", "\\toprule", "\\midrule", "\\bottomrule", "\\textbf{", "$\\pm$",
                  "--- (0/3 finished)", "\\label{tab:ema}", "\\begin{tabular}{lcccc}"):
        assert piece in tex
    assert "±" not in tex and "—" not in tex

    path = table.to_csv(tmp_path / "t.csv")
    back = pd.read_csv(path)
    assert len(back) == 4 * 4
    merged = back.set_index(["ema.mu", "column"])
    for mu in PLAN:
        for label in ("NFE 1", "NFE 4"):
            assert merged.loc[(mu, label), "n"] == table.frame.loc[mu, (label, "n")]
            if merged.loc[(mu, label), "n"]:
                assert merged.loc[(mu, label), "mean"] == pytest.approx(table.frame.loc[mu, (label, "mean")], rel=1e-12)


# ----------------------------------------------------------------------------- plots and report


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_and_pdf(store, runs, tmp_path):
    client = MlflowClient(tracking_uri=store["uri"])
    finished = runs[runs["status"] == "FINISHED"].iloc[0]
    assert analysis.latest_sample(client, finished["run_id"]) == "samples/step_000200.png"
    assert analysis.latest_sample(client, runs[runs["status"] == "FAILED"].iloc[0]["run_id"]) is None

    analysis.plot_metric_vs_nfe(runs, "axis", "sw2", out=tmp_path / "nfe")
    fig = analysis.plot_metric_vs_step(runs, "eval/sw2/nfe1", out=tmp_path / "step")
    # 3 finished variants with a ±std band each; the 0.99 curve averages seeds 0 and 2 at every step.
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3
    curve = next(line for line in lines if line.get_label().startswith("0.99 "))
    expected = np.mean([store["logged"][(0.99, s)]["history"]["eval/sw2/nfe1"] for s in (0, 2)], axis=0)
    np.testing.assert_allclose(curve.get_ydata(), expected)
    analysis.plot_metric_vs_param(runs, "axis", "sw2", out=tmp_path / "param")
    grid = analysis.plot_sample_grid(runs, out=tmp_path / "samples")
    assert len([ax for ax in grid.axes if ax.images]) == 7  # every FINISHED run has samples
    nrows, ncols = grid.axes[0].get_subplotspec().get_gridspec().get_geometry()
    width, height = grid.get_size_inches()
    assert width / ncols > 2.5 * (height / nrows - 0.45)  # tiles follow the 3:1 samples, not squares
    for stem in ("nfe", "step", "param", "samples"):
        assert _is_png(tmp_path / f"{stem}.png")
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"


def test_report_command_writes_matching_numbers(store, tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "analysis.report", SWEEP, "--tracking-uri", store["uri"], "--format", "md", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| ema.mu | NFE 1 | NFE 2 | NFE 4 | teacher NFE 35 |" in done.stdout
    assert (out / "table.md").read_text() == done.stdout
    for stem in ("metric_vs_nfe", "metric_vs_step", "metric_vs_ema.mu", "samples"):
        assert _is_png(out / f"{stem}.png"), stem
        assert (out / f"{stem}.pdf").stat().st_size > 0
    table = pd.read_csv(out / "table.csv").set_index(["ema.mu", "column"])
    for mu in (0.99, 0.999, 0.9999):
        for nfe in NFES:
            values = _finished_final(store, mu, f"eval/sw2/nfe{nfe}")
            assert table.loc[(mu, f"NFE {nfe}"), "mean"] == pytest.approx(values.mean(), rel=1e-12)
            assert table.loc[(mu, f"NFE {nfe}"), "std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
            assert table.loc[(mu, f"NFE {nfe}"), "n"] == len(values)
    assert table.loc[(0.9, "NFE 1"), "n"] == 0 and table.loc[(0.9, "NFE 1"), "cell"] == "— (0/3 finished)"
    # The printed markdown shows the same numbers, rounded.
    mean_text = done.stdout.split("\n| 0.9999 | ")[1].split(" ± ")[0].strip("*")
    assert float(mean_text) == pytest.approx(_finished_final(store, 0.9999, "eval/sw2/nfe1").mean(), abs=1e-3)


def test_report_unknown_sweep_lists_known_ones(store, capsys):
    from analysis.report import main

    assert main(["no_such_sweep", "--tracking-uri", store["uri"], "--no-plots"]) == 2
    assert "ablation_dsm" in capsys.readouterr().err


# ----------------------------------------------------------------------------- relaunches and divergence
# A second store: "ablation_ema" launched twice with different settings (smoke, then paper with more
# steps) and "ablation_dsm" whose seeds diverge (NaN or inf logged) or skip the metric.
OLD_STEPS, NEW_STEPS = 100, 200


def _log_run(client, exp_id, parent_id, sweep, mu, seed, status, history, *, steps, budget, start):
    """One trial with the launcher's tags and params (seed and runtime.* included, as the launcher logs them)."""
    tags = {"mlflow.parentRunId": parent_id, "ctmlab.sweep": sweep, "ctmlab.role": "trial", "ctmlab.seed": str(seed),
            "ctmlab.variant": f"ema.mu={mu:g}", "ctmlab.axes": json.dumps({"ema.mu": mu}), "ctmlab.budget": budget,
            "ctmlab.config_hash": f"{mu:g}-{steps}-{seed}"}
    run_id = client.create_run(exp_id, tags=tags, start_time=start).info.run_id
    params = [Param("ema.mu", repr(mu)), Param("train.steps", str(steps)), Param("seed", str(seed)),
              Param("runtime.out_dir", f"/runs/{budget}/{mu:g}-s{seed}-{start}")]
    metrics = [Metric(key, value, start + step, step) for key, values in history.items() for step, value in enumerate(values)]
    _batched_log(client, run_id, metrics, params)
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def revisions(tmp_path_factory):
    root = tmp_path_factory.mktemp("revisions")
    uri, client, exp_id = _new_store(root)
    clock = iter(range(1_700_000_000_000, 1_800_000_000_000, 1000))
    parents, histories = {}, {}

    def trial(parent, sweep, mu, seed, status, history, steps, budget):
        run_id = _log_run(client, exp_id, parents[parent], sweep, mu, seed, status, history, steps=steps,
                          budget=budget, start=next(clock))
        histories[run_id] = history

    for parent, budget in (("old", "smoke"), ("new", "paper"), ("dsm", "smoke")):
        sweep = "ablation_dsm" if parent == "dsm" else SWEEP
        parents[parent] = client.create_run(exp_id, tags={"ctmlab.sweep": sweep, "ctmlab.role": "sweep",
                                                          "ctmlab.budget": budget}, start_time=next(clock)).info.run_id
    for seed in SEEDS:  # the first launch: all three seeds of mu=0.99 finished
        trial("old", SWEEP, 0.99, seed, "FINISHED", {"eval/sw2/nfe1": [1.0, 0.5 + 0.01 * seed]}, OLD_STEPS, "smoke")
    for seed, status in ((0, "FINISHED"), (1, "FINISHED"), (2, "RUNNING")):  # the relaunch: seed 2 still runs
        trial("new", SWEEP, 0.99, seed, status, {"eval/sw2/nfe1": [0.8, 0.3 + 0.02 * seed][: 1 + (status == "FINISHED")]},
              NEW_STEPS, "paper")
    for seed, value in ((0, 0.7), (0, 0.6), (1, 0.65)):  # mu=0.9: seed 0 ran twice with the same config
        trial("new", SWEEP, 0.9, seed, "FINISHED", {"eval/sw2/nfe1": [0.9, value]}, NEW_STEPS, "paper")
    finals = {0.1: (12.0, math.nan, 12.5), 0.2: (13.0, 13.1, 13.2), 0.3: (11.0, math.inf, 11.5), 0.4: (None, 20.0, 21.0)}
    for mu, values in finals.items():
        for seed, value in zip(SEEDS, values):
            history = {"train/loss": [1.0]} if value is None else {"eval/sw2/nfe1": [15.0, value]}
            trial("dsm", "ablation_dsm", mu, seed, "FINISHED", history, OLD_STEPS, "smoke")
    return {"uri": uri, "parents": parents, "histories": histories}


def test_table_uses_only_the_newest_config_of_a_row(revisions):
    df = load_runs("ctm-lab", sweep=SWEEP, tracking_uri=revisions["uri"])
    table = ablation_table(df, rows="axis", metric="sw2")
    new = df[(df["param.train.steps"] == NEW_STEPS) & (df["param.ema.mu"] == 0.99) & (df["status"] == "FINISHED")]
    cell = table.frame.loc[0.99, "NFE 1"]
    assert (cell["n"], cell["n_expected"]) == (2, 3)  # the old config's FINISHED seed 2 is not borrowed
    assert cell["mean"] == pytest.approx(new["metric.eval/sw2/nfe1"].mean(), rel=1e-12)
    assert table.cells.loc[0.99, "NFE 1"].endswith("(2/3)")
    notes = "\n".join(table.notes)
    assert "0.99: 3 run(s) of 1 older config(s) left out" in notes and "0.99: seed 2 still running" in notes
    assert "0.9: seed 2 no run" in notes and "0.9: 1 run(s)" not in notes  # mu=0.9 has one config
    assert "1 duplicate run(s)" in notes
    # The seed-0 re-run of mu=0.9 is one seed: the newest run counts.
    newest = df[df["param.ema.mu"] == 0.9].sort_values("start_time").drop_duplicates("tag.ctmlab.seed", keep="last")
    assert table.frame.loc[0.9, ("NFE 1", "n")] == 2
    assert table.frame.loc[0.9, ("NFE 1", "mean")] == pytest.approx(newest["metric.eval/sw2/nfe1"].mean(), rel=1e-12)


def test_step_plot_uses_the_table_runs_one_per_seed(revisions):
    df = load_runs("ctm-lab", sweep=SWEEP, tracking_uri=revisions["uri"])
    fig = analysis.plot_metric_vs_step(df, "eval/sw2/nfe1")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"0.9 (n=2)", "0.99 (n=2)"}  # n counts seeds, not runs
    for mu, label in ((0.99, "0.99 (n=2)"), (0.9, "0.9 (n=2)")):
        runs = df[(df["param.ema.mu"] == mu) & (df["status"] == "FINISHED") & (df["param.train.steps"] == NEW_STEPS)]
        runs = runs.sort_values("start_time").drop_duplicates("tag.ctmlab.seed", keep="last")
        expected = np.mean([revisions["histories"][r]["eval/sw2/nfe1"] for r in runs["run_id"]], axis=0)
        np.testing.assert_allclose(lines[label].get_ydata(), expected)


def test_report_budget_and_parent_options(revisions, tmp_path):
    from analysis.report import main

    for flags, n, mean in ((["--budget", "smoke"], 3, np.mean([0.5, 0.51, 0.52])),
                           (["--parent", revisions["parents"]["new"]], 2, np.mean([0.3, 0.32]))):
        out = tmp_path / flags[0].strip("-")
        assert main([SWEEP, "--tracking-uri", revisions["uri"], "--no-plots", "--out", str(out), *flags]) == 0
        table = pd.read_csv(out / "table.csv").set_index(["ema.mu", "column"])
        assert table.loc[(0.99, "NFE 1"), "n"] == n and table.loc[(0.99, "NFE 1"), "n_expected"] == 3
        assert table.loc[(0.99, "NFE 1"), "mean"] == pytest.approx(mean, rel=1e-12)
    assert set(table.index.get_level_values(0)) == {0.9, 0.99}
    assert main([SWEEP, "--tracking-uri", revisions["uri"], "--no-plots", "--budget", "nope"]) == 2


def test_diverged_seeds_are_counted_and_never_best(revisions):
    df = load_runs("ctm-lab", sweep="ablation_dsm", tracking_uri=revisions["uri"])
    pd.testing.assert_frame_equal(df, load_runs("ctm-lab", sweep="ablation_dsm", tracking_uri=revisions["uri"],
                                                method="search"))
    by_seed = df.set_index(["param.ema.mu", "tag.ctmlab.seed"])
    assert by_seed.loc[(0.3, 1), "metric.eval/sw2/nfe1"] == math.inf  # not the SQL store's float max
    assert "eval/sw2/nfe1" in by_seed.loc[(0.1, 1), "nan_metrics"]
    assert by_seed.loc[(0.4, 0), "nan_metrics"] == () and math.isnan(by_seed.loc[(0.4, 0), "metric.eval/sw2/nfe1"])

    table = ablation_table(df, rows="axis", metric="sw2")
    assert table.cells.loc[0.1, "NFE 1"] == "12.25 ± 0.35 (2/3, 1 diverged)"
    assert table.cells.loc[0.3, "NFE 1"] == "11.25 ± 0.35 (2/3, 1 diverged)"
    best = table.frame[("NFE 1", "is_best")].astype(bool)
    assert list(best[best].index) == [0.2]  # 0.3 and 0.1 have lower means but a seed that blew up
    long = table.long.set_index("ema.mu")
    assert list(long["n_diverged"]) == [1, 0, 1, 0] and list(long["n_no_metric"]) == [0, 0, 0, 1]
    notes = "\n".join(table.notes)
    assert "0.1: seed 1 diverged (non-finite value)" in notes and "0.3: seed 1 diverged" in notes
    assert "0.4: seed 0 finished without this metric" in notes and "0.2:" not in notes
    assert "**" not in next(line for line in table.to_markdown().splitlines() if line.startswith("| 0.1 |"))


def test_config_identity_ignores_seed_runtime_and_teacher_path():
    from analysis.tables import config_identity

    frame = pd.DataFrame({
        "param.seed": [0, 1, 2, 0],
        "param.runtime.out_dir": ["/a/s0", "/b/s1", "/a/s2", "/a/s0b"],
        "param.teacher.checkpoint": ["/a/teacher", "/b/teacher", "/a/teacher", "/a/teacher"],
        "tag.ctmlab.teacher_hash": ["t1", "t1", "t1", "t1"],
        "param.train.steps": [100, 100, 100, 200],
    })
    identity = config_identity(frame)
    assert identity[0] == identity[1] == identity[2] != identity[3]
    assert len(set(config_identity(frame.drop(columns="tag.ctmlab.teacher_hash")))) == 3  # paths differ
