"""Write the ablation table and figures of one sweep, and print the table.

    python -m analysis.report NAME [--experiment E] [--tracking-uri U] [--format md|latex|csv] [--out DIR]
                                   [--budget B] [--parent RUN_ID]

NAME is the sweep name (tag ctmlab.sweep). The table layout comes from DEFAULT_LAYOUTS
(exact name, or the longest shipped name NAME starts with); --metric/--which/--layout override it.
All trials of the sweep are read unless --budget (tag ctmlab.budget) or --parent (one launch's
parent run) narrows them; within a row only the newest config is tabulated either way.
Written to --out (default outputs/analysis/NAME): table.<md|tex|csv> in the chosen format plus
table.csv (full precision, always), and as PNG + PDF: metric_vs_nfe, metric_vs_step,
metric_vs_<axis> (single-axis sweeps) and samples (when runs logged samples/*.png).
A figure that cannot be drawn is reported on stderr and skipped; the table never is.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .plots import plot_metric_vs_nfe, plot_metric_vs_param, plot_metric_vs_step, plot_sample_grid, save_figure
from .runs import list_sweeps, load_runs
from .tables import DEFAULT_LAYOUTS, ablation_table, layout_for, resolve_metric, resolve_rows

SUFFIX = {"md": "md", "latex": "tex", "csv": "csv"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", metavar="NAME", help="sweep name (tag ctmlab.sweep)")
    parser.add_argument("--experiment", default="ctm-lab", help="MLflow experiment name or id (default ctm-lab)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own default)")
    parser.add_argument("--format", choices=sorted(SUFFIX), default="md", help="table format written and printed")
    parser.add_argument("--out", default=None, help="output folder (default outputs/analysis/NAME)")
    parser.add_argument("--metric", default=None, help="metric name (sw2, energy, fd_digits, fid, auto)")
    parser.add_argument("--which", choices=("final", "best"), default="final", help="last logged or best value")
    parser.add_argument("--layout", choices=sorted(DEFAULT_LAYOUTS), default=None, help="force a shipped layout")
    parser.add_argument("--budget", default=None, help="only trials of this budget (tag ctmlab.budget, e.g. paper)")
    parser.add_argument("--parent", default=None, metavar="RUN_ID", help="only the trials of this launch's parent run")
    parser.add_argument("--no-plots", action="store_true", help="write the table only")
    return parser


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "value"


def _figures(df, layout, metric: str, which: str, out: Path) -> list[Path]:
    """Draw every figure that the data allow; report and skip the others."""
    jobs = [("metric_vs_nfe", lambda: plot_metric_vs_nfe(df, layout.rows, metric, which))]
    first_nfe = min(layout.nfe) if layout.nfe else 1
    step_key = f"eval/{metric}/nfe{first_nfe}"
    jobs.append(("metric_vs_step", lambda: plot_metric_vs_step(df, step_key, layout.rows)))
    axes = resolve_rows(df, layout.rows)
    if axes.shape[1] == 1:
        name = axes.columns[0]
        jobs.append((f"metric_vs_{_slug(name)}", lambda: plot_metric_vs_param(df, layout.rows, metric, layout.nfe, which)))
    jobs.append(("samples", lambda: plot_sample_grid(df, layout.rows)))
    written: list[Path] = []
    for stem, draw in jobs:
        try:
            written += save_figure(draw(), out / stem)
        except ValueError as error:
            print(f"skipped {stem}: {error}", file=sys.stderr)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # This process is ours: keep MLflow's per-file download progress bars out of the printed table.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        df = load_runs(args.experiment, sweep=args.name, tracking_uri=args.tracking_uri,
                       parent_run_id=args.parent, budget=args.budget)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if df.empty:
        known = list_sweeps(args.experiment, args.tracking_uri)
        narrowed = "".join(f" with {flag} {value!r}" for flag, value in (("--budget", args.budget),
                                                                        ("--parent", args.parent)) if value)
        print(f"error: sweep {args.name!r} has no trial runs{narrowed} in experiment {args.experiment!r}; "
              f"sweeps there: {known}", file=sys.stderr)
        return 2
    layout = DEFAULT_LAYOUTS[args.layout] if args.layout else layout_for(args.name)
    out = Path(args.out) if args.out else Path("outputs") / "analysis" / _slug(args.name)
    out.mkdir(parents=True, exist_ok=True)
    try:
        metric = resolve_metric(df, args.metric or layout.metric)
        table = ablation_table(df, layout.rows, layout.cols, metric, which=args.which, nfe=layout.nfe,
                               teacher=layout.teacher, title=layout.title or args.name)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = [table.to_csv(out / "table.csv")]
    if args.format == "md":
        text = table.to_markdown()
    elif args.format == "latex":
        text = table.to_latex()
    else:
        text = (out / "table.csv").read_text()
    if args.format != "csv":
        path = out / f"table.{SUFFIX[args.format]}"
        path.write_text(text)
        written.append(path)
    if not args.no_plots:
        written += _figures(df, layout, metric, args.which, out)
    print(text, end="")
    print("wrote: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
