"""Paper-style ablation tables: swept axis in the rows, NFE (or any column) across, mean ± std over seeds.

Incomplete data is part of the table, never averaged away: only FINISHED trials with a finite
value enter the statistics, every cell states how many seeds it holds out of how many the sweep
ran ("0.051 ± 0.003 (2/3)", "12.25 ± 0.35 (2/3, 1 diverged)", or "— (0/3 finished)" when none
finished), and ``notes`` says which seed is FAILED, still RUNNING, has no run at all, diverged
(logged NaN or ±inf), or finished without logging the metric. A cell with a diverged seed is
never marked best: its mean hides the seed that blew up.
The expected seed set of a cell is the union of the seeds seen anywhere in the frame (or the
``expected_seeds`` argument), so a seed that crashed before its run was created still counts.
A row never mixes configs: only the runs of its newest config enter it (see :func:`select_runs`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "AblationTable",
    "Layout",
    "DEFAULT_LAYOUTS",
    "ablation_table",
    "layout_for",
    "resolve_metric",
    "resolve_rows",
    "nfe_columns",
    "select_runs",
]

FINISHED = "FINISHED"
RUNNING_STATES = ("RUNNING", "SCHEDULED")
METRIC_PREFERENCE = ("fid", "fd_digits", "sw2", "energy")  # order tried by metric="auto"
STAT_FUNCTIONS = ("mean", "std", "sem", "median", "min", "max")


@dataclass(frozen=True)
class Layout:
    """How a shipped sweep is tabulated by default.

    rows: "axis" (the param column of each key in tag ctmlab.axes, falling back to the axis
    value itself and then to the variant label), "variant" (tag ctmlab.variant), or column names.
    """

    rows: str | tuple[str, ...] = "axis"
    cols: str | None = "nfe"
    metric: str = "auto"
    nfe: tuple[int, ...] | None = (1, 2, 4)
    teacher: bool = True
    title: str = ""


DEFAULT_LAYOUTS: dict[str, Layout] = {
    "ablation_gan": Layout(rows="variant", title="GAN loss weight schedule (lambda_GAN)"),
    "ablation_ema": Layout(rows="axis", title="EMA decay mu"),
    "ablation_dsm": Layout(rows="axis", title="DSM loss weight lambda_DSM"),
    "ablation_ode_steps": Layout(rows="axis", title="Teacher ODE solver steps"),
    "ablation_N": Layout(rows="axis", title="Time discretisation N"),
    "tune_lr": Layout(rows="axis", title="Learning rate"),
}


def layout_for(sweep: str) -> Layout:
    """The default layout of ``sweep``: exact name, else the longest shipped name it starts with
    (so "ablation_ema-v2" uses "ablation_ema"), else a generic rows="axis" layout."""
    if sweep in DEFAULT_LAYOUTS:
        return DEFAULT_LAYOUTS[sweep]
    prefixes = [name for name in DEFAULT_LAYOUTS if sweep.startswith(name)]
    if prefixes:
        return DEFAULT_LAYOUTS[max(prefixes, key=len)]
    return Layout(title=sweep)


# ----------------------------------------------------------------------------- resolution helpers


def _prefix(which: str) -> str:
    if which == "final":
        return "metric."
    if which == "best":
        return "best."
    raise ValueError(f"which must be 'final' or 'best', got {which!r}")


def resolve_metric(df: pd.DataFrame, metric: str) -> str:
    """Map metric="auto" to the first of METRIC_PREFERENCE that has eval columns in ``df``."""
    if metric != "auto":
        return metric
    for name in METRIC_PREFERENCE:
        pattern = re.compile(rf"^(metric|best)\.eval/{re.escape(name)}/(teacher_)?nfe\d+$")
        if any(pattern.match(c) and df[c].notna().any() for c in df.columns):
            return name
    raise ValueError(f"metric='auto' found no eval/<metric>/nfe<n> columns for any of {METRIC_PREFERENCE}")


def nfe_columns(
    df: pd.DataFrame,
    metric: str,
    which: str = "final",
    nfe: Sequence[int] | None = None,
    teacher: bool = True,
    gamma: float | None = None,
) -> list[dict[str, Any]]:
    """The metric columns forming the NFE axis, students by NFE then teachers by NFE.

    Each entry: {"label", "column", "kind" ("student"|"teacher"), "nfe"}.
    """
    prefix = _prefix(which)
    base = re.escape(f"{prefix}eval/{metric}/")
    suffix = "" if gamma is None else re.escape(f"/gamma{gamma:g}")
    student = re.compile(rf"^{base}nfe(\d+){suffix}$")
    teacher_re = re.compile(rf"^{base}teacher_nfe(\d+)$")
    found = []
    for column in df.columns:
        if m := student.match(column):
            n = int(m.group(1))
            if nfe is None or n in nfe:
                found.append({"label": f"NFE {n}", "column": column, "kind": "student", "nfe": n})
        elif teacher and (m := teacher_re.match(column)):
            n = int(m.group(1))
            found.append({"label": f"teacher NFE {n}", "column": column, "kind": "teacher", "nfe": n})
    found.sort(key=lambda c: (c["kind"] == "teacher", c["nfe"]))
    if not found:
        available = sorted({c.split("/")[1] for c in df.columns if c.startswith(f"{prefix}eval/")})
        raise ValueError(
            f"metric={metric!r} has no {prefix}eval/{metric}/nfe<n> columns"
            f"{'' if nfe is None else f' for nfe={tuple(nfe)}'}; metrics present: {available}"
        )
    return found


def _hashable(value: Any) -> Hashable:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _display_name(column: str) -> str:
    if column == "tag.ctmlab.variant":
        return "variant"
    for prefix in ("param.", "tag.ctmlab.", "tag.", "axis."):
        if column.startswith(prefix):
            return column[len(prefix):]
    return column


def _is_seed_axis(key: str) -> bool:
    return key == "seed" or key.endswith(".seed")


def _axis_columns(df: pd.DataFrame) -> dict[str, list[Hashable]] | None:
    column = "tag.ctmlab.axes"
    if column not in df.columns:
        return None
    parsed = []
    for text in df[column]:
        if not isinstance(text, str) or not text:
            parsed.append({})
            continue
        try:
            value = json.loads(text)
        except ValueError as error:
            raise ValueError(f"rows='axis': tag ctmlab.axes is not JSON: {text!r}") from error
        if not isinstance(value, dict):
            raise ValueError(f"rows='axis': tag ctmlab.axes must be a JSON object, got {text!r}")
        parsed.append(value)
    keys: list[str] = []
    for axes in parsed:
        keys.extend(k for k in axes if k not in keys and not _is_seed_axis(k))
    if not keys:
        return None
    out: dict[str, list[Hashable]] = {}
    for key in keys:
        param = f"param.{key}"
        has_axis = [key in axes for axes in parsed]
        if param in df.columns and df.loc[has_axis, param].notna().all():
            out[key] = [_hashable(v) for v in df[param].tolist()]
        else:
            out[key] = [_hashable(axes.get(key)) for axes in parsed]
    return out


def resolve_rows(df: pd.DataFrame, rows: str | Sequence[str]) -> pd.DataFrame:
    """A frame (same index as ``df``) of hashable row-key columns named for display.

    "variant" -> tag ctmlab.variant; "axis" -> one column per swept axis (see Layout); any other
    string is a column of ``df`` (a bare param path such as "optim.lr" also finds "param.optim.lr").
    """
    requested = [rows] if isinstance(rows, str) else list(rows)
    if not requested:
        raise ValueError("rows must name at least one column")
    keys: dict[str, list[Hashable]] = {}
    for item in requested:
        if item == "axis":
            axes = _axis_columns(df)
            if axes is not None:
                keys.update(axes)
                continue
            item = "variant"
        if item == "variant":
            item = "tag.ctmlab.variant"
        column = item if item in df.columns else f"param.{item}" if f"param.{item}" in df.columns else None
        if column is None:
            raise ValueError(f"rows={rows!r}: no column {item!r} in the runs frame")
        keys[_display_name(column)] = [_hashable(v) for v in df[column].tolist()]
    return pd.DataFrame(keys, index=df.index, dtype=object)


def _sort_key(key: tuple) -> tuple:
    def one(value: Any) -> tuple:
        if value is None:
            return (2, 0, "")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (0, value, "")
        return (1, 0, str(value))

    return tuple(one(v) for v in key)


def _format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _row_label(names: Sequence[str], key: tuple) -> str:
    if len(names) == 1:
        return _format_value(key[0])
    return ", ".join(f"{n}={_format_value(v)}" for n, v in zip(names, key))


# ----------------------------------------------------------------------------- statistics


def _aggregate(values: np.ndarray, name: str, ddof: int) -> float:
    if values.size == 0:
        return math.nan
    if name == "mean":
        return float(np.mean(values))
    if name == "std":
        return float(np.std(values, ddof=ddof)) if values.size > ddof else math.nan
    if name == "sem":
        return float(np.std(values, ddof=ddof) / math.sqrt(values.size)) if values.size > ddof else math.nan
    if name == "median":
        return float(np.median(values))
    if name == "min":
        return float(np.min(values))
    if name == "max":
        return float(np.max(values))
    raise ValueError(f"agg entries must be among {STAT_FUNCTIONS}, got {name!r}")


def _decimals(spread: float) -> int:
    """Two significant digits of the spread decide the decimals of mean and spread alike."""
    return int(min(8, max(0, 1 - math.floor(math.log10(spread)))))


def format_estimate(center: float, spread: float | None, digits: int | None = None) -> str:
    if spread is not None and math.isfinite(spread):
        d = digits if digits is not None else (_decimals(spread) if spread > 0 else 4)
        return f"{center:.{d}f} ± {spread:.{d}f}"
    if digits is not None:
        return f"{center:.{digits}f}"
    return f"{center:.4g}"


# ----------------------------------------------------------------------------- the table


@dataclass
class AblationTable:
    """Result of :func:`ablation_table`.

    frame: index = row keys; columns = MultiIndex (column label, field) with fields
           ``*agg, "n", "n_expected", "is_best"``.
    cells: same shape, the display strings ("mean ± std (n)").
    long:  one row per cell with every count (n_failed, n_running, n_missing, n_no_metric, n_diverged).
    notes: human-readable reasons for every incomplete cell.
    """

    frame: pd.DataFrame
    cells: pd.DataFrame
    long: pd.DataFrame
    notes: list[str]
    row_names: list[str]
    columns: list[dict[str, Any]]
    metric_key: str
    caption: str
    lower_is_better: bool = True
    agg: tuple[str, ...] = ("mean", "std")
    title: str = ""
    row_keys: list[tuple] = field(default_factory=list)

    # -- renderers ---------------------------------------------------------------------------
    def _grid(self) -> tuple[list[str], list[list[str]], list[list[bool]]]:
        header = [*self.row_names, *[c["label"] for c in self.columns]]
        body, best = [], []
        for position, key in enumerate(self.row_keys):  # positional: row keys may hold None
            labels = [_format_value(v) for v in key]
            cells = self.cells.iloc[position]
            marks = self.frame.iloc[position]
            body.append(labels + [cells[c["label"]] for c in self.columns])
            best.append([False] * len(labels) + [bool(marks[(c["label"], "is_best")]) for c in self.columns])
        return header, body, best

    def to_markdown(self, notes: bool = True) -> str:
        """A GitHub pipe table; the best cell of each column is bold; notes follow as a list."""
        def esc(text: str) -> str:
            return text.replace("|", "\\|")

        header, body, best = self._grid()
        lines = []
        if self.title:
            lines += [f"**{esc(self.title)}**", ""]
        lines += [
            "| " + " | ".join(esc(h) for h in header) + " |",
            "|" + "|".join([":---"] * len(self.row_names) + ["---:"] * len(self.columns)) + "|",
        ]
        for row, marks in zip(body, best):
            cells = [f"**{esc(c)}**" if m else esc(c) for c, m in zip(row, marks)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", self.caption]
        if notes and self.notes:
            lines += ["", "Notes:"] + [f"- {esc(n)}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_latex(self, caption: str | None = None, label: str | None = None, notes: bool = True) -> str:
        """A booktabs tabular (wrapped in a table float when caption or label is given)."""
        header, body, best = self._grid()
        ncols = len(header)
        spec = "l" * len(self.row_names) + "c" * len(self.columns)
        lines = [f"% {_latex_escape(self.caption)}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
        lines.append(" & ".join(_latex_escape(h) for h in header) + r" \\")
        lines.append("\\midrule")
        for row, marks in zip(body, best):
            cells = [_latex_cell(c, m) for c, m in zip(row, marks)]
            lines.append(" & ".join(cells) + r" \\")
        lines.append("\\bottomrule")
        if notes and self.notes:
            for note in self.notes:
                lines.append(f"\\multicolumn{{{ncols}}}{{l}}{{\\footnotesize {_latex_escape(note)}}} \\\\")
        lines.append("\\end{tabular}")
        if caption is None and label is None:
            return "\n".join(lines) + "\n"
        wrapped = ["\\begin{table}[t]", "\\centering"]
        if caption is not None:
            wrapped.append(f"\\caption{{{_latex_escape(caption)}}}")
        if label is not None:
            wrapped.append(f"\\label{{{label}}}")
        return "\n".join(wrapped + lines + ["\\end{table}"]) + "\n"

    def to_csv(self, path: str | Path) -> Path:
        """The long (one row per cell) frame with full-precision numbers and all counts."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.long.to_csv(path, index=False)
        return path

    def __str__(self) -> str:
        return self.to_markdown()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "±": r"$\pm$", "—": "---", "γ": r"$\gamma$",
    "μ": r"$\mu$", "λ": r"$\lambda$",
}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def _latex_cell(text: str, best: bool) -> str:
    escaped = _latex_escape(text)
    return f"\\textbf{{{escaped}}}" if best else escaped


def config_identity(df: pd.DataFrame) -> list[tuple]:
    """A seed-free identity of each run's config: its params except the seed and runtime.*.

    Why not tag ctmlab.config_hash: that hash covers the seed, so each seed of one config has its
    own. Like the hash, the identity ignores runtime.*; a run tagged ctmlab.teacher_hash is
    identified by that hash instead of its teacher.checkpoint path, which depends on the sweep root.
    """
    names = [c for c in df.columns if c.startswith("param.") and not c.startswith("param.runtime.")
             and not _is_seed_axis(c[len("param."):])]
    columns = [[_hashable(v) for v in df[c].tolist()] for c in names]
    teacher = "tag.ctmlab.teacher_hash"
    if teacher in df.columns and "param.teacher.checkpoint" in names:
        hashes = [_hashable(v) for v in df[teacher].tolist()]
        position = names.index("param.teacher.checkpoint")
        columns[position] = [f"teacher-config:{h}" if h is not None else v for h, v in zip(hashes, columns[position])]
    return list(zip(*columns)) if columns else [()] * len(df)


def _newest_config(units: pd.DataFrame, group: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep, per group (a row, or a row x column value), the runs of the config started last.

    Why: mixing configs silently makes a cell look complete when its seeds come from different
    settings (a relaunch with new settings whose seed 2 still runs would borrow the old seed 2).
    "Started last" = the newest start_time of any of the config's runs (frame order breaks ties).
    Returns (kept, left out).
    """
    ordered = units.sort_values(["_start", "_i"], na_position="first", kind="stable")
    newest = {}
    for key, config in zip(zip(*(ordered[g] for g in group)), ordered["_config"]):
        newest[key] = config
    keep = [newest[key] == config for key, config in zip(zip(*(units[g] for g in group)), units["_config"])]
    mask = np.asarray(keep, dtype=bool)
    return units[mask], units[~mask]


def _choose_runs(units: pd.DataFrame, group: list[str]) -> tuple[pd.DataFrame, int]:
    """One run per (row, column group, seed): FINISHED first, then RUNNING, then the newest."""
    rank = units["status"].map(lambda s: 0 if s == FINISHED else 1 if s in RUNNING_STATES else 2)
    ordered = units.assign(_rank=rank).sort_values(["_rank", "_start"], ascending=[True, False], kind="stable")
    chosen = ordered.drop_duplicates(subset=group, keep="first")
    return chosen.drop(columns="_rank"), len(units) - len(chosen)


def _units(df: pd.DataFrame, row_key: list[tuple], col_group: list, seeds: str | None) -> pd.DataFrame:
    """One row per run with what run selection needs: row, column group, seed, status, start, config."""
    real_seeds = [_hashable(v) for v in df[seeds]] if seeds is not None else [None] * len(df)
    # A run without a seed is its own repeat (never merged with other seedless runs).
    seed_values = [s if s is not None else f"run {r}" for s, r in zip(real_seeds, df["run_id"])]
    return pd.DataFrame({
        "_row": row_key,
        "_col": [("g", g) for g in col_group],  # wrap so that None groups survive drop_duplicates
        "_seed": seed_values,
        "status": df["status"].astype(object).tolist(),
        "_start": df["start_time"] if "start_time" in df.columns else pd.Series(pd.NaT, index=df.index),
        "_i": np.arange(len(df)),
        "_config": config_identity(df),
    }, index=df.index)


def select_runs(df: pd.DataFrame, rows: str | Sequence[str] = "axis", seeds: str | None = "tag.ctmlab.seed") -> pd.DataFrame:
    """The runs :func:`ablation_table` (cols="nfe") uses: per row the newest config only, then one
    run per seed (FINISHED first, then RUNNING, then the newest), so figures match the table."""
    if seeds is not None and seeds not in df.columns:
        raise ValueError(f"seeds={seeds!r} is not a column of df")
    keys = resolve_rows(df, rows)
    units = _units(df, [tuple(t) for t in keys.itertuples(index=False, name=None)], [None] * len(df), seeds)
    current, _ = _newest_config(units, ["_row"])
    chosen, _ = _choose_runs(current, ["_row", "_col", "_seed"])
    return df.iloc[sorted(chosen["_i"])]


def _is_diverged(df: pd.DataFrame, column: str, i: int, value: Any) -> bool:
    """A FINISHED run's missing value is divergence when it is ±inf or was logged as NaN
    (load_runs lists those keys in ``nan_metrics``; without that column NaN means not logged)."""
    if value is not None and not pd.isna(value):
        return math.isinf(float(value))
    if "nan_metrics" not in df.columns:
        return False
    logged_nan = df["nan_metrics"].iat[i]
    key = column.split(".", 1)[1]
    return isinstance(logged_nan, (tuple, list)) and (key in logged_nan or f"best/{key}" in logged_nan)


def _issue_text(failed: list, running: list, missing: list, no_metric: list, diverged: list) -> str:
    parts = []
    for seeds, what in ((failed, "failed/killed"), (running, "still running"), (missing, "no run"),
                        (diverged, "diverged (non-finite value)"), (no_metric, "finished without this metric")):
        if seeds:
            parts.append(f"seed {', '.join(str(s) for s in sorted(seeds, key=str))} {what}")
    return "; ".join(parts)


def ablation_table(
    df: pd.DataFrame,
    rows: str | Sequence[str],
    cols: str | None = "nfe",
    metric: str = "sw2",
    seeds: str | None = "tag.ctmlab.seed",
    agg: Sequence[str] = ("mean", "std"),
    lower_is_better: bool = True,
    *,
    which: str = "final",
    nfe: Sequence[int] | None = None,
    teacher: bool = True,
    gamma: float | None = None,
    expected_seeds: Sequence[Any] | None = None,
    ddof: int = 1,
    digits: int | None = None,
    title: str = "",
) -> AblationTable:
    """Aggregate trial runs (a :func:`analysis.load_runs` frame) into an ablation table.

    rows: see :func:`resolve_rows`. cols: "nfe" spreads ``eval/{metric}/nfe{n}`` (and, with
    ``teacher``, ``eval/{metric}/teacher_nfe{n}``) across columns, restricted to ``nfe`` when given;
    ``gamma`` picks the ``/gamma{g}`` variants instead. Any other string names a column of ``df``
    whose values become the columns; then ``metric`` is a metric key ("eval/sw2/nfe1"), a full
    column name, or a bare metric name meaning NFE ``nfe[0]`` (default 1). cols=None gives one column.
    which: "final" (last logged value) or "best" (``best.*`` columns, see analysis.runs).
    seeds: the column identifying repeats (None: every run is its own repeat). std uses ``ddof``.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a pandas DataFrame from load_runs, got {type(df).__name__}")
    if df.empty:
        raise ValueError("df holds no runs: nothing to tabulate (check the experiment and sweep names)")
    agg = tuple(agg)
    if not agg or any(a not in STAT_FUNCTIONS for a in agg):
        raise ValueError(f"agg must be a non-empty subset of {STAT_FUNCTIONS}, got {agg!r}")
    prefix = _prefix(which)
    if "status" not in df.columns:
        raise ValueError("df has no 'status' column; build it with analysis.load_runs")
    if seeds is not None and seeds not in df.columns:
        raise ValueError(f"seeds={seeds!r} is not a column of df")
    metric = resolve_metric(df, metric)

    keys = resolve_rows(df, rows)
    row_names = list(keys.columns)
    row_key = [tuple(t) for t in keys.itertuples(index=False, name=None)]

    # Column specification: each run contributes to every NFE column, or to the column of its value.
    if cols == "nfe":
        columns = nfe_columns(df, metric, which, nfe, teacher, gamma)
        col_group = [None] * len(df)
        seeds_across = False
    else:
        seeds_across = False
        if metric.startswith(("metric.", "best.")):
            metric_column = metric
        elif "/" in metric:
            metric_column = prefix + metric
        else:
            metric_column = f"{prefix}eval/{metric}/nfe{(nfe or (1,))[0]}"
        if metric_column not in df.columns:
            raise ValueError(f"metric={metric!r}: column {metric_column!r} is not in df")
        if cols is None:
            col_group = [None] * len(df)
            columns = [{"label": metric_column.split(".", 1)[1], "column": metric_column, "kind": "single", "nfe": None}]
        else:
            col_keys = resolve_rows(df, cols)
            if col_keys.shape[1] != 1:
                raise ValueError(f"cols={cols!r} must resolve to exactly one column")
            col_group = [_hashable(v) for v in col_keys.iloc[:, 0]]
            seeds_across = seeds is not None and col_group == [_hashable(v) for v in df[seeds]]
            values = sorted(set(col_group), key=lambda v: _sort_key((v,)))
            columns = [{"label": _format_value(v), "column": metric_column, "kind": "value", "value": v, "nfe": None}
                       for v in values]

    real_seeds = [_hashable(v) for v in df[seeds]] if seeds is not None else [None] * len(df)
    units = _units(df, row_key, col_group, seeds)
    # A column of a swept value holds configs of its own; a column per seed does not.
    current, stale = _newest_config(units, ["_row"] if seeds_across else ["_row", "_col"])
    chosen, superseded = _choose_runs(current, ["_row", "_col", "_seed"])

    if seeds is None:
        universe = None
    elif expected_seeds is not None:
        universe = {_hashable(s) for s in expected_seeds}
    else:
        universe = {s for s in real_seeds if s is not None}

    row_order = sorted(set(row_key), key=_sort_key)
    center = next((a for a in agg if a in ("mean", "median")), agg[0])
    spread = next((a for a in agg if a in ("std", "sem")), None)

    records = []
    cell_issues: dict[tuple, dict[str, str]] = {}
    by_row = {k: g for k, g in chosen.groupby("_row", sort=False)}
    for key in row_order:
        group = by_row.get(key, chosen.iloc[:0])
        for spec in columns:
            if spec["kind"] == "value":
                cell = group[group["_col"] == ("g", spec["value"])]
            else:
                cell = group
            present = set(cell["_seed"])
            if universe is None:
                expected = present
            elif seeds_across:  # one column per seed: each cell expects only its own seed
                expected = {spec["value"]} | present
            else:
                expected = universe | present
            values, failed, running, no_metric, diverged = [], [], [], [], []
            for seed, status, i in zip(cell["_seed"], cell["status"], cell["_i"]):
                if status == FINISHED:
                    value = df[spec["column"]].iat[i]
                    if value is not None and pd.notna(value) and math.isfinite(float(value)):
                        values.append(float(value))
                    elif _is_diverged(df, spec["column"], i, value):
                        diverged.append(seed)
                    else:
                        no_metric.append(seed)
                elif status in RUNNING_STATES:
                    running.append(seed)
                else:
                    failed.append(seed)
            missing = sorted(expected - present, key=str) if universe is not None else []
            array = np.asarray(values, dtype=float)
            record = {"_key": key, "column": spec["label"]}
            record.update({a: _aggregate(array, a, ddof) for a in agg})
            record.update(n=len(values), n_expected=len(expected), n_failed=len(failed),
                          n_running=len(running), n_missing=len(missing), n_no_metric=len(no_metric),
                          n_diverged=len(diverged))
            records.append(record)
            issue = _issue_text(failed, running, missing, no_metric, diverged)
            if issue:
                cell_issues.setdefault(key, {})[spec["label"]] = issue

    long = pd.DataFrame.from_records(records)
    # Mark the best cell of each column among cells holding a finished value and no diverged seed.
    long["is_best"] = False
    for label, part in long.groupby("column", sort=False):
        scored = part[(part["n"] > 0) & (part["n_diverged"] == 0)]
        if scored.empty:
            continue
        target = scored[center].min() if lower_is_better else scored[center].max()
        long.loc[scored.index[scored[center] == target], "is_best"] = True

    def text(rec: pd.Series) -> str:
        diverged = f", {rec['n_diverged']} diverged" if rec["n_diverged"] else ""
        if rec["n"] == 0:
            return f"— (0/{rec['n_expected']} finished{diverged})"
        count = f"{rec['n']}" if rec["n"] == rec["n_expected"] else f"{rec['n']}/{rec['n_expected']}"
        return f"{format_estimate(rec[center], rec[spread] if spread else None, digits)} ({count}{diverged})"

    long["cell"] = long.apply(text, axis=1)

    # Wide frame and display cells, indexed by the row keys.
    if len(row_names) == 1:
        index = pd.Index([k[0] for k in row_order], name=row_names[0], dtype=object)
    else:
        index = pd.MultiIndex.from_tuples(row_order, names=row_names)
    labels = [c["label"] for c in columns]
    fields = [*agg, "n", "n_expected", "is_best"]
    wide: dict[tuple[str, str], list] = {}
    cells: dict[str, list] = {}
    for label in labels:
        part = long[long["column"] == label]
        for f in fields:
            wide[(label, f)] = part[f].tolist()
        cells[label] = part["cell"].tolist()
    frame = pd.DataFrame(wide, index=index)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["column", "field"])
    cells_frame = pd.DataFrame(cells, index=index)

    key_frame = pd.DataFrame(long["_key"].tolist(), columns=row_names, dtype=object)
    long = pd.concat([key_frame, long.drop(columns="_key")], axis=1)

    notes = []
    for key in row_order:
        older = [config for row, config in zip(stale["_row"], stale["_config"]) if row == key]
        if older:
            notes.append(f"{_row_label(row_names, key)}: {len(older)} run(s) of {len(set(older))} older "
                         "config(s) left out (only the newest config of a row is tabulated)")
        issues = cell_issues.get(key)
        if not issues:
            continue
        label = _row_label(row_names, key)
        distinct = set(issues.values())
        if len(issues) == len(labels) and len(distinct) == 1:
            notes.append(f"{label}: {distinct.pop()}")
        else:
            notes.extend(f"{label} / {col}: {issue}" for col, issue in issues.items())
    source = df.attrs.get("best_source") or {}
    if which == "best" and source.get("last_value"):
        notes.append(f"best.* values of this frame: {source.get('summary', 0)} from best/ summaries, "
                     f"{source['last_value']} are last logged values (no summary; an upper bound on the best), "
                     f"{source.get('history', 0)} from full histories (load_runs(exact_best=True) makes all exact)")
    if superseded:
        notes.append(f"{superseded} duplicate run(s) of an already covered seed were ignored "
                     "(a FINISHED or newer run of the same seed was used)")

    metric_key = columns[0]["column"] if cols != "nfe" else f"{prefix}eval/{metric}/nfe*"
    stat_text = f"{center} ± {spread}" if spread else center
    caption = (f"{metric} ({'last logged value' if which == 'final' else 'best over training'}); "
               f"{stat_text} over seeds of FINISHED trials, (n) or (n finished/n expected); "
               f"{'lower' if lower_is_better else 'higher'} is better, best per column in bold "
               "(never a cell with diverged seeds).")
    return AblationTable(
        frame=frame, cells=cells_frame, long=long, notes=notes, row_names=row_names, columns=columns,
        metric_key=metric_key, caption=caption, lower_is_better=lower_is_better, agg=agg, title=title,
        row_keys=row_order,
    )
