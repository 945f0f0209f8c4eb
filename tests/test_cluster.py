"""cluster/ without a running SLURM: node profiles, job layouts and batch plans, dry-run rendering
(sbatch scripts of the SLURM and the Ray-on-SLURM backends) and the status table."""
from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from cluster.profiles import (ProfileError, load_profile, parse_time_limit, profile_from_dict, split_overrides)
from cluster.slurm import (SubmitError, batch_plan, job_layout, missing_weights, prepare_trial, rendezvous_port,
                           required_weights, submit_sweep)
from cluster.slurm_ray import ray_ports, ray_temp_dir, submit_ray_sweep
from cluster.status import collect_status, format_table, read_progress
from sweeps.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]


def _args(**kw) -> argparse.Namespace:
    base = dict(profile=None, overrides=[], dry_run=True, max_concurrent=None, tracking_uri="sqlite:///unused.db",
                experiment=None, nodes=None, backend="slurm")
    base.update(kw)
    return argparse.Namespace(**base)


# ----------------------------------------------------------------------------------------------
# Profiles

def test_shipped_profiles_match_the_paper_hardware():
    v100 = load_profile("v100")
    assert (v100.gpus_per_node, v100.time_limit_min) == (4, 24 * 60)
    assert v100.trainer == {"data.micro_batch": 16, "gan.micro_batch": 11, "train.bf16": "off"}
    a100 = load_profile("a100")
    assert a100.gpus_per_node == 8 and a100.trainer["gan.micro_batch"] == 11 and a100.trainer["train.bf16"] == "on"
    for p in (v100, a100):
        assert p.partition and p.cpus_per_gpu >= 1 and p.mem_per_gpu and p.setup
        assert any("activate" in line for line in p.setup)


def test_cluster_overrides_change_fields_and_unknown_keys_are_named(tmp_path):
    p = load_profile("v100", ["cluster.account=proj42", "cluster.time_limit=2:30:00", "cluster.gpus_per_node=2",
                              "cluster.trainer.gan.micro_batch=8", "cluster.env.CTM_LAB_CACHE=/scratch/c",
                              "cluster.setup=[module load foo]"])
    assert (p.account, p.time_limit_min, p.gpus_per_node) == ("proj42", 150, 2)
    assert p.trainer["gan.micro_batch"] == 8 and p.env["CTM_LAB_CACHE"] == "/scratch/c"
    assert p.setup == ("module load foo",)
    with pytest.raises(ProfileError, match=r"cluster\.acount"):
        load_profile("v100", ["cluster.acount=x"])
    with pytest.raises(ProfileError, match=r"cluster\.trainer\.data\.micro"):
        load_profile("v100", ["cluster.trainer.data.micro=3"])
    with pytest.raises(ProfileError, match=r"cluster\.gpus_per_node"):
        load_profile("v100", ["cluster.gpus_per_node=0"])
    with pytest.raises(ProfileError, match=r"cluster\.mem_per_gpu"):
        load_profile("v100", ["cluster.mem_per_gpu=lots"])
    with pytest.raises(ProfileError, match=r"cluster\.signal_delay_s"):
        load_profile("v100", ["cluster.time_limit=5", "cluster.signal_delay_s=600"])
    with pytest.raises(ProfileError, match=r"unknown profile 'v1000'.*a100.*v100"):
        load_profile("v1000")
    assert split_overrides(["cluster.qos=low", "optim.lr=1e-4"]) == (["cluster.qos=low"], ["optim.lr=1e-4"])


def test_a_users_own_profile_file_and_unquoted_slurm_times(tmp_path):
    own = tmp_path / "mysite.yaml"
    own.write_text("name: mysite\ngpus_per_node: 2\ntime_limit: 12:00:00\npartition: p100\n"
                   "trainer: {data: {micro_batch: 4}}\n")
    p = load_profile(str(own))
    assert p.time_limit_min == 12 * 60   # not YAML's base-60 integer 43200
    assert p.trainer == {"data.micro_batch": 4} and p.partition == "p100"
    own.write_text("name: bad\ngpus_per_node: 2\nnodes_per_job: 3\n")
    with pytest.raises(ProfileError, match=r"cluster\.nodes_per_job"):
        load_profile(str(own))
    with pytest.raises(ProfileError, match=r"cluster\.name"):
        profile_from_dict({"gpus_per_node": 1})


@pytest.mark.parametrize("text, minutes", [("30", 30), ("10:30", 11), ("2:00:00", 120), ("1-0", 1440),
                                           ("1-12:30", 2190), ("0-0:0:30", 1), (90, 90)])
def test_slurm_time_limits_parse_to_minutes(text, minutes):
    assert parse_time_limit(text) == minutes


def test_bad_time_limit_is_named():
    with pytest.raises(ProfileError, match="cluster.time_limit"):
        parse_time_limit("tomorrow")


# ----------------------------------------------------------------------------------------------
# Layouts and batches

def test_job_layout_one_task_per_gpu_over_as_few_nodes_as_needed():
    v100 = load_profile("v100")
    assert job_layout(0, 3, v100).gpus_per_node == 0 and job_layout(0, 3, v100).cpus_per_task == 3
    four = job_layout(4, 16, v100)
    assert (four.nodes, four.tasks_per_node, four.gpus_per_node, four.cpus_per_task) == (1, 4, 4, 8)
    eight = job_layout(8, 16, v100)
    assert (eight.nodes, eight.tasks_per_node, eight.world_size) == (2, 4, 8)
    assert job_layout(0.25, 1, v100).gpus == 1    # SLURM cannot share a device
    six = job_layout(6, 1, v100)
    assert (six.nodes, six.tasks_per_node) == (2, 3)
    with pytest.raises(SubmitError, match="resources.gpus=5"):
        job_layout(5, 1, v100)


def test_rendezvous_port_is_stable_per_job_and_distinct_between_jobs():
    assert rendezvous_port("123") == rendezvous_port("123_4") == rendezvous_port(123)
    assert rendezvous_port(123) != rendezvous_port(124)
    assert all(20000 <= rendezvous_port(j) < 50000 for j in (1, 29999, 30000, 10**7))


def test_profile_trainer_overrides_apply_unless_the_sweep_or_the_user_set_the_key():
    spec = load_sweep("ablation_gan")
    trial = spec.trials("paper")[1]            # a GAN variant, batch 256 on 4 GPUs -> 64 per GPU
    v100 = load_profile("v100")
    ready = prepare_trial(trial, v100, world_size=4)
    assert (ready.config.data.micro_batch, ready.config.gan.micro_batch) == (16, 11)   # the paper's per-GPU sizes
    assert ready.config.train.bf16 == "off" and Path(ready.config.runtime.out_dir).is_absolute()
    assert ready.config_hash == trial.config_hash   # identity kept: finished configs are still recognised
    plan = batch_plan(ready.config, 4)
    assert (plan.per_gpu, plan.micro, plan.gan_micro, plan.accumulation) == (64, 16, 11, "4->6")
    user = ["gan.micro_batch=8"]
    mine = prepare_trial(spec.trials("paper", overrides=user)[1], v100, user, world_size=4)
    assert mine.config.gan.micro_batch == 8
    off = prepare_trial(spec.trials("paper")[0], v100, world_size=4)
    assert batch_plan(off.config, 4).gan_micro is None     # lambda_gan off: no GAN phase
    with pytest.raises(SubmitError, match=r"data\.batch_size=256 is not divisible by the 3"):
        batch_plan(trial.config, 3)


def test_weights_the_offline_compute_nodes_need_are_checked_in_the_jobs_cache(tmp_path):
    spec = load_sweep("ablation_gan")
    gan_trial, toy_trial = spec.trials("paper")[1], spec.trials("smoke")[0]
    assert set(required_weights(gan_trial.config)) == {"vgg16_lpips", "tf_efficientnet_lite0",
                                                       "deit_base_distilled_patch16_224", "inception_fid"}
    assert required_weights(spec.trials("paper")[0].config) == ["vgg16_lpips", "inception_fid"]  # GAN off
    assert required_weights(toy_trial.config) == []
    profile = load_profile("v100", [f"cluster.env.CTM_LAB_CACHE={tmp_path}"])
    assert set(missing_weights([gan_trial.config], profile)) == set(required_weights(gan_trial.config))
    from ctm_core.pretrained import WEIGHTS

    for name in required_weights(gan_trial.config):
        (tmp_path / WEIGHTS[name].filename).write_bytes(b"x")
    assert missing_weights([gan_trial.config], profile) == {}


# ----------------------------------------------------------------------------------------------
# Dry runs

def _sbatch_flags(script: str) -> dict[str, str]:
    flags = {}
    for line in script.splitlines():
        m = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line)
        if m:
            flags[m.group(1)] = m.group(2) if m.group(2) is not None else True
    return flags


def _scripts(text: str) -> list[str]:
    """The sbatch scripts a dry run printed (each after a '--- sbatch script ---' line)."""
    parts = text.split("--- sbatch script ---\n")[1:]
    return [p.split("\n== ")[0].split("\ndry run: nothing started")[0] for p in parts]


def test_launch_dry_run_ablation_gan_on_v100_matches_profile_and_paper_setting(tmp_path, capsys):
    from sweeps.launch import main as launch

    code = launch(["ablation_gan", "--budget", "paper", "--backend", "slurm", "--profile", "v100", "--dry-run",
                   "--root", str(tmp_path / "root"), "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}",
                   "--set", f"cluster.env.CTM_LAB_CACHE={tmp_path / 'empty-cache'}"])
    text = capsys.readouterr().out
    assert code == 0 and "nothing submitted" in text and not (tmp_path / "root" / "slurm_jobs.json").exists()
    assert "python -m cluster.prefetch --only" in text    # empty cache: the offline-node warning
    scripts = _scripts(text)
    assert len(scripts) == 2              # the EDM teacher (not trained under this root yet), then the array
    teacher = _sbatch_flags(scripts[0])
    assert (teacher["nodes"], teacher["ntasks-per-node"], teacher["gpus-per-node"]) == ("2", "4", "4")  # 8 GPUs
    assert "array" not in teacher
    flags = _sbatch_flags(scripts[1])
    assert flags["dependency"] == "'afterok:<teacher job id>'" and flags["kill-on-invalid-dep"] == "yes"
    # The paper's CIFAR-10 setting on the profile's node: 4 x V100, one task per GPU, 24 h, requeue.
    assert flags["gpus-per-node"] == "4" and flags["ntasks-per-node"] == "4" and flags["nodes"] == "1"
    assert flags["time"] == "1440" and flags["partition"] == "gpu" and flags["constraint"] == "v100"
    assert flags["array"] == "0-4%4" and flags["requeue"] is True and flags["signal"] == "USR2@300"
    assert flags["cpus-per-task"] == "8" and flags["mem-per-gpu"] == "40G"
    assert "source $HOME/venvs/ctm-lab/bin/activate" in scripts[1]
    assert f'export CTM_LAB_CACHE="{tmp_path / "empty-cache"}"' in scripts[1]
    assert "-m submitit.core._submit" in scripts[1]
    rows = [line.split() for line in text.splitlines() if re.match(r"^\d+\s+loss\.lambda_gan=", line)]
    assert len(rows) == 5
    for row in rows:   # trial variant seed gpus batch batch/GPU micro/GPU GAN-micro micro/step est
        assert row[3:7] == ["4", "256", "64", "16"]   # global 256 = 4 GPUs x 64; microbatch 16 (paper)
    gan = {row[1].split("=", 1)[1]: row[7:9] for row in rows}
    assert gan.pop("off") == ["-", "4"]               # no GAN phase: 4 microbatches of 16
    assert gan and all(v == ["11", "4->6"] for v in gan.values())   # GAN phase: 11 per GPU (paper)


def test_dry_run_honours_cluster_overrides_and_max_concurrent(tmp_path, monkeypatch):
    monkeypatch.setenv("CTM_LAB_SWEEP_ROOT", str(tmp_path))
    spec = load_sweep("ablation_gan")
    sub = submit_sweep(spec, spec.trials("paper"), _args(
        profile="a100", max_concurrent=2, overrides=["cluster.time_limit=12:00:00", "cluster.account=proj",
                                                     "cluster.qos=high"]), out=io.StringIO())
    flags = _sbatch_flags(sub.scripts[-1])
    assert (flags["time"], flags["account"], flags["qos"], flags["array"]) == ("720", "proj", "high", "0-4%2")
    assert flags["gpus-per-node"] == "4"          # the sweep asks for 4 GPUs per trial, a100 nodes have 8


def test_dry_run_of_slurm_ray_renders_a_private_ray_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("CTM_LAB_SWEEP_ROOT", str(tmp_path))
    spec = load_sweep("ablation_gan")
    out = io.StringIO()
    sub = submit_ray_sweep(spec, spec.trials("paper"), _args(profile="a100", backend="slurm-ray", max_concurrent=4),
                           out=out)
    script = sub.scripts[0]
    flags = _sbatch_flags(script)
    assert flags["nodes"] == "2" and flags["gpus-per-node"] == "8" and flags["ntasks-per-node"] == "1"
    assert flags["signal"] == "B:USR2@300" and flags["requeue"] is True
    assert "start --head" in script and re.search(r'for node in "\$\{nodes\[@\]:1\}"', script)
    assert script.count("srun --overlap") == 2 and "ray stop" not in script
    assert 'ray_tmp="/tmp/ray-$(id -u)-$job"' in script and 'export RAY_ADDRESS="$head_ip:$ray_gcs_port"' in script
    assert "-m cluster.slurm_ray drive" in script and "scontrol requeue" in script
    assert "the EDM teacher" in out.getvalue() and "trains first, in the driver" in out.getvalue()
    assert "export RAY_AUTH_MODE=token" in script and "export RAY_AUTH_TOKEN" in script   # a token per job
    assert "trap 'exit 143' TERM" in script and "trap cleanup EXIT" in script and 'rm -rf "$ray_tmp"' in script
    # The bash port arithmetic agrees with ray_ports(), and two jobs get disjoint blocks.
    block = "\n".join(line for line in script.splitlines() if line.startswith(("block=", "ray_")) and "_port=" in line
                      or line.startswith("block="))
    shown = subprocess.run(["bash", "-c", f"job=4242\n{block}\necho $ray_gcs_port $ray_node_manager_port "
                            "$ray_dashboard_port"], capture_output=True, text=True, check=True)
    p = ray_ports(4242)
    assert shown.stdout.split() == [str(p["gcs"]), str(p["node_manager"]), str(p["dashboard"])]
    assert "--min-worker-port=0 --max-worker-port=0" in script          # workers: OS-assigned ports
    assert '--dashboard-port="$ray_dashboard_port"' in script            # not everyone's default 8265
    assert not set(ray_ports(7).values()) & set(ray_ports(8).values())
    assert all(20000 <= port < 60000 for job in (1, 3999, 4000, 10**6) for port in ray_ports(job).values())
    assert ray_temp_dir(99, uid=1000) == "/tmp/ray-1000-99"


def test_missing_profile_is_explained(tmp_path, capsys):
    spec = load_sweep("ablation_gan")
    with pytest.raises(ProfileError, match="--profile is required"):
        submit_sweep(spec, spec.trials("smoke")[:1], _args(profile=None), out=io.StringIO())
    from sweeps.launch import main as launch

    with pytest.raises(SystemExit) as refused:   # through the launcher: `error: ...`, exit status 2
        launch(["ablation_gan", "--backend", "slurm", "--profile", "v1000", "--dry-run", "--root", str(tmp_path),
                "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    assert refused.value.code == 2 and "unknown profile 'v1000'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Status

def _write_trial(out_dir: Path, steps: int, records: list[dict], finished: bool) -> None:
    out_dir.mkdir(parents=True)
    (out_dir / "config.yaml").write_text(f"train:\n  steps: {steps}\n")
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9')
    if finished:
        (out_dir / "final_metrics.json").write_text(json.dumps({"step": steps}))


def test_status_table_from_jobs_file_and_out_dirs(tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    _write_trial(root / "trials" / "a", 100, [{"step": 50, "train/loss_ctm": 0.5},
                                               {"step": 100, "train/loss_ctm": 0.25, "eval/sw2/nfe1": 0.125}], True)
    _write_trial(root / "trials" / "b", 100, [{"step": 25, "train/loss_dsm": 2.0}], False)
    (root / "slurm_jobs.json").write_text(json.dumps({"sweep": "s", "submissions": [{
        "submitit_folder": str(root / "slurm"),
        "jobs": [{"trial_index": 0, "job_id": "77_0", "variant": "x=1", "seed": 0, "out_dir": str(root / "trials/a"),
                  "steps": 100},
                 {"trial_index": 1, "job_id": "77_1", "variant": "x=2", "seed": 0, "out_dir": str(root / "trials/b"),
                  "steps": 100},
                 {"trial_index": 2, "job_id": "77_2", "variant": "x=3", "seed": 0, "out_dir": str(root / "trials/c"),
                  "steps": 100}]}]}))
    rows = collect_status(root, ask_slurm=False)   # the files alone (SLURM's answers: test_cluster_slurm)
    assert [(r.state, r.progress, r.job_id) for r in rows] == [
        ("COMPLETED", "100/100", "77_0"), ("LEFT_QUEUE", "25/100", "77_1"), ("UNKNOWN", "-", "77_2")]
    assert (rows[0].last_metric, rows[0].last_value) == ("eval/sw2/nfe1", 0.125)
    assert (rows[1].last_metric, rows[1].last_value) == ("train/loss_dsm", 2.0)
    table = format_table(rows)
    assert "eval/sw2/nfe1=0.125" in table and "77_1" in table and "3 trials: 1 COMPLETED" in table
    assert read_progress(tmp_path / "nowhere") == (None, None, None)
