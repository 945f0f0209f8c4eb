"""`python -m analysis.report NAME` on the smoke-sweep store: its markdown table, CSV and plots hold the
numbers the trials logged to MLflow.

The store is the one tests/test_notebooks.py builds with the real launcher (built once per session).
Expected values are computed here from the plain MLflow client (full metric histories, FINISHED
trial runs of the sweep), never through the analysis package under test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from test_notebooks import (EXPERIMENT, PNG_MAGIC, REPO, SUBSETS, assert_cell_matches, build_smoke_store,
                            finished_trials, last_logged, table_rows)

# sweep -> (first header cell of its table, the figure named after its rows, row label of a run)
REPORTS = {
    "ablation_gan": ("variant", "metric_vs_variant", lambda run: run.data.tags["ctmlab.variant"]),
    "ablation_N": ("ctm.num_points", "metric_vs_ctm.num_points",
                   lambda run: f"{json.loads(run.data.tags['ctmlab.axes'])['ctm.num_points']:g}"),
}
METRIC = "sw2"  # the toy sweeps' metric; the layout's metric="auto" must pick it


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_smoke_store(tmp_path_factory)


def logged_values(uri: str, sweep: str, label_of) -> dict[str, dict[str, list[float]]]:
    """{row label: {eval key: last logged value of each FINISHED seed}} straight from MLflow."""
    client = MlflowClient(tracking_uri=uri)
    out: dict[str, dict[str, list[float]]] = {}
    for run in finished_trials(uri, sweep):
        keys = [k for k in run.data.metrics if k.startswith(f"eval/{METRIC}/") and "gamma" not in k]
        row = out.setdefault(label_of(run), {})
        for key in keys:
            row.setdefault(key, []).append(last_logged(client, run.info.run_id, key))
    return out


def column_key(label: str) -> str:
    """Table column label -> metric key ("NFE 2" -> eval/sw2/nfe2, "teacher NFE 3" -> eval/sw2/teacher_nfe3)."""
    teacher, _, nfe = label.rpartition("NFE ")
    return f"eval/{METRIC}/{'teacher_' if teacher else ''}nfe{int(nfe)}"


@pytest.mark.parametrize("sweep", ["ablation_N"])  # one command run: ~15 s here (the gan table is checked in test_notebooks)
def test_report_table_and_plots_match_logged_metrics(store, sweep, tmp_path):
    header, figure, label_of = REPORTS[sweep]
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "analysis.report", sweep, "--tracking-uri", store["uri"], "--experiment", EXPERIMENT,
         "--format", "md", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    markdown = (out / "table.md").read_text()
    assert markdown == done.stdout

    # The markdown table: every row and column, each cell = mean ± std (n) of the logged values.
    expected = logged_values(store["uri"], sweep, label_of)
    lines = markdown.splitlines()
    columns = [c.strip() for c in next(line for line in lines if line.startswith(f"| {header} |")).strip("|").split("|")][1:]
    assert columns[:3] == ["NFE 1", "NFE 2", "NFE 4"] and any(c.startswith("teacher NFE ") for c in columns)
    assert f"{METRIC} (last logged value)" in markdown
    rows = table_rows(markdown, f"| {header} |")
    assert set(rows) == set(expected) and len(rows) == len(SUBSETS[sweep][1])
    for label, cells in rows.items():
        assert len(cells) == len(columns)
        for column, cell in zip(columns, cells):
            values = expected[label][column_key(column)]
            assert len(values) == 2  # both seeds finished
            assert_cell_matches(cell, values, f"{sweep} {label} {column}")

    # The CSV beside it holds the same statistics at full precision.
    csv = pd.read_csv(out / "table.csv", dtype={header: str})
    for _, record in csv.iterrows():
        label = record[header] if header == "variant" else f"{float(record[header]):g}"
        values = expected[label][column_key(record["column"])]
        assert record["n"] == len(values) and record["n_expected"] == 2
        assert record["mean"] == pytest.approx(np.mean(values), rel=1e-9)
        assert record["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9)
    assert len(csv) == len(rows) * len(columns)

    # Plots: PNG (and PDF) for NFE, step, the swept value and the sample grid.
    for stem in ("metric_vs_nfe", "metric_vs_step", figure, "samples"):
        png = (out / f"{stem}.png").read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 2000, stem
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-", stem


@pytest.mark.parametrize("sweep", sorted(REPORTS))
def test_report_figures_draw_the_logged_values(store, sweep):
    """The figures the report saves are drawn from the logged numbers: the NFE plot's points are the
    seed means, the step plot's line is the per-step mean of the seeds' histories."""
    import analysis

    _, _, label_of = REPORTS[sweep]
    expected = logged_values(store["uri"], sweep, label_of)
    df = analysis.load_runs(EXPERIMENT, sweep=sweep, tracking_uri=store["uri"])
    layout = analysis.layout_for(sweep)

    fig = analysis.plot_metric_vs_nfe(df, layout.rows, "auto")
    ax = fig.axes[0]
    drawn = {c.get_label(): c.lines[0] for c in ax.containers if c.get_label() and not c.get_label().startswith("_")}
    assert set(drawn) == set(expected)
    for label, line in drawn.items():
        nfes = [int(x) for x in line.get_xdata()]
        assert nfes == [1, 2, 4]
        np.testing.assert_allclose(np.asarray(line.get_ydata(), dtype=float), [np.mean(expected[label][f"eval/{METRIC}/nfe{n}"]) for n in nfes],
                                   rtol=1e-9)

    client = MlflowClient(tracking_uri=store["uri"])
    histories: dict[str, list[dict[int, float]]] = {}
    for run in finished_trials(store["uri"], sweep):
        history = client.get_metric_history(run.info.run_id, f"eval/{METRIC}/nfe1")
        histories.setdefault(label_of(run), []).append({m.step: m.value for m in history})
    fig = analysis.plot_metric_vs_step(df, f"eval/{METRIC}/nfe1", layout.rows)
    lines = {line.get_label().rsplit(" (n=", 1)[0]: line for line in fig.axes[0].get_lines()}
    assert set(lines) == set(histories)
    for label, runs in histories.items():
        steps = sorted(runs[0])
        assert list(lines[label].get_xdata()) == steps == [2, 4]
        np.testing.assert_allclose(np.asarray(lines[label].get_ydata(), dtype=float), [np.mean([r[s] for r in runs]) for s in steps], rtol=1e-9)
