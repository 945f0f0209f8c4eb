"""Named sweeps over the CTM trainer: small YAML files in this folder, run on Ray Tune or SLURM,
logged to MLflow.

    python sweeps/launch.py --list
    python sweeps/launch.py ablation_gan [--budget smoke|paper] [--dry-run] [--resume] ...

Python API (shared with the SLURM layer in `cluster/`):

    from sweeps.spec import load_sweep
    from sweeps.trial import run_trial
    spec = load_sweep("ablation_gan")
    trials = spec.trials("smoke")                     # validated list[Trial]
    metrics = run_trial(trials[0], tracking_uri, "ctm-lab", parent_run_id)
"""
from .spec import (Axis, Resources, SweepError, SweepPlan, SweepSpec, Trial, UnknownSweepError, list_sweeps,
                   load_sweep)

__all__ = ["Axis", "Resources", "SweepError", "SweepPlan", "SweepSpec", "Trial", "UnknownSweepError",
           "list_sweeps", "load_sweep"]
