"""Sweep files: every refusal names its key and happens before any store, teacher or Ray is touched."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from sweeps import launch
from sweeps.spec import SweepError, Trial, UnknownSweepError, list_sweeps, load_sweep, parse_sweep

SHIPPED = ("ablation_gan", "ablation_ema", "ablation_dsm", "ablation_ode_steps", "ablation_N", "tune_lr")


def _sweep(**changes) -> dict:
    raw = {
        "description": "test sweep",
        "base": "configs/toy_ctm.yaml",
        "teacher": {"base": "configs/toy_teacher.yaml"},
        "axes": {"ema.target_rate": [0.9, 0.99]},
        "seeds": [0, 1],
        "metric": "eval/sw2/nfe1",
        "budgets": {"smoke": {"set": {"train.steps": 20}, "resources": {"cpus": 1, "gpus": 0}}},
    }
    raw.update(changes)
    return raw


def _refused(raw: dict, *fragments: str, budget: str = "smoke", overrides=()) -> str:
    with pytest.raises(SweepError) as info:
        parse_sweep(raw, name="t").trials(budget, list(overrides), root="/tmp/ctm-lab-never-created")
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in: {text}"
    return text


def test_every_shipped_sweep_validates_for_both_budgets(tmp_path):
    assert set(SHIPPED) <= set(list_sweeps())
    for name in SHIPPED:
        spec = load_sweep(name)
        assert spec.description and set(spec.budgets) == {"smoke", "paper"}
        smoke, paper = spec.trials("smoke", root=tmp_path), spec.trials("paper", root=tmp_path)
        assert smoke and paper
        assert all(t.config.data.spec == "toy:gmm2d_8" and t.resources.gpus == 0 for t in smoke)
        assert all(t.config.data.spec.startswith("cifar10:") and t.resources.gpus == 4 for t in paper)
        assert all(t.config.data.batch_size == 256 and t.config.optim.lr == 4e-4 or name == "tune_lr" for t in paper)
        assert all(t.config.ctm.distance == "lpips" and t.estimated_gpu_hours > 0 for t in paper)


def test_trials_are_a_grid_times_seeds_with_stable_hashes_and_dirs(tmp_path):
    spec = parse_sweep(_sweep(), name="t")
    trials = spec.trials("smoke", root=tmp_path)
    assert [(t.axes["ema.target_rate"], t.seed) for t in trials] == [(0.9, 0), (0.9, 1), (0.99, 0), (0.99, 1)]
    assert len({t.config_hash for t in trials}) == 4
    assert all(t.config.ema.target_rate == t.axes["ema.target_rate"] and t.config.seed == t.seed for t in trials)
    assert all(t.out_dir.parent == tmp_path / "trials" and t.config_hash in t.out_dir.name for t in trials)
    assert trials[0].variant == "ema.target_rate=0.9"
    # The teacher is named by its config hash, so the same trial hashes alike under another root.
    again = spec.trials("smoke", root=tmp_path / "elsewhere")
    assert [t.config_hash for t in again] == [t.config_hash for t in trials]
    assert trials[0].config.teacher.checkpoint.startswith(str(tmp_path / "teachers" / "edm-"))
    assert Trial.from_dict(json.loads(json.dumps(trials[0].to_dict()))) == trials[0]


def test_unknown_keys_are_refused_with_their_name():
    _refused(_sweep(axis={"optim.lr": [1e-3]}), "axis", "unknown key", "axes")
    _refused(_sweep(budgets={"smoke": {"stes": 3}}), "budgets.smoke.stes", "unknown key")
    _refused(_sweep(budgets={"quick": {}}), "budgets.quick", "unknown budget")
    _refused(_sweep(teacher={"base": "configs/toy_teacher.yaml", "seed": 3}), "teacher.seed", "unknown key")
    _refused(_sweep(set={"optim.lrr": 1e-3}), "optim.lrr", "not a config key", "optim.lr")
    _refused(_sweep(scheduler={"type": "asha", "grace": 3}), "scheduler.grace", "unknown key")


def test_bad_values_are_refused_with_their_key():
    _refused(_sweep(budgets={"smoke": {"set": {"train.steps": -5}}}), "train.steps")
    _refused(_sweep(axes={"ema.target_rate": [0.9, 1.5]}), "ema.target_rate", "trial 2")
    _refused(_sweep(axes={"loss.lambda_gan": ["off", "fast"]}), "loss.lambda_gan", "cannot read weight schedule")
    _refused(_sweep(seeds=[0, -1]), "seeds")
    _refused(_sweep(mode="lowest"), "mode")
    _refused(_sweep(budgets={"smoke": {"resources": {"cpus": 0}}}), "resources.cpus")
    _refused(_sweep(budgets={"smoke": {"resources": {"gpus": 1.5}}}), "resources.gpus")
    _refused(_sweep(metric="sw2"), "metric", "not a metric key")
    _refused(_sweep(metric="eval/sw2/nfe8"), "metric", "NFE 8 is not in eval.nfe")
    _refused(_sweep(metric="eval/fid/nfe1"), "metric", "scored by sw2/energy")
    _refused(_sweep(base="configs/nope.yaml"), "base", "nope.yaml", "not found")
    _refused(_sweep(axes={"optim.lr": {"loguniform": [1e-3, 1e-4]}}, search={"algo": "optuna"}), "low must be < high")


def test_empty_axes_and_bad_axis_paths_are_refused():
    _refused(_sweep(axes={"ema.target_rate": []}), "ema.target_rate", "empty axis")
    _refused(_sweep(axes={"ema.target_rat": [0.9]}), "ema.target_rat", "not a config key", "ema.target_rate")
    _refused(_sweep(axes={"ema": [0.9]}), "'ema'", "section")
    _refused(_sweep(axes={"seed": [1, 2]}), "seeds")
    _refused(_sweep(axes={"ema.target_rate": [0.9, 0.9]}), "appears twice")
    _refused(_sweep(seeds=[]), "seeds", "empty")


def test_cross_checks_refuse_what_would_fail_mid_sweep(monkeypatch):
    _refused(_sweep(axes={"optim.lr": {"loguniform": [1e-4, 1e-2]}}), "distributions", "search")
    _refused(_sweep(search={"algo": "optuna"}), "optuna", "choice")
    _refused(_sweep(set={"model.hidden": 64}), "model section must match the teacher", "model.hidden")
    _refused(_sweep(), "is a swept axis", overrides=["ema.target_rate=0.5"])
    _refused(_sweep(axes={"loss.lambda_gan": ["off", "0"]}), "same config")
    monkeypatch.delenv("CTM_LAB_NO_SUCH_VAR", raising=False)
    _refused(_sweep(budgets={"smoke": {"set": {"data.spec": "cifar10:${CTM_LAB_NO_SUCH_VAR}"}}}),
             "CTM_LAB_NO_SUCH_VAR", "not set")


def test_overrides_apply_to_trials_and_shared_sections_to_the_teacher(tmp_path):
    spec = parse_sweep(_sweep(), name="t")
    plan = spec.plan("smoke", ["model.hidden=64", "optim.lr=2e-3"], tmp_path)
    trial = plan.trials()[0]
    assert trial.config.model.hidden == 64 and trial.config.optim.lr == 2e-3
    teacher_file = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "toy_teacher.yaml").read_text())
    assert plan.teacher_config.model.hidden == 64  # model/process/data are shared with the teacher
    assert plan.teacher_config.optim.lr == teacher_file["optim"]["lr"]  # the rest is the trials' own
    assert plan.teacher_config.mode == "edm" and plan.teacher_hash in plan.teacher_checkpoint
    assert spec.plan("smoke", [], tmp_path).teacher_hash != plan.teacher_hash


def test_launcher_refuses_bad_specs_before_any_store_or_ray(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cases = {
        "unknown_key.yaml": (_sweep(axes={"ema.target_rate": [0.9]}, scheduler={"kind": "asha"}), "scheduler.kind"),
        "bad_value.yaml": (_sweep(budgets={"smoke": {"set": {"train.steps": 0}}}), "train.steps"),
        "empty_axis.yaml": (_sweep(axes={"loss.lambda_dsm": []}), "empty axis"),
        "bad_path.yaml": (_sweep(axes={"loss.lambda_gn": ["off"]}), "loss.lambda_gn"),
    }
    for name, (raw, fragment) in cases.items():
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        code = launch.main([str(path), "--root", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert code == 2 and fragment in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_unknown_sweep_lists_known_ones_and_list_prints_descriptions(capsys):
    with pytest.raises(UnknownSweepError) as info:
        load_sweep("ablation_gann")
    assert all(name in str(info.value) for name in SHIPPED)
    assert launch.main(["ablation_gann"]) == 2
    assert "ablation_ema" in capsys.readouterr().err
    assert launch.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in SHIPPED:
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert len(line.split(None, 1)[1]) > 10


def test_dry_run_prints_the_trial_table_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    root = tmp_path / "runs"
    assert launch.main(["ablation_gan", "--dry-run", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    trials = load_sweep("ablation_gan").trials("smoke", root=root)
    for t in trials:
        row = next(line for line in out.splitlines() if t.config_hash in line)
        assert row.split()[1] == t.axes["loss.lambda_gan"] and row.split()[2] == str(t.seed)
    assert "est. GPU-h" in out and f"{len(trials)} trial(s)" in out and "dry run: nothing started" in out
    assert launch.main(["ablation_gan", "--dry-run", "--budget", "paper", "--root", str(root)]) == 0
    paper = capsys.readouterr().out
    assert "111.11" in paper and "to train, est." in paper  # 4 GPUs x 100k steps x 1 s; the CIFAR teacher
    assert not root.exists() and not (tmp_path / "mlflow.db").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
