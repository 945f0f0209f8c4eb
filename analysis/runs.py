"""Load the trials of a sweep from MLflow into one typed pandas DataFrame.

One row per run. Column families (dotted MLflow names are kept verbatim after the prefix):

    run_id, run_name, parent_run_id, status, start_time, end_time, duration_s
    nan_metrics    the metric keys whose last logged value is NaN, as a sorted tuple: NaN in a
                   metric.<key> column otherwise means the run never logged the key, and a
                   diverged trial must not read as one that skipped an evaluation.
    tag.<key>      every ``ctmlab.*`` tag. Strings, except ``tag.ctmlab.seed`` (Int64) and
                   ``tag.ctmlab.git_dirty`` (boolean).
    param.<key>    every param, parsed from MLflow's strings: ints, floats, bools, None and
                   JSON/Python lists become real values. A column whose values are all ints is
                   Int64, all numbers float64, all bools boolean, all strings str; a column that
                   mixes strings with other kinds keeps the raw strings so that it stays sortable.
    metric.<key>   the last logged value of every metric (what ``search_runs`` returns). SQL stores
                   save +-inf as +-float max; those come back as +-inf.
    best.<key>     for ``eval/*`` keys only: the best (lowest) value over the run's history.

Reused trials: when a launch finds a trial's config already FINISHED (in this or another sweep)
it does not train it again but records a copy of that run under its own parent, tagged with the
trial's sweep, axes and seed and ``ctmlab.reused_from`` = the original run (sweeps.tracking.
record_reused). So ``load_runs(sweep=X)`` shows every trial of X, whichever sweep computed it; a
copy whose original (or another copy of it) is already a row of the same sweep is dropped, so
no trial is counted twice. ``parent_run_id`` keeps one launch's trials only.

Why ``best.*`` does not read metric histories: ``get_metric_history`` is one request per
run x key, i.e. tens of thousands of requests for a 2,000-trial study. Instead ``best.<key>``
is read from the summary metric ``best/<key>`` when the run has one: the sweep launcher logs it
(= min over the history) at the end of a trial, and the trainer logs it for its checkpoint
metric whenever that improves -- either way its last logged value is the minimum so far.
A (run, key) without a summary (FAILED/KILLED/RUNNING trials, or keys nobody summarised) falls
back to the last logged value: exact when the metric improved monotonically, an upper bound
otherwise. ``exact_best=True`` replaces that fallback by the true minimum, paying one history
request per such (run, key); summarised values are never re-read. ``df.attrs["best_source"]``
counts how many (run, key) values came from each source ("summary", "last_value", "history").

How runs are read (``method``): "search" pages through ``MlflowClient.search_runs`` with a
filter string (PAGE_SIZE runs per request); it works with every store, including a remote
tracking server. For a SQL store (sqlite, postgres, mysql) MLflow's search materialises one ORM
object per param, tag and metric (~120 per trial), which costs 8-12 s for 2,000 trials here, so
"auto" reads such stores with "sql": the same rows selected with plain SQLAlchemy Core queries
built on MLflow's own table models (runs, tags, params, latest_metrics; same experiment, same
active lifecycle stage, same sweep tag), about 10x faster. Both produce identical frames.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

__all__ = ["load_runs", "list_sweeps", "parse_param_value", "typed_column", "mlflow_client"]

TAG_PREFIX = "ctmlab."
REUSED_FROM_TAG = "ctmlab.reused_from"
SWEEP_TAG = "ctmlab.sweep"
BEST_SUMMARY_PREFIX = "best/"
EVAL_PREFIX = "eval/"
BUDGET_TAG = "ctmlab.budget"
PAGE_SIZE = 1000  # SQL stores accept up to 50,000 per page; 1,000 keeps each answer modest.

# pandas >= 3 has a real string dtype (missing values stay missing); older pandas keeps objects.
STR_DTYPE: Any = "str" if int(pd.__version__.split(".")[0]) >= 3 else object

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


class RunRecord(NamedTuple):
    """What load_runs needs of one run, whichever way it was read."""

    run_id: str
    run_name: str | None
    status: str
    start_time: int | None
    end_time: int | None
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


def mlflow_client(tracking_uri: str | None = None) -> MlflowClient:
    """A client for ``tracking_uri`` (None: MLflow's own default) without touching global state."""
    return MlflowClient(tracking_uri=tracking_uri)


def parse_param_value(text: str | None) -> Any:
    """Turn one MLflow param string back into the value the config held.

    Numbers are matched by regex rather than ``int()``/``float()`` so that strings such as
    ``"1_000"`` or ``" 3"`` stay strings. Lists come back as lists (JSON first, then Python
    literals such as ``['a', 'b']`` or tuples). Anything unparsable stays the string it was.
    """
    value = _parse_cached(text)
    # The cache shares one object between equal strings; hand every row its own container.
    return copy.deepcopy(value) if isinstance(value, (list, dict)) else value


@functools.lru_cache(maxsize=65536)
def _parse_cached(text: str | None) -> Any:
    if text is None:
        return None
    if text in ("None", "null"):
        return None
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        return float(text)
    if text[:1] in "[{(":
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return text
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, (list, dict)):
            return value
    return text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def typed_column(values: Sequence[Any], raw: Sequence[str | None] | None = None) -> pd.Series:
    """Give a column of parsed values one honest dtype (see the module docstring)."""
    present = [v for v in values if v is not None]
    if not present:
        return pd.Series(values, dtype=object)
    if all(isinstance(v, bool) for v in present):
        return pd.Series(pd.array(list(values), dtype="boolean"))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        if all(-(2**63) <= v < 2**63 for v in present):
            return pd.Series(pd.array(list(values), dtype="Int64"))
        return pd.Series(list(values), dtype=object)  # beyond int64: keep Python ints
    if all(_is_number(v) for v in present):
        return pd.Series([math.nan if v is None else float(v) for v in values], dtype="float64")
    if all(isinstance(v, str) for v in present):
        return pd.Series(list(values), dtype=STR_DTYPE)
    has_str = any(isinstance(v, str) for v in present)
    if has_str and raw is not None:
        return pd.Series(list(raw), dtype=STR_DTYPE)
    return pd.Series(list(values), dtype=object)


def _quote(value: str, argument: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{argument}={value!r} contains both quote characters; MLflow filters cannot express it")


def _resolve_experiment(client: MlflowClient, experiment: str):
    if not isinstance(experiment, str) or not experiment:
        raise ValueError(f"experiment must be a non-empty experiment name or id, got {experiment!r}")
    found = client.get_experiment_by_name(experiment)
    if found is None and experiment.isdigit():
        try:
            found = client.get_experiment(experiment)
        except MlflowException:  # unknown id
            found = None
    if found is None:
        raise ValueError(
            f"experiment {experiment!r} does not exist at tracking_uri {client.tracking_uri!r}"
        )
    return found


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Every matching run, one page of PAGE_SIZE at a time (never one request per run)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=PAGE_SIZE,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token or not len(page):
            return runs


def _records_from_search(client: MlflowClient, experiment_id: str, sweep: str | None) -> list[RunRecord]:
    filter_string = "" if sweep is None else f"tags.`ctmlab.sweep` = {_quote(sweep, 'sweep')}"
    return [
        RunRecord(r.info.run_id, r.info.run_name, r.info.status, r.info.start_time, r.info.end_time,
                  dict(r.data.tags), dict(r.data.params), dict(r.data.metrics))
        for r in _search_all(client, experiment_id, filter_string)
    ]


def _sql_store(client: MlflowClient):
    """The client's SqlAlchemyStore, or None for file stores and tracking servers."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return store if isinstance(store, SqlAlchemyStore) else None


def _records_from_sql(store, experiment_id: str, sweep: str | None) -> list[RunRecord]:
    """The rows search_runs would return, read without building ORM objects."""
    from mlflow.entities import LifecycleStage
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
    from sqlalchemy import select

    selected = select(SqlRun.run_uuid).where(
        SqlRun.experiment_id == int(experiment_id), SqlRun.lifecycle_stage == LifecycleStage.ACTIVE
    )
    if sweep is not None:
        tagged = select(SqlTag.run_uuid).where(SqlTag.key == "ctmlab.sweep", SqlTag.value == sweep)
        selected = selected.where(SqlRun.run_uuid.in_(tagged))
    with store.ManagedSessionMaker() as session:
        info = session.execute(
            select(SqlRun.run_uuid, SqlRun.name, SqlRun.status, SqlRun.start_time, SqlRun.end_time)
            .where(SqlRun.run_uuid.in_(selected))
            .order_by(SqlRun.start_time, SqlRun.run_uuid)
        ).all()
        tags = session.execute(
            select(SqlTag.run_uuid, SqlTag.key, SqlTag.value).where(SqlTag.run_uuid.in_(selected))
        ).all()
        params = session.execute(
            select(SqlParam.run_uuid, SqlParam.key, SqlParam.value).where(SqlParam.run_uuid.in_(selected))
        ).all()
        metrics = session.execute(
            select(SqlLatestMetric.run_uuid, SqlLatestMetric.key, SqlLatestMetric.value, SqlLatestMetric.is_nan)
            .where(SqlLatestMetric.run_uuid.in_(selected))
        ).all()
    by_run: dict[str, tuple[dict, dict, dict]] = {row[0]: ({}, {}, {}) for row in info}
    for run_id, key, value in tags:
        by_run[run_id][0][key] = value
    for run_id, key, value in params:
        by_run[run_id][1][key] = value
    for run_id, key, value, is_nan in metrics:
        by_run[run_id][2][key] = math.nan if is_nan else value
    return [
        RunRecord(run_id, name, status, start, end, *by_run[run_id])
        for run_id, name, status, start, end in info
    ]


def list_sweeps(experiment: str = "ctm-lab", tracking_uri: str | None = None) -> list[str]:
    """Names of the sweeps launched into ``experiment`` (from their parent runs), sorted."""
    client = mlflow_client(tracking_uri)
    exp = _resolve_experiment(client, experiment)
    parents = _search_all(client, exp.experiment_id, "tags.`ctmlab.role` = 'sweep'")
    return sorted({r.data.tags.get("ctmlab.sweep", "") for r in parents} - {""})


def _timestamps(millis: list[int | None]) -> pd.Series:
    series = pd.Series([math.nan if m is None else float(m) for m in millis], dtype="float64")
    return pd.to_datetime(series, unit="ms", utc=True)


def _tag_column(key: str, values: list[str | None]) -> pd.Series:
    if key == "ctmlab.seed":
        parsed = [parse_param_value(v) for v in values]
        if all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in parsed):
            return pd.Series(pd.array(parsed, dtype="Int64"))
    if key == "ctmlab.git_dirty":
        parsed = [parse_param_value(v) for v in values]
        if all(v is None or isinstance(v, bool) for v in parsed):
            return pd.Series(pd.array(parsed, dtype="boolean"))
    return pd.Series(values, dtype=STR_DTYPE)


def _best_values(
    client: MlflowClient, runs: list[RunRecord], eval_keys: Iterable[str], exact_best: bool
) -> tuple[dict[str, list[float]], dict[str, int]]:
    source = {"summary": 0, "last_value": 0, "history": 0}
    columns: dict[str, list[float]] = {}
    for key in sorted(eval_keys):
        column = []
        for run in runs:
            metrics = run.metrics
            summary = metrics.get(BEST_SUMMARY_PREFIX + key)
            if summary is not None:
                column.append(float(summary))
                source["summary"] += 1
            elif key not in metrics:
                column.append(math.nan)
            elif exact_best:
                history = client.get_metric_history(run.run_id, key)
                column.append(min((m.value for m in history), default=math.nan))
                source["history"] += 1
            else:
                column.append(float(metrics[key]))
                source["last_value"] += 1
        columns[key] = column
    return columns, source


def _unclamped(values: list[float]) -> pd.Series:
    """A float column with MLflow's SQL stand-ins for +-inf (+-float max) turned back into +-inf."""
    series = pd.Series(values, dtype="float64")
    return series.mask(series >= sys.float_info.max, math.inf).mask(series <= -sys.float_info.max, -math.inf)


def _drop_duplicate_copies(runs: list[RunRecord]) -> list[RunRecord]:
    """Keep a reused-run copy only where its original is not already a row of the same sweep."""
    present = {(r.tags.get(SWEEP_TAG), r.run_id) for r in runs if REUSED_FROM_TAG not in r.tags}
    kept = []
    for run in runs:
        origin = run.tags.get(REUSED_FROM_TAG)
        if origin is not None:
            key = (run.tags.get(SWEEP_TAG), origin)
            if key in present:
                continue
            present.add(key)
        kept.append(run)
    return kept


def load_runs(
    experiment: str = "ctm-lab",
    sweep: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    include_parent: bool = False,
    exact_best: bool = False,
    method: str = "auto",
    budget: str | None = None,
) -> pd.DataFrame:
    """One row per trial run of ``sweep`` (all sweeps when None) in ``experiment``.

    ``parent_run_id`` keeps the trials of that one launch, ``budget`` those of one budget (tag
    ``ctmlab.budget``, e.g. "smoke" or "paper"). Reused trials appear once (see the
    module docstring; ``attrs["reused"]`` counts them). Parent runs (tag ``ctmlab.role = sweep``)
    are left out unless ``include_parent``. Deleted
    runs are never returned. Rows are ordered by start time. ``tracking_uri`` is used for this
    call only; the global MLflow tracking URI is not changed. ``method``: "auto", "search" or
    "sql" (see the module docstring). The frame's ``attrs`` record experiment, experiment_id,
    tracking_uri, sweep, method and best_source so that plots can reach the same store later.
    """
    if sweep is not None and (not isinstance(sweep, str) or not sweep):
        raise ValueError(f"sweep must be a non-empty string or None, got {sweep!r}")
    if method not in ("auto", "search", "sql"):
        raise ValueError(f"method must be 'auto', 'search' or 'sql', got {method!r}")
    client = mlflow_client(tracking_uri)
    exp = _resolve_experiment(client, experiment)
    store = _sql_store(client) if method in ("auto", "sql") else None
    if method == "sql" and store is None:
        raise ValueError(f"method='sql' needs a SQL tracking store, not {client.tracking_uri!r}")
    if store is not None:
        runs, method = _records_from_sql(store, exp.experiment_id, sweep), "sql"
    else:
        runs, method = _records_from_search(client, exp.experiment_id, sweep), "search"
    if not include_parent:
        runs = [r for r in runs if r.tags.get("ctmlab.role") != "sweep"]
    if parent_run_id is not None:
        runs = [r for r in runs if r.tags.get("mlflow.parentRunId") == parent_run_id]
    if budget is not None:
        runs = [r for r in runs if r.tags.get(BUDGET_TAG) == budget]
    runs.sort(key=lambda r: (r.start_time or 0, r.run_id))
    runs = _drop_duplicate_copies(runs)

    columns: dict[str, pd.Series] = {
        "run_id": pd.Series([r.run_id for r in runs], dtype=STR_DTYPE),
        "run_name": pd.Series([r.run_name for r in runs], dtype=STR_DTYPE),
        "parent_run_id": pd.Series([r.tags.get("mlflow.parentRunId") for r in runs], dtype=STR_DTYPE),
        "status": pd.Series([r.status for r in runs], dtype=STR_DTYPE),
        "start_time": _timestamps([r.start_time for r in runs]),
        "end_time": _timestamps([r.end_time for r in runs]),
    }
    columns["duration_s"] = (columns["end_time"] - columns["start_time"]).dt.total_seconds()
    columns["nan_metrics"] = pd.Series(
        [tuple(sorted(k for k, v in r.metrics.items() if isinstance(v, float) and math.isnan(v))) for r in runs],
        dtype=object)

    tag_keys = sorted({k for r in runs for k in r.tags if k.startswith(TAG_PREFIX)})
    for key in tag_keys:
        columns[f"tag.{key}"] = _tag_column(key, [r.tags.get(key) for r in runs])

    param_keys = sorted({k for r in runs for k in r.params})
    for key in param_keys:
        raw = [r.params.get(key) for r in runs]
        columns[f"param.{key}"] = typed_column([parse_param_value(v) for v in raw], raw)

    metric_keys = sorted({k for r in runs for k in r.metrics if not k.startswith(BEST_SUMMARY_PREFIX)})
    for key in metric_keys:
        columns[f"metric.{key}"] = _unclamped([r.metrics.get(key, math.nan) for r in runs])

    eval_keys = [k for k in metric_keys if k.startswith(EVAL_PREFIX)]
    best, source = _best_values(client, runs, eval_keys, exact_best)
    for key, values in best.items():
        columns[f"best.{key}"] = _unclamped(values)

    frame = pd.DataFrame(columns)
    frame.attrs.update(
        experiment=exp.name,
        experiment_id=exp.experiment_id,
        tracking_uri=client.tracking_uri,
        sweep=sweep,
        method=method,
        best_source=source,
        reused=sum(REUSED_FROM_TAG in r.tags for r in runs),
    )
    return frame
