"""Figures for one sweep: metric vs NFE, vs training step (seed bands), vs a swept value, sample grids.

Figures are built with ``matplotlib.figure.Figure`` directly, never through pyplot, so no
backend is selected globally, nothing accumulates in pyplot's figure registry, and saving
uses the Agg (PNG) and PDF canvases whatever the session's backend. Every function returns
the Figure; with ``out`` (a path stem, suffix ignored) it also writes ``out.png`` and ``out.pdf``.

Only :func:`plot_metric_vs_step` and :func:`plot_sample_grid` talk to MLflow (one history or
artifact request per run: fine for one sweep). They reach the store of the frame
(``df.attrs["tracking_uri"]``, set by load_runs) unless ``tracking_uri`` is given.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.image import imread

from .runs import REUSED_FROM_TAG, mlflow_client
from .tables import FINISHED, _hashable, _row_label, _sort_key, ablation_table, resolve_metric, resolve_rows, select_runs

__all__ = [
    "save_figure",
    "plot_metric_vs_nfe",
    "plot_metric_vs_step",
    "plot_metric_vs_param",
    "plot_sample_grid",
    "latest_sample",
]


def save_figure(fig: Figure, out: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as ``out.<fmt>`` for every format; returns the written paths."""
    stem = Path(out)
    if stem.suffix.lower() in (".png", ".pdf", ".svg"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight")
        written.append(path)
    return written


def _finish(fig: Figure, out: str | Path | None) -> Figure:
    if out is not None:
        save_figure(fig, out)
    return fig


def _client(df: pd.DataFrame, tracking_uri: str | None):
    return mlflow_client(tracking_uri if tracking_uri is not None else df.attrs.get("tracking_uri"))


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "viridis"]
    return [cmap(i if count <= 10 else i / max(1, count - 1)) for i in range(count)]


def plot_metric_vs_nfe(
    df: pd.DataFrame,
    rows: str | Sequence[str] = "axis",
    metric: str = "sw2",
    which: str = "final",
    seeds: str | None = "tag.ctmlab.seed",
    teacher: bool = True,
    out: str | Path | None = None,
) -> Figure:
    """One line per variant: mean ± std over finished seeds against NFE (log2 axis);
    teacher results are drawn as stars at their own NFE in the variant's colour."""
    table = ablation_table(df, rows, "nfe", metric, seeds, ("mean", "std"), which=which, teacher=teacher)
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    colors = _colors(len(table.row_keys))
    ticks: set[int] = set()
    for position, (key, color) in enumerate(zip(table.row_keys, colors)):
        stats = table.frame.iloc[position]
        label = _row_label(table.row_names, key)
        student = [c for c in table.columns if c["kind"] == "student"]
        xs = [c["nfe"] for c in student if stats[(c["label"], "n")] > 0]
        ys = [stats[(c["label"], "mean")] for c in student if stats[(c["label"], "n")] > 0]
        es = [np.nan_to_num(stats[(c["label"], "std")]) for c in student if stats[(c["label"], "n")] > 0]
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=color, label=label)
            ticks.update(xs)
        for c in table.columns:
            if c["kind"] == "teacher" and stats[(c["label"], "n")] > 0:
                ax.errorbar([c["nfe"]], [stats[(c["label"], "mean")]], yerr=[np.nan_to_num(stats[(c["label"], "std")])],
                            marker="*", markersize=10, linestyle="none", color=color)
                ticks.add(c["nfe"])
    if any(c["kind"] == "teacher" for c in table.columns):
        ax.plot([], [], marker="*", linestyle="none", color="grey", label="teacher (Heun)")
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(sorted(ticks), labels=[str(t) for t in sorted(ticks)])
    ax.set_xlabel("NFE")
    ax.set_ylabel(f"{resolve_metric(df, metric)} ({which})")
    ax.set_title(df.attrs.get("sweep") or "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=", ".join(table.row_names), title_fontsize=7)
    return _finish(fig, out)


def plot_metric_vs_step(
    df: pd.DataFrame,
    key: str = "eval/sw2/nfe1",
    rows: str | Sequence[str] = "axis",
    tracking_uri: str | None = None,
    statuses: Sequence[str] | None = (FINISHED,),
    seeds: str | None = "tag.ctmlab.seed",
    out: str | Path | None = None,
) -> Figure:
    """Mean over seeds of metric ``key`` against training step, with a ±1 std band per variant.

    The runs are the table's (:func:`analysis.tables.select_runs`: newest config of a row, one run
    per seed), so re-runs never count twice and the curve agrees with the table; the legend's n
    counts seeds. ``statuses`` then picks among them (None: all, e.g. to watch RUNNING trials);
    runs that never logged ``key`` are skipped. Reads one metric history per run.
    """
    chosen = select_runs(df, rows, seeds)
    selected = chosen if statuses is None else chosen[chosen["status"].isin(list(statuses))]
    if selected.empty:
        raise ValueError(f"statuses={statuses!r}: no runs to plot")
    client = _client(df, tracking_uri)
    keys = resolve_rows(selected, rows)
    names = list(keys.columns)
    curves: dict[tuple, list[pd.Series]] = {}
    for run_id, row in zip(selected["run_id"], keys.itertuples(index=False, name=None)):
        history = client.get_metric_history(run_id, key)
        if history:
            series = pd.Series({m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))})
            curves.setdefault(tuple(row), []).append(series)
    if not curves:
        raise ValueError(f"key={key!r}: no selected run logged this metric")
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    order = sorted(curves, key=_sort_key)
    for row, color in zip(order, _colors(len(order))):
        table = pd.concat(curves[row], axis=1).sort_index()
        mean = table.mean(axis=1, skipna=True)
        std = table.std(axis=1, skipna=True, ddof=1).fillna(0.0)
        steps = table.index.to_numpy(dtype=float)
        ax.plot(steps, mean.to_numpy(), color=color, label=f"{_row_label(names, row)} (n={table.shape[1]})")
        ax.fill_between(steps, (mean - std).to_numpy(), (mean + std).to_numpy(), color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(key)
    ax.set_title(df.attrs.get("sweep") or "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=", ".join(names), title_fontsize=7)
    return _finish(fig, out)


def plot_metric_vs_param(
    df: pd.DataFrame,
    param: str = "axis",
    metric: str = "sw2",
    nfe: Sequence[int] | None = (1, 2, 4),
    which: str = "final",
    seeds: str | None = "tag.ctmlab.seed",
    out: str | Path | None = None,
) -> Figure:
    """Metric (mean ± std over finished seeds) against one swept value, one line per NFE.

    ``param`` is a column, a bare param path, or "axis" when the sweep has a single axis.
    Numeric values spanning more than two decades get a log x axis; others are categorical.
    """
    keys = resolve_rows(df, param)
    if keys.shape[1] != 1:
        raise ValueError(f"param={param!r} resolves to {keys.shape[1]} axes {list(keys.columns)}; name one")
    name = keys.columns[0]
    column = f"_x_{name}"
    frame = df.assign(**{column: keys.iloc[:, 0]})
    frame.attrs = dict(df.attrs)
    table = ablation_table(frame, column, "nfe", metric, seeds, ("mean", "std"), which=which, nfe=nfe, teacher=False)
    values = [k[0] for k in table.row_keys]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = np.asarray(values, dtype=float) if numeric else np.arange(len(values), dtype=float)
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for spec, color in zip(table.columns, _colors(len(table.columns))):
        stats = table.frame[spec["label"]]
        ok = (stats["n"] > 0).to_numpy()
        ax.errorbar(x[ok], stats["mean"].to_numpy(dtype=float)[ok], yerr=np.nan_to_num(stats["std"].to_numpy(dtype=float)[ok]),
                    marker="o", capsize=3, color=color, label=spec["label"])
    if numeric:
        positive = x[x > 0]
        if len(positive) == len(x) and positive.size and positive.max() / positive.min() > 100:
            ax.set_xscale("log")
    else:
        ax.set_xticks(x, labels=[str(v) for v in values], rotation=30, ha="right", fontsize=7)
    ax.set_xlabel(name)
    ax.set_ylabel(f"{resolve_metric(df, metric)} ({which})")
    ax.set_title(df.attrs.get("sweep") or "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(fig, out)


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def latest_sample(client, run_id: str, artifact_dir: str = "samples") -> str | None:
    """The artifact path of the newest PNG under ``artifact_dir`` (natural name order, so
    step_900.png < step_1000.png), searching one level of sub-folders; None when there is none."""
    found: list[str] = []
    stack = [(artifact_dir, 0)]
    while stack:
        folder, depth = stack.pop()
        for info in client.list_artifacts(run_id, folder):
            if info.is_dir and depth < 1:
                stack.append((info.path, depth + 1))
            elif not info.is_dir and info.path.lower().endswith(".png"):
                found.append(info.path)
    return max(found, key=_natural_key) if found else None


TILE_HEIGHT = 2.3  # inches per montage row, plus room for the caption


def _artifact_run(run: pd.Series) -> str:
    """Whose artifacts a row shows: a reused-run copy holds metrics only, its original the PNGs."""
    origin = run.get(f"tag.{REUSED_FROM_TAG}")
    return origin if isinstance(origin, str) and origin else run["run_id"]


def plot_sample_grid(
    df: pd.DataFrame,
    rows: str | Sequence[str] = "axis",
    tracking_uri: str | None = None,
    artifact_dir: str = "samples",
    seeds: str | None = "tag.ctmlab.seed",
    out: str | Path | None = None,
) -> Figure:
    """Tile the latest ``samples/*.png`` of every run: one grid row per variant, one tile per seed,
    titled with the variant (and seed; the status too when not FINISHED)."""
    client = _client(df, tracking_uri)
    keys = resolve_rows(df, rows)
    names = list(keys.columns)
    use_seeds = seeds is not None and seeds in df.columns
    tiles: dict[tuple, dict[Hashable, tuple[str, np.ndarray]]] = {}
    with tempfile.TemporaryDirectory(prefix="ctmlab-samples-") as tmp:
        for position, (index, run) in enumerate(df.iterrows()):
            source = _artifact_run(run)
            path = latest_sample(client, source, artifact_dir)
            if path is None:
                continue
            local = client.download_artifacts(source, path, dst_path=str(Path(tmp) / str(position)))
            slot = _hashable(run[seeds]) if use_seeds else run["run_id"]
            caption = f"seed {slot}" if use_seeds else run["run_id"][:8]
            if run["status"] != FINISHED:
                caption += f" [{run['status']}]"
            tiles.setdefault(tuple(keys.loc[index]), {})[slot] = (caption, imread(local))
    if not tiles:
        raise ValueError(f"artifact_dir={artifact_dir!r}: no run of this frame has PNG samples there")
    order_keys = sorted(tiles, key=_sort_key)
    # One grid column per seed (so a missing seed leaves a visible gap); run ids pack left instead.
    slots = sorted({s for t in tiles.values() for s in t}, key=lambda s: _sort_key((s,)))
    ncols = len(slots) if use_seeds else max(len(t) for t in tiles.values())
    # Tiles keep the samples' aspect (toy scatter strips are wide, image grids square).
    aspect = float(np.median([img.shape[1] / img.shape[0] for t in tiles.values() for _, img in t.values()]))
    tile_w = TILE_HEIGHT * min(max(aspect, 0.5), 4.0)
    fig = Figure(figsize=(tile_w * ncols, (TILE_HEIGHT + 0.45) * len(order_keys)))
    axes = fig.subplots(len(order_keys), ncols, squeeze=False)
    for r, key in enumerate(order_keys):
        placed = [tiles[key].get(s) for s in slots] if use_seeds else list(tiles[key].values())
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(placed) and placed[c] is not None:
                caption, image = placed[c]
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
                ax.set_title(f"{_row_label(names, key)}\n{caption}", fontsize=7)
    fig.suptitle(df.attrs.get("sweep") or "", fontsize=9)
    return _finish(fig, out)
