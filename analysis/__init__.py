"""Turn ctm-lab sweep runs logged to MLflow into ablation tables and figures.

    df = load_runs("ctm-lab", sweep="ablation_ema")          # one typed row per trial
    table = ablation_table(df, rows="axis", metric="sw2")    # mean ± std (n) per variant x NFE
    print(table.to_markdown())

Command line: ``python -m analysis.report NAME``. The MLflow schema read here is the one in
the project contract (tags ctmlab.*, params = flattened config, eval/{metric}/nfe{n} metrics,
best/<key> summaries, samples/*.png artifacts).
"""

from .plots import (
    latest_sample,
    plot_metric_vs_nfe,
    plot_metric_vs_param,
    plot_metric_vs_step,
    plot_sample_grid,
    save_figure,
)
from .runs import list_sweeps, load_runs
from .tables import DEFAULT_LAYOUTS, AblationTable, Layout, ablation_table, layout_for

__all__ = [
    "load_runs",
    "list_sweeps",
    "ablation_table",
    "AblationTable",
    "Layout",
    "DEFAULT_LAYOUTS",
    "layout_for",
    "plot_metric_vs_nfe",
    "plot_metric_vs_step",
    "plot_metric_vs_param",
    "plot_sample_grid",
    "latest_sample",
    "save_figure",
]
