"""The trainer's contract: exact resume after a hard kill, DDP (gloo, 2 processes) equal to one
process, callbacks and files, and config refusals that name the key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ctm_core.checkpoint import list_checkpoints, load_checkpoint
from ctm_core.config import ConfigError, config_to_dict, load_config
from ctm_core.train import Callback, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.spec=toy:gmm2d_8?n=2000&n_test=500", "data.batch_size=32", "model.hidden=32", "model.depth=2",
        "model.emb_dim=16", "eval.num_samples=200", "eval.nfe=[1,2]", "eval.teacher_steps=6", "train.log_every=10",
        "runtime.progress=off"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _tiny(tmp: Path, name: str, extra: list[str]):
    return load_config(overrides=TINY + [f"runtime.out_dir={tmp / name}"] + extra)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("teacher")
    train(_tiny(out, "run", ["mode=edm", "train.steps=60", "train.ckpt_every=60"]))
    return out / "run"


def _train_records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("train/") and k != "train/it_per_s"} | {"step": r["step"]}
            for r in rows if any(k.startswith("train/") for k in r)]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(list_checkpoints(run)[-1][1])
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()},
            **{f"disc.{k}": v for k, v in (state["discriminator"] or {}).items()}}


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from ctm_core.config import load_config
    from ctm_core.train import Callback, train
    torch.set_num_threads(1)

    class KillAt(Callback):
        def on_metrics(self, step, metrics):
            if step == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)   # a hard crash: no cleanup, no final checkpoint

    train(load_config(overrides=sys.argv[2:]), [KillAt()])
""")


@pytest.mark.parametrize("mode_overrides", [
    ["mode=edm"],
    ["mode=ctm", "loss.lambda_gan=0.1@50:adaptive", "loss.lambda_dsm=1:adaptive"],
], ids=["edm", "ctm+gan"])
def test_exact_resume_after_sigkill(tmp_path, teacher_dir, mode_overrides):
    extra = mode_overrides + ["train.steps=200", "train.ckpt_every=100", "eval.every=0"]
    if "mode=ctm" in mode_overrides:
        extra.append(f"teacher.checkpoint={teacher_dir}")
    straight = _tiny(tmp_path, "straight", extra)
    train(straight)

    crashed = tmp_path / "crashed"
    args = [sys.executable, "-c", _KILL_SCRIPT, "130"] + TINY + extra + [f"runtime.out_dir={crashed}"]
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(crashed)] == [100]
    assert max(r["step"] for r in _train_records(crashed)) == 130  # logged past the checkpoint, then died

    train(_tiny(tmp_path, "crashed", extra))  # resumes from step 100
    assert _train_records(crashed) == _train_records(tmp_path / "straight")
    a, b = _final_weights(tmp_path / "straight"), _final_weights(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DDP_LAUNCHERS = {  # two gloo processes, started the way each launcher does it
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "-m", "ctm_core.train", "--config"],
    "ray_train": [sys.executable, "-m", "sweeps.ray_train", "--workers", "2", "--config"],
}


@pytest.mark.parametrize("launcher", sorted(DDP_LAUNCHERS))
def test_ddp_two_processes_equal_one(tmp_path, teacher_dir, launcher):
    # 16 samples per process in microbatches of 8, then 5 (+5+5+1) once the GAN is on
    extra = ["mode=ctm", f"teacher.checkpoint={teacher_dir}", "train.steps=20", "train.ckpt_every=20",
             "loss.lambda_gan=0.1@5", "eval.every=0", "data.micro_batch=8", "gan.micro_batch=5"]
    train(_tiny(tmp_path, "single", extra))
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(_tiny(tmp_path, "ddp", extra))))
    proc = subprocess.run(DDP_LAUNCHERS[launcher] + [str(config_file)], env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    step, path = list_checkpoints(tmp_path / "ddp")[-1]
    assert step == 20 and load_checkpoint(path)["world_size"] == 2  # really two processes in one group
    one, two = _final_weights(tmp_path / "single"), _final_weights(tmp_path / "ddp")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=2e-5), key  # float32 summation order
    losses_one = [r["train/loss_ctm"] for r in _train_records(tmp_path / "single")]
    losses_two = [r["train/loss_ctm"] for r in _train_records(tmp_path / "ddp")]
    assert np.allclose(losses_one, losses_two, rtol=1e-4)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_start(self, run):
        self.events.append(("start", run.start_step))

    def on_metrics(self, step, metrics):
        self.events.append(("metrics", step, tuple(sorted(metrics))))

    def on_checkpoint(self, step, path):
        self.events.append(("checkpoint", step, Path(path).name))

    def on_sample(self, step, path):
        self.events.append(("sample", step, Path(path).suffix))

    def on_end(self, result):
        self.events.append(("end", result.step))

    def state_dict(self):
        return {"seen": len(self.events)}

    def load_state_dict(self, state):
        self.events.append(("restored", state.get("seen")))


def test_callbacks_files_best_and_pruning(tmp_path, teacher_dir):
    rec = Recorder()
    config = _tiny(tmp_path, "run", ["mode=ctm", f"teacher.checkpoint={teacher_dir}", "train.steps=30",
                                     "train.ckpt_every=10", "train.keep_last=2", "eval.every=15"])
    result = train(config, [rec])
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(run)] == [20, 30]
    assert (run / "best.pt").exists() and (run / "config.yaml").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["mode"] == "ctm"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000000015.png", "step_000000030.png"]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["step"] == 30 and "eval/sw2/nfe1" in final and "eval/sw2/teacher_nfe11" in final
    assert result.metrics["eval/sw2/nfe2"] == final["eval/sw2/nfe2"]
    assert final["time/train_seconds"] == result.seconds > 0  # the sweeps account a teacher by it
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("checkpoint") == 3 and kinds.count("sample") == 2
    # callback state travels with the checkpoint
    more = Recorder()
    train(load_config(overrides=TINY + [f"runtime.out_dir={run}", "mode=ctm", f"teacher.checkpoint={teacher_dir}",
                                        "train.steps=40", "train.ckpt_every=10"]), [more])
    assert more.events[0][0] == "restored" and more.events[0][1] > 0 and more.events[1] == ("start", 30)


def test_a_run_stopped_after_its_final_checkpoint_still_ends_on_resume(tmp_path):
    """Killed between the final checkpoint and the end (final_metrics.json, on_end: e.g. the MLflow
    run's FINISHED), a resume trains nothing but ends the run, with the metrics it last logged."""
    overrides = ["mode=edm", "train.steps=20", "train.ckpt_every=10", "eval.every=10"]
    first = train(_tiny(tmp_path, "run", overrides))
    final = tmp_path / "run" / "final_metrics.json"
    final.unlink()
    rec = Recorder()
    again = train(_tiny(tmp_path, "run", overrides), [rec])
    assert again.step == 20 and ("start", 20) in rec.events and rec.events[-1] == ("end", 20)
    assert not [e for e in rec.events if e[0] in ("metrics", "checkpoint")]
    restored = json.loads(final.read_text())
    assert restored["eval/sw2/teacher_nfe11"] == first.metrics["eval/sw2/teacher_nfe11"]
    # Resumed once more, with final_metrics.json in place: the run ends again, nothing rewritten.
    before = final.read_text()
    rec = Recorder()
    train(_tiny(tmp_path, "run", overrides), [rec])
    assert rec.events[-1] == ("end", 20) and final.read_text() == before


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    """A kill in the middle of an append leaves half a line; the resume warns, drops it and appends after
    whole lines, both when it trains on and when it only ends a run stopped after its final checkpoint."""
    overrides = ["mode=edm", "train.steps=20", "train.ckpt_every=10", "eval.every=10"]
    train(_tiny(tmp_path, "run", overrides))
    log = tmp_path / "run" / "metrics.jsonl"
    whole = log.read_text()
    (tmp_path / "run" / "final_metrics.json").unlink()
    log.write_text(whole + '{"step": 20, "train/lo')
    with pytest.warns(UserWarning, match="torn last line"):
        ended = train(_tiny(tmp_path, "run", overrides))
    assert ended.step == 20 and log.read_text() == whole
    assert ended.metrics["eval/sw2/teacher_nfe11"] == json.loads(whole.splitlines()[-1])["eval/sw2/teacher_nfe11"]

    log.write_text(whole + '{"step": 21, "train/lo')
    with pytest.warns(UserWarning, match="torn last line"):
        train(_tiny(tmp_path, "run", ["mode=edm", "train.steps=30", "train.ckpt_every=10", "eval.every=10"]))
    lines = log.read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]  # train and eval records may share a step
    assert steps == sorted(steps) and steps[-1] == 30 and len(set(lines)) == len(lines)
    assert log.read_text().startswith(whole)


def test_a_bad_metrics_line_before_the_last_stops_the_resume_with_its_line_number(tmp_path):
    from ctm_core.train import read_metrics_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 10, "a": 1.0}\nnot json\n{"step": 20, "a": 2.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: unreadable metrics record"):
        read_metrics_log(log)
    log.write_text('{"step": 10, "a": 1.0}\n{"a": 2.0}\n')  # the last line, whole but without a step
    with pytest.warns(UserWarning, match="metrics.jsonl:2: dropping a torn last line"):
        assert read_metrics_log(log) == [{"step": 10, "a": 1.0}]
    assert read_metrics_log(tmp_path / "absent.jsonl") == []


def test_corrupt_newest_checkpoint_is_skipped(tmp_path):
    config = _tiny(tmp_path, "run", ["mode=edm", "train.steps=20", "train.ckpt_every=10", "eval.every=0",
                                     "eval.teacher_steps=null"])
    train(config)
    newest = list_checkpoints(tmp_path / "run")[-1][1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as after a crash mid-write on a bad filesystem
    rec = Recorder()
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        train(_tiny(tmp_path, "run", ["mode=edm", "train.steps=20", "train.ckpt_every=10", "eval.every=0",
                                      "eval.teacher_steps=null"]), [rec])
    assert rec.events[0] == ("restored", None) or rec.events[0][0] == "start"
    assert ("start", 10) in rec.events


def test_sample_cli_writes_npy(tmp_path, teacher_dir):
    out = tmp_path / "s.npy"
    proc = subprocess.run([sys.executable, "-m", "ctm_core.sample", "--ckpt", str(teacher_dir), "--nfe", "6",
                           "--n", "50", "--out", str(out)], env=ENV, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    samples = np.load(out)
    assert samples.shape == (50, 2) and np.isfinite(samples).all()


def test_print_config_cli_and_refusal_exit_code():
    ok = subprocess.run([sys.executable, "-m", "ctm_core.train", "--print-config", "--set", "optim.lr=1e-3"],
                        env=ENV, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["optim"]["lr"] == 1e-3
    bad = subprocess.run([sys.executable, "-m", "ctm_core.train", "--print-config", "--set", "optim.lrr=1e-3"],
                         env=ENV, capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "optim.lrr" in bad.stderr and "allowed keys" in bad.stderr


@pytest.mark.parametrize("override,key,fragment", [
    ("optim.lrr=1", "optim.lrr", "unknown key"),
    ("data.batch_size=many", "data.batch_size", "integer"),
    ("optim.lr=-1", "optim.lr", "greater than 0"),
    ("ema.rates=[0.9, 1.0]", "ema.rates", "[0, 1)"),
    ("ema.target_rate=1.5", "ema.target_rate", "less than 1"),
    ("ctm.num_points=1", "ctm.num_points", "greater than or equal to 2"),
    ("ctm.distance=l3", "ctm.distance", "'l2'"),
    ("mode=ctm", "teacher.checkpoint", "required"),
    ("loss.lambda_dsm=-0.5", "loss.lambda_dsm", ">= 0"),
    ("loss.lambda_gan=soon", "loss.lambda_gan", "cannot read weight schedule"),
    ("data.spec=mnist", "data.spec", "known kinds"),
    ("model.arch=transformer", "model.arch", "'mlp'"),
])
def test_bad_config_names_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert key in str(err.value) and fragment in str(err.value)


def test_bad_yaml_file_and_microbatch(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 1e-3\n  warmup: 10\n")
    with pytest.raises(ConfigError, match=r"optim\.warmup.*allowed keys"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_defaults_follow_the_official_code_per_term_and_mode():
    """Defaults the notes pin: the GAN's adaptive weight clamped to [0.01, 10] (DSM's to [0, 1e4]),
    a RAdam discriminator, EDM's log-normal-only DSM times for an `edm` teacher, no DSM in CD."""
    student = load_config(overrides=["mode=ctm_scratch", "loss.lambda_gan=1@10:adaptive"])
    gan, dsm = student.loss.lambda_gan, student.loss.lambda_dsm
    assert (gan.adaptive_min, gan.adaptive_max) == (0.01, 10.0)
    assert (dsm.adaptive_min, dsm.adaptive_max) == (0.0, 1e4)
    assert student.gan.optimizer == "radam" and student.loss.dsm.uniform_fraction == 0.5
    own = load_config(overrides=["mode=ctm_scratch", "loss.lambda_gan={value: 1, adaptive: true, adaptive_max: 5}"])
    assert (own.loss.lambda_gan.adaptive_min, own.loss.lambda_gan.adaptive_max) == (0.01, 5.0)
    assert load_config(overrides=["mode=edm"]).loss.dsm.uniform_fraction == 0.0
    assert load_config(overrides=["mode=cd", "teacher.checkpoint=t"]).loss.lambda_dsm.is_off
    assert not load_config(overrides=["mode=cd", "teacher.checkpoint=t", "loss.lambda_dsm=0.5"]).loss.lambda_dsm.is_off
    explicit = load_config(overrides=["mode=edm", "loss.dsm.uniform_fraction=0.5"])
    assert config_to_dict(explicit)["loss"]["dsm"]["uniform_fraction"] == 0.5


def test_class_conditional_teacher_and_student_train_and_evaluate(tmp_path):
    """Evaluation samples a conditional network at fixed labels (it used to call it without any)."""
    conditional = ["data.class_conditional=true", "eval.every=6"]
    teacher = _tiny(tmp_path, "teacher", ["mode=edm", "train.steps=6", "train.ckpt_every=6"] + conditional)
    train(teacher)
    student = train(_tiny(tmp_path, "student", ["mode=ctm", f"teacher.checkpoint={tmp_path / 'teacher'}",
                                                "train.steps=6", "train.ckpt_every=6"] + conditional))
    finals = json.loads((tmp_path / "student" / "final_metrics.json").read_text())
    assert student.step == 6 and np.isfinite(finals["eval/sw2/nfe1"]) and np.isfinite(finals["eval/sw2/teacher_nfe11"])


@pytest.mark.parametrize("mode", ["ctm_scratch", "cd"])
def test_other_modes_train_and_evaluate(tmp_path, teacher_dir, mode):
    extra = [f"mode={mode}", "train.steps=12", "train.ckpt_every=12", "eval.teacher_steps=null"]
    if mode == "cd":
        extra.append(f"teacher.checkpoint={teacher_dir}")
    result = train(_tiny(tmp_path, mode, extra))
    records = _train_records(tmp_path / mode)
    assert records and all(np.isfinite(r["train/loss_ctm"]) for r in records)
    assert np.isfinite(result.metrics["eval/sw2/nfe1"]) and np.isfinite(result.metrics["eval/sw2/nfe2"])


def test_evaluation_samples_without_dropout(tmp_path):
    from ctm_core.builders import build_model
    from ctm_core.evaluation import Evaluator
    from ctm_core.data import load_dataset

    config = _tiny(tmp_path, "eval", ["model.dropout=0.5", "eval.teacher_steps=null"])
    reference = load_dataset(config.data.spec, "test").x
    model = build_model(config, {"data_shape": [2], "num_classes": 0, "kind": "vector"})
    torch.nn.init.normal_(model.backbone.last_layer_weight(), std=0.5)  # so dropout would change the output
    model.train()
    evaluator = Evaluator(config, reference, "vector", torch.device("cpu"))
    first, _ = evaluator.evaluate(model, None)
    second, _ = evaluator.evaluate(model, None)
    assert first == second and model.training  # deterministic, and the mode is restored


def test_resuming_a_finished_run_keeps_its_final_metrics(tmp_path):
    extra = ["mode=edm", "train.steps=10", "train.ckpt_every=10"]
    first = train(_tiny(tmp_path, "done", extra))
    again = train(_tiny(tmp_path, "done", extra))
    final = json.loads((tmp_path / "done" / "final_metrics.json").read_text())
    assert final["eval/sw2/teacher_nfe11"] == first.metrics["eval/sw2/teacher_nfe11"]
    assert again.step == 10 and again.metrics["eval/sw2/teacher_nfe11"] == first.metrics["eval/sw2/teacher_nfe11"]


@pytest.mark.parametrize("switch, expected", [("auto", False), ("on", True), ("off", False)])
def test_recompute_features_switch_reaches_lpips_and_the_discriminator(tmp_path, switch, expected):
    """train.recompute_features is set on the modules that own frozen feature networks (the
    trainer's own preparation step); auto leaves it off on the CPU, on works on any device."""
    from types import SimpleNamespace

    from ctm_core.discriminators import VectorDiscriminator
    from ctm_core.train import _prepare_loss_networks

    config = _tiny(tmp_path, "x", [f"train.recompute_features={switch}"])
    lpips, projected = SimpleNamespace(recompute_features=None), SimpleNamespace(recompute_features=None)
    _prepare_loss_networks(lpips, projected, config.train, torch.device("cpu"))
    assert lpips.recompute_features is expected and projected.recompute_features is expected
    _prepare_loss_networks(None, VectorDiscriminator(2), config.train, torch.device("cpu"))  # none to set: fine


def test_gpu_only_accelerations_refuse_cpu_and_leave_the_teacher_alone_there(tmp_path, teacher_dir):
    from ctm_core.teacher_graph import GraphedJumps, GraphedTeacher
    from ctm_core.discriminators import VectorDiscriminator
    from ctm_core.train import _accelerate_teacher, _prepare_loss_networks, _load_teacher

    config = _tiny(tmp_path, "x", ["mode=ctm", f"teacher.checkpoint={teacher_dir}"])
    teacher, _ = _load_teacher(config, torch.device("cpu"))
    assert _accelerate_teacher(teacher, config.train, torch.device("cpu")) is teacher  # auto: nothing on CPU
    for flag in ("compile_teacher", "teacher_graphs", "target_graphs", "compile_features", "compile_heads",
                 "triton_norms"):
        for mode in ("edm", "ctm"):  # refused in every mode, with or without a teacher, before anything runs
            forced = _tiny(tmp_path, f"forced-{mode}", [f"mode={mode}", f"teacher.checkpoint={teacher_dir}",
                                                        f"train.{flag}=on"])
            with pytest.raises(ValueError, match=f"train.{flag}=on needs a CUDA device"):
                train(forced)
            assert not (tmp_path / f"forced-{mode}").exists()
    disc = VectorDiscriminator(2)
    _prepare_loss_networks(None, disc, config.train, torch.device("cpu"))  # auto: nothing compiled on CPU
    assert disc._compiled_call_impl is None
    graphed, jumps = GraphedTeacher(teacher), GraphedJumps(teacher)  # off CUDA they are the model itself
    x, t = torch.randn(5, 2), torch.full((5,), 3.0)
    with torch.no_grad():
        assert torch.equal(graphed.denoiser(x, t), teacher.denoiser(x, t))
        assert torch.equal(jumps.jump(x, t, 0.5), teacher.jump(x, t, 0.5))
    assert graphed.process is teacher.process and jumps.process is teacher.process
    with pytest.raises(ValueError, match="frozen"):
        GraphedTeacher(teacher.requires_grad_(True))


def test_gan_on_small_images_trains_the_patch_discriminator(tmp_path):
    """8x8 digits with the GAN term on: gan.discriminator=auto picks the from-scratch patch
    discriminator (no weight cache), both players take steps and the checkpoint holds it."""
    extra = ["data.spec=digits", "model.model_channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1",
             "model.attn_resolutions=[]", "mode=ctm_scratch", "loss.lambda_gan=0.1", "train.steps=6",
             "train.log_every=2", "train.ckpt_every=6", "eval.teacher_steps=null", "eval.nfe=[1]",
             "eval.num_samples=64", f"runtime.cache_dir={tmp_path / 'empty-cache'}"]
    config = load_config(overrides=[o for o in TINY if not o.startswith(("data.spec", "model."))]
                         + [f"runtime.out_dir={tmp_path / 'run'}"] + extra)
    train(config)
    records = [r for r in _train_records(tmp_path / "run") if "train/loss_gan" in r]
    assert len(records) == 3 and all(np.isfinite(r["train/loss_gan"]) and np.isfinite(r["train/loss_disc"])
                                     for r in records)
    state = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])["discriminator"]
    assert any(k.startswith("head.") for k in state) and not any("feature_nets" in k for k in state)


@pytest.mark.parametrize("name", ["adamw", "adam", "radam"])
def test_fast_optimisers_take_the_plain_optimisers_step(name):
    """The trainer builds its optimisers fused (Adam, AdamW) or multi-tensor (RAdam) on the CPU too; each
    must move the weights as the plain per-tensor loop does."""
    from ctm_core.builders import build_optimizer
    from ctm_core.config import OptimConfig

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=gen) for shape in [(16, 8, 3, 3), (16,), (10, 16)]]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]
    optim = OptimConfig(name=name, lr=1e-2, weight_decay=0.01)
    moved = []
    for fused in (False, True):
        params = [p.clone().requires_grad_() for p in start]
        optimizer = build_optimizer(params, optim, fused=fused)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        moved.append(params)
    assert all(not torch.equal(p, p0) for p, p0 in zip(moved[1], start))
    for plain, fast in zip(*moved):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    fast = build_optimizer([start[0].clone().requires_grad_()], optim, fused=True)
    assert fast.defaults["foreach" if name == "radam" else "fused"] is True


@pytest.mark.parametrize("switch, enabled", [("auto", True), ("off", False)])
def test_triton_norms_switch_reaches_the_student_and_the_teacher(tmp_path, teacher_dir, monkeypatch, switch, enabled):
    """train.triton_norms decides the U-Net norms' path for the student (the EMA copies inherit it) and the
    teacher, before either runs; off CUDA the kernels are never used either way, so this checks the wiring."""
    import ctm_core.train as trainer

    seen = []
    real = trainer.use_triton_norms
    monkeypatch.setattr(trainer, "use_triton_norms", lambda net, on: (seen.append((net, on)), real(net, on))[1])
    train(_tiny(tmp_path, "run", ["mode=ctm", f"teacher.checkpoint={teacher_dir}", "train.steps=1",
                                  f"train.triton_norms={switch}"]))
    assert len(seen) == 2 and seen[0][0] is not seen[1][0]  # the student, then the teacher
    assert [on for _, on in seen] == [enabled, enabled]


def test_draws_made_ahead_on_a_thread_are_the_steps_own_draws(tmp_path):
    """The loop takes each step's noise and times from a worker thread that drew them one step early
    (_DrawsAhead): they must be exactly what the step draws itself, in order, up to the last step."""
    from ctm_core.train import _draw, _DrawsAhead

    config = _tiny(tmp_path, "x", ["mode=ctm_scratch", "train.steps=4"])
    shape, cpu = (2,), torch.device("cpu")
    draws = _DrawsAhead(config, shape, cpu, first_step=1)
    try:
        for step in (1, 2, 3):
            got, want = draws.take(step), _draw(config, step, shape, cpu)
            assert torch.equal(got["noise"], want["noise"]) and torch.equal(got["dsm_noise"], want["dsm_noise"])
            assert torch.equal(got["times"].t_idx, want["times"].t_idx) and got["times"].steps == want["times"].steps
        assert not torch.equal(got["noise"], _draw(config, 2, shape, cpu)["noise"])  # steps differ
        assert draws._ahead[0] == 3  # nothing drawn past the run's last step (3: steps 0..3)
        with pytest.raises(RuntimeError, match="in order"):
            draws.take(1)
    finally:
        draws.close()
