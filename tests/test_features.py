"""Weight cache, LPIPS distance, discriminators and the prefetch CLI (no network: every
pretrained file is a random state_dict written to tmp_path)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ctm_core.builders import build_discriminator
from ctm_core.config import GANConfig
from ctm_core.discriminators import (
    PatchDiscriminator,
    ProjectedDiscriminator,
    VectorDiscriminator,
    build_paper_discriminator,
    build_projected_discriminator,
    diff_augment,
)
from ctm_core.losses import gan_discriminator_loss, gan_generator_loss
from ctm_core.lpips_distance import LPIPSDistance
from ctm_core.pretrained import (
    CACHE_ENV_VAR,
    WEIGHTS,
    MissingWeightsError,
    require_weights,
    resolve_cache_dir,
    weights_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """These small nets run much faster single-threaded on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ----------------------------------------------------------------------------
# Cache and registry.


def test_registry_has_the_paper_entries():
    assert {"vgg16_lpips", "tf_efficientnet_lite0", "deit_base_distilled_patch16_224", "inception_fid"} <= set(WEIGHTS)
    assert WEIGHTS["inception_fid"].filename.startswith("pt_inception-2015-12-05")
    with pytest.raises(Exception):  # frozen dataclass
        WEIGHTS["vgg16_lpips"].filename = "x"  # type: ignore[misc]


def test_cache_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "ctm-lab"
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert weights_path("vgg16_lpips") == tmp_path / "env" / WEIGHTS["vgg16_lpips"].filename


def test_missing_weights_message_names_entry_path_and_fix(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        require_weights("tf_efficientnet_lite0", cache_dir=tmp_path)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    expected = tmp_path / WEIGHTS["tf_efficientnet_lite0"].filename
    msg = str(err)
    assert "'tf_efficientnet_lite0'" in msg and str(expected) in msg
    assert "python -m cluster.prefetch --only tf_efficientnet_lite0" in msg and CACHE_ENV_VAR in msg
    expected.write_bytes(b"x")
    assert require_weights("tf_efficientnet_lite0", cache_dir=tmp_path) == expected


def test_unknown_entry_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="name"):
        require_weights("vgg19", cache_dir=tmp_path)


def test_paper_discriminator_without_cache_says_how_to_fetch(tmp_path):
    with pytest.raises(MissingWeightsError, match="--only tf_efficientnet_lite0"):
        build_paper_discriminator(cache_dir=tmp_path)


# ----------------------------------------------------------------------------
# LPIPS.


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """A random VGG16 state_dict with torchvision's key names (`features.N.weight`; the classifier
    is not needed). Written directly: building torchvision's VGG16 is slow on CPU."""
    gen = torch.Generator().manual_seed(0)
    state, c_in, index = {}, 3, 0
    for item in VGG16_LAYOUT:
        if item == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(item, c_in, 3, 3, generator=gen) * (2 / (9 * c_in)) ** 0.5
        state[f"features.{index}.bias"] = torch.zeros(item)
        c_in, index = item, index + 2  # conv, relu
    path = tmp_path_factory.mktemp("cache") / WEIGHTS["vgg16_lpips"].filename
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def lpips32(vgg_file) -> LPIPSDistance:
    """Resize target 32 instead of 224 keeps the CPU tests fast; the code path is the same."""
    return LPIPSDistance(resize_to=32, cache_dir=vgg_file.parent)


def test_lpips_loads_the_backbone_file(vgg_file, lpips32):
    state = torch.load(vgg_file, weights_only=True)
    assert torch.equal(getattr(lpips32.lpips.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(lpips32.lpips.net.slice5, "28").bias, state["features.28.bias"])
    explicit = LPIPSDistance(resize_to=32, backbone_path=vgg_file)
    assert torch.equal(getattr(explicit.lpips.net.slice3, "14").weight, state["features.14.weight"])


def test_lpips_pools_by_averaging_like_the_official_code(lpips32):
    """The official loss is piq.LPIPS(replace_pooling=True): VGG16's four pools inside LPIPS' slices
    are 2x2 average pools, so the second slice starts from the mean of relu1_2's 2x2 blocks."""
    pools = [m for m in lpips32.modules() if isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d))]
    assert len(pools) == 4 and all(isinstance(m, torch.nn.AvgPool2d) for m in pools)
    net = lpips32.lpips.net
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    relu1_2 = net.slice1(x)
    assert torch.allclose(net.slice2[0](relu1_2), F.avg_pool2d(relu1_2, 2))


def test_lpips_missing_backbone_file(tmp_path):
    with pytest.raises(MissingWeightsError, match="vgg16_lpips") as info:
        LPIPSDistance(backbone_path=tmp_path / "nope.pth")
    assert str(tmp_path / "nope.pth") in str(info.value)
    with pytest.raises(MissingWeightsError, match="--only vgg16_lpips"):
        LPIPSDistance(cache_dir=tmp_path)


def test_lpips_rejects_a_non_vgg_file(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="backbone_path"):
        LPIPSDistance(backbone_path=path)


def test_lpips_distance_properties(lpips32):
    torch.manual_seed(1)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    y = torch.rand(3, 3, 16, 16) * 2 - 1
    d_xy = lpips32(x, y)
    assert d_xy.shape == (3,)
    assert torch.all(d_xy > 0)
    assert torch.allclose(d_xy, lpips32(y, x), rtol=1e-5, atol=1e-7)
    assert torch.all(lpips32(x, x) == 0)
    # a small perturbation is closer than an unrelated image
    assert torch.all(lpips32(x, x + 0.01 * torch.randn_like(x)) < d_xy)
    # grayscale inputs are repeated to three channels
    g = x[:, :1]
    assert torch.allclose(lpips32(g, y[:, :1]), lpips32(g.expand(-1, 3, -1, -1), y[:, :1].expand(-1, 3, -1, -1)))


def test_lpips_distance_is_the_lpips_packages(lpips32):
    """LPIPSDistance computes the distance from the package's layers itself (so that recomputation can
    leave the target's side out): the same numbers as the package's own forward, with either setting."""
    x, y = (torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(seed)) * 2 - 1 for seed in (4, 5))
    lpips = copy.deepcopy(lpips32)
    reference = lpips.lpips(x, y, normalize=False).reshape(3)
    for recompute in (False, True):
        lpips.recompute_features = recompute
        torch.testing.assert_close(lpips(x.clone().requires_grad_(), y), reference, rtol=1e-5, atol=1e-7)


def test_lpips_upsamples_small_images_only(lpips32):
    seen = []
    handle = lpips32.lpips.net.slice1.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    try:
        lpips32(torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16) * 0.1)
        lpips32(torch.zeros(1, 3, 40, 40), torch.ones(1, 3, 40, 40) * 0.1)
    finally:
        handle.remove()
    assert seen == [(32, 32), (32, 32), (40, 40), (40, 40)]


def test_lpips_default_resize_is_224():
    import inspect

    assert inspect.signature(LPIPSDistance).parameters["resize_to"].default == 224


def test_lpips_is_frozen_but_differentiable(lpips32):
    assert not any(p.requires_grad for p in lpips32.parameters())
    lpips32.train()
    assert not lpips32.training and not lpips32.lpips.lin0.training  # dropout stays off
    torch.manual_seed(2)
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    d = lpips32(x, y)
    assert torch.equal(d, lpips32(x, y))  # deterministic even after .train()
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips32.parameters())


# ----------------------------------------------------------------------------
# Projected discriminator (tiny timm nets, random weights written to tmp_path).

TINY_NETS = ("resnet10t", "vit_tiny_patch16_224")
TINY_KWARGS = ({}, {"depth": 4, "img_size": 64})


@pytest.fixture(scope="module")
def tiny_weight_files(tmp_path_factory) -> list[Path]:
    import timm

    root = tmp_path_factory.mktemp("timm")
    paths = []
    for seed, (name, kwargs) in enumerate(zip(TINY_NETS, TINY_KWARGS)):
        torch.manual_seed(100 + seed)
        model = timm.create_model(name, pretrained=False, **kwargs)
        paths.append(root / f"{name}.pth")
        torch.save(model.state_dict(), paths[-1])
    return paths


@pytest.fixture(scope="module")
def tiny_disc(tiny_weight_files) -> ProjectedDiscriminator:
    torch.manual_seed(0)
    return build_projected_discriminator(TINY_NETS, tiny_weight_files, input_size=64, model_kwargs=TINY_KWARGS)


def test_feature_nets_hold_the_file_weights(tiny_disc, tiny_weight_files):
    state = torch.load(tiny_weight_files[0], weights_only=True)
    resnet = tiny_disc.feature_nets[0].model
    assert torch.equal(resnet.conv1[0].weight, state["conv1.0.weight"])
    assert torch.equal(resnet.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])


def test_feature_net_scales(tiny_disc):
    resnet, vit = tiny_disc.feature_nets
    assert resnet.resolutions == [16, 8, 4, 2] and resnet.channels == [64, 128, 256, 512]
    assert vit.resolutions == [16, 8, 4, 2] and vit.channels == [192] * 4  # 4x4 tokens -> pyramid
    assert tiny_disc.mixers[0].out_channels == [64, 128, 256, 512]


def test_projected_discriminator_logits(tiny_disc):
    torch.manual_seed(3)
    logits = tiny_disc(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert isinstance(logits, list) and len(logits) == 8
    for lg in logits:
        assert lg.ndim == 2 and lg.shape[0] == 2 and torch.isfinite(lg).all()
    gray = tiny_disc(torch.rand(2, 1, 32, 32) * 2 - 1, augment=False)
    assert len(gray) == 8
    with pytest.raises(ValueError, match="x"):
        tiny_disc(torch.zeros(2, 2, 32, 32))


def test_only_heads_are_trained_and_gradients_reach_the_input(tiny_disc):
    disc = copy.deepcopy(tiny_disc)
    disc.train()
    for net in disc.feature_nets:
        assert not net.model.training
        assert all(not p.requires_grad for p in net.model.parameters())
    trainable = {id(p) for p in disc.trainable_parameters()}
    assert trainable == {id(p) for p in disc.heads.parameters()}
    assert len(list(disc.mixers.parameters())) == 0  # fixed random mixing: buffers only
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    sum(lg.mean() for lg in disc(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.trainable_parameters())
    for net in disc.feature_nets:
        assert all(p.grad is None for p in net.model.parameters())


def test_the_channel_mixing_commutes_with_a_vits_pyramid(tiny_disc):
    """The discriminator mixes a ViT's channels before upsampling them to the pyramid, the reverse of the
    projected-GAN order: the same function (both maps are linear, on different axes), with less traffic."""
    disc = copy.deepcopy(tiny_disc).double()
    vit, mixer = disc.feature_nets[1], disc.mixers[1]
    assert vit.make_pyramid
    with torch.no_grad():
        taps = vit(torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1)
        upsampled_first = mixer.mix_channels(vit.to_pyramid(taps))
        mixed_first = vit.to_pyramid(mixer.mix_channels(taps))
    assert [m.shape[-1] for m in mixed_first] == vit.resolutions == [16, 8, 4, 2]
    for a, b in zip(upsampled_first, mixed_first, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12 * a.abs().max())


def _saved_bytes_and_input_grad(fn, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the tensors autograd keeps for fn(x)'s backward (each storage once), and d sum(fn(x)) / dx."""
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = fn(x)
    grad, = torch.autograd.grad(sum(o.sum() for o in out) if isinstance(out, list) else out.sum(), x)
    return sum(storages.values()), grad


def test_recomputed_feature_networks_keep_almost_nothing_and_give_the_same_gradients(lpips32, tiny_disc):
    """train.recompute_features: the frozen networks run again in the backward instead of keeping their
    activations; the image gradient the generator gets is unchanged. Without a gradient to give, nothing
    is recomputed (the discriminator's own step)."""
    lpips, disc = copy.deepcopy(lpips32), copy.deepcopy(tiny_disc).eval()  # eval: spectral norms stay put
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    cases = {"lpips": (lpips, lambda image: lpips(image, y)),
             "discriminator": (disc, lambda image: disc(image, augment=False))}
    # what the frozen networks alone keep: the VGG inside LPIPS, the feature nets inside the discriminator
    frozen_only = {"lpips": _saved_bytes_and_input_grad(lambda image: lpips.lpips(image, y), x)[0],
                   "discriminator": sum(_saved_bytes_and_input_grad(net, x)[0] for net in disc.feature_nets)}
    for name, (module, fn) in cases.items():
        assert module.recompute_features is False  # the trainer decides (train.recompute_features)
        kept, grad = _saved_bytes_and_input_grad(fn, x)
        module.recompute_features = True
        recomputed, grad_recomputed = _saved_bytes_and_input_grad(fn, x)
        torch.testing.assert_close(grad_recomputed, grad, rtol=1e-6, atol=1e-9, msg=name)
        assert kept - recomputed > 0.9 * frozen_only[name], (name, recomputed, kept, frozen_only[name])
    calls = []
    net = disc.feature_nets[0]
    handle = net.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        disc.real_and_fake_logits(x, y)  # no input needs a gradient: one plain forward
        assert len(calls) == 1
        sum(logit.sum() for logit in disc(x.clone().requires_grad_(), augment=False)).backward()
        assert len(calls) == 3  # the forward, then again in the backward
    finally:
        handle.remove()
    vgg_calls = []
    handle = lpips.lpips.net.register_forward_pre_hook(lambda *args: vgg_calls.append(1))
    try:
        lpips(x.clone().requires_grad_(), y).sum().backward()
        assert len(vgg_calls) == 3  # the target once; the image, then again in the backward
    finally:
        handle.remove()


def test_compiled_heads_trace_whole_and_match_the_eager_heads(tiny_disc):
    """compile_heads (train.compile_heads, CUDA) traces all heads as one function: the discriminator's step
    and the generator's call give eager's logits, gradients and spectral-norm state. Dynamo's own
    'eager' backend keeps this test free of a C++ compiler; inductor is what the GPU runs."""
    import torch._dynamo

    torch._dynamo.reset()
    eager, compiled = copy.deepcopy(tiny_disc).train(), copy.deepcopy(tiny_disc).train()
    compiled.compile_heads(backend="eager", fullgraph=True)  # fullgraph: a graph break would raise
    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    for step in range(2):
        grads = []
        for disc in (eager, compiled):
            torch.manual_seed(step)  # the same DiffAugment draws for both
            disc.zero_grad()
            gan_discriminator_loss(*disc.real_and_fake_logits(real, fake)).backward()
            image = fake.clone().requires_grad_()
            torch.manual_seed(10 + step)
            gan_generator_loss(disc(image)).backward()
            grads.append([image.grad] + [p.grad for p in disc.trainable_parameters()])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)  # the power iterations' u and v


def test_state_dict_keeps_heads_and_projections_not_backbones(tiny_disc, tiny_weight_files):
    state = tiny_disc.state_dict()
    assert not any(k.startswith("feature_nets.") for k in state)
    assert any(k.startswith("mixers.0.channel_mix") for k in state) and any(k.startswith("heads.") for k in state)
    torch.manual_seed(123)  # other head init; same projection seed
    other = build_projected_discriminator(TINY_NETS, tiny_weight_files, input_size=64, model_kwargs=TINY_KWARGS)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before = [lg.detach() for lg in other(x, augment=False)]
    assert not torch.allclose(before[0], tiny_disc(x, augment=False)[0])
    other.load_state_dict(state, strict=True)
    other.eval(), tiny_disc.eval()
    for a, b in zip(other(x, augment=False), tiny_disc(x, augment=False)):
        assert torch.allclose(a, b, atol=1e-6)


def test_discriminator_step_runs_the_feature_nets_once_and_keeps_each_heads_halves_apart(tiny_weight_files):
    """discriminator_loss on the projected discriminator: real and fake share one pass through the frozen
    feature networks, and the logits and the heads' gradients are those of two calls (augmentation off,
    spectral norms held in eval mode). Inside the hinge margins each head's output bias has a gradient of
    exactly zero in exact arithmetic; with the halves summed apart it is exactly zero in float32 too."""
    from ctm_core.losses import discriminator_loss, gan_discriminator_loss

    torch.manual_seed(0)
    disc = build_projected_discriminator(TINY_NETS, tiny_weight_files, input_size=64, model_kwargs=TINY_KWARGS,
                                         diffaug_policy=None).eval()
    real, fake = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    calls = []
    for net in disc.feature_nets:
        net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    pair = disc.real_and_fake_logits(real, fake)
    assert calls == [6, 6]  # each feature network once, on both batches
    for got, want in zip(pair, (disc(real), disc(fake))):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want, strict=True))
    assert all(lg.abs().max() < 1 for side in pair for lg in side)  # inside the margins

    grads = []
    for loss in (lambda: discriminator_loss(disc, real, fake),
                 lambda: gan_discriminator_loss(disc(real), disc(fake))):
        disc.zero_grad(set_to_none=True)
        loss().backward()
        grads.append({name: p.grad.clone() for name, p in disc.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
    out_biases = [k for k in grads[0] if k.endswith("out.bias")]
    assert len(out_biases) == 8 and all(torch.equal(grads[0][k], torch.zeros(1)) for k in out_biases)


def test_diffaugment_draws_differ_between_calls(tiny_disc):
    torch.manual_seed(4)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    a, b = diff_augment(x), diff_augment(x)
    assert a.shape == x.shape and not torch.allclose(a, b)
    tiny_disc.eval()
    la, lb = tiny_disc(x)[0], tiny_disc(x)[0]
    assert not torch.allclose(la, lb)
    na, nb = tiny_disc(x, augment=False)[0], tiny_disc(x, augment=False)[0]
    assert torch.equal(na, nb)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(diff_augment(x, generator=g1), diff_augment(x, generator=g2))


def test_diffaugment_ops():
    torch.manual_seed(5)
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    cut = diff_augment(x, policy=("cutout",), cutout_ratio=0.25)
    zeroed = (cut == 0).all(dim=1).flatten(1).sum(1)
    assert torch.all(zeroed > 0) and torch.all(zeroed <= 16)  # one hole of at most 4x4
    moved = diff_augment(x, policy=("translation",), translation_ratio=0.125)
    assert not torch.equal(moved, x)
    # a translated image is the original shifted by at most 2 px with zero fill
    ok = []
    for i in range(4):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(x[i])
                ys, xs = slice(max(dy, 0), 16 + min(dy, 0)), slice(max(dx, 0), 16 + min(dx, 0))
                ys_src, xs_src = slice(max(-dy, 0), 16 + min(-dy, 0)), slice(max(-dx, 0), 16 + min(-dx, 0))
                ref[:, ys, xs] = x[i][:, ys_src, xs_src]
                found |= torch.equal(ref, moved[i])
        ok.append(found)
    assert all(ok)
    with pytest.raises(ValueError, match="policy"):
        diff_augment(x, policy=("rotate",))


def test_conditional_projected_heads(tiny_weight_files):
    disc = build_projected_discriminator(
        TINY_NETS[:1], tiny_weight_files[:1], input_size=64, num_classes=5, diffaug_policy=None
    )
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a = disc(x, torch.tensor([0, 1]))
    b = disc(x, torch.tensor([2, 3]))
    assert len(a) == 4 and not torch.allclose(a[0], b[0])
    with pytest.raises(ValueError, match="class_labels"):
        disc(x)


def test_build_checks_arguments(tiny_weight_files, tmp_path):
    with pytest.raises(ValueError, match="pretrained_paths"):
        build_projected_discriminator(TINY_NETS, tiny_weight_files[:1])
    with pytest.raises(MissingWeightsError, match="resnet10t"):
        build_projected_discriminator(TINY_NETS[:1], [tmp_path / "missing.pth"], input_size=64)
    with pytest.raises(ValueError, match="weights_path"):  # vit weights into a resnet
        build_projected_discriminator(TINY_NETS[:1], tiny_weight_files[1:], input_size=64)


# ----------------------------------------------------------------------------
# Vector discriminator.


def test_vector_discriminator():
    torch.manual_seed(6)
    disc = VectorDiscriminator(2, hidden=16, depth=3)
    out = disc(torch.randn(5, 2))
    assert isinstance(out, list) and len(out) == 1 and out[0].shape == (5,)
    assert sum(isinstance(m, torch.nn.Linear) for m in disc.modules()) == 4
    cond = VectorDiscriminator(2, num_classes=3)
    x = torch.randn(4, 2)
    assert cond(x, torch.tensor([0, 1, 2, 0]))[0].shape == (4,)
    assert not torch.allclose(cond(x, torch.zeros(4, dtype=torch.long))[0], cond(x, torch.ones(4, dtype=torch.long))[0])
    with pytest.raises(ValueError, match="class_labels"):
        cond(x)
    with pytest.raises(ValueError, match="x"):
        disc(torch.randn(4, 3))
    with pytest.raises(ValueError, match="depth"):
        VectorDiscriminator(2, depth=0)


def test_patch_discriminator_learns_from_scratch():
    """The from-scratch image discriminator separates two image distributions within a few
    dozen steps (a broken head, stuck augmentation or frozen parameters would not)."""
    torch.manual_seed(7)
    disc = PatchDiscriminator(1, 8, width=16)
    real = torch.zeros(32, 1, 8, 8)
    real[:, :, :, 3:5] = 1.0                                  # vertical bars
    fake = torch.zeros(32, 1, 8, 8)
    fake[:, :, 3:5, :] = 1.0                                  # horizontal bars
    assert [o.shape for o in disc(real)] == [(32, 16)]         # one 4x4 grid of patch logits
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    for _ in range(40):
        opt.zero_grad()
        gan_discriminator_loss(disc(real), disc(fake)).backward()
        opt.step()
    with torch.no_grad():
        margin = disc(real, augment=False)[0].mean() - disc(fake, augment=False)[0].mean()
    assert margin > 1.0
    fake.requires_grad_(True)
    gan_generator_loss(disc(fake)).backward()
    assert fake.grad.abs().sum() > 0                          # the generator term reaches the image
    cond = PatchDiscriminator(1, 8, num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    assert not torch.allclose(cond(x, torch.zeros(4, dtype=torch.long), augment=False)[0],
                              cond(x, torch.ones(4, dtype=torch.long), augment=False)[0])
    with pytest.raises(ValueError, match="class_labels"):
        cond(x)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        disc(torch.randn(4, 1, 16, 16))
    with pytest.raises(ValueError, match="resolution"):
        PatchDiscriminator(1, 2)


@pytest.mark.parametrize("shape,kind,expected", [
    ((2,), "auto", VectorDiscriminator),
    ((1, 8, 8), "auto", PatchDiscriminator),
    ((1, 16, 16), "auto", PatchDiscriminator),
    ((3, 32, 32), "patch", PatchDiscriminator),
])
def test_build_discriminator_choice(shape, kind, expected):
    meta = {"data_shape": list(shape), "kind": "vector" if len(shape) == 1 else "image", "num_classes": 0}
    assert isinstance(build_discriminator(GANConfig(discriminator=kind), meta, None), expected)


def test_build_discriminator_refusals(tmp_path):
    image = {"data_shape": [3, 32, 32], "kind": "image", "num_classes": 0}
    with pytest.raises(ValueError, match="'vector' needs vector data"):
        build_discriminator(GANConfig(discriminator="vector"), image, None)
    with pytest.raises(ValueError, match="needs images"):
        build_discriminator(GANConfig(discriminator="patch"), {"data_shape": [2], "kind": "vector", "num_classes": 0}, None)
    with pytest.raises(MissingWeightsError):                  # 32 px images: the paper's discriminator, cache empty
        build_discriminator(GANConfig(), image, str(tmp_path))


# ----------------------------------------------------------------------------
# Prefetch CLI (--list only: no network in tests).


def _run_prefetch(*args: str, env_cache: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(CACHE_ENV_VAR, None)
    if env_cache is not None:
        env[CACHE_ENV_VAR] = str(env_cache)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "cluster.prefetch", *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=120)


def test_prefetch_list_reports_present_and_missing(tmp_path):
    (tmp_path / WEIGHTS["vgg16_lpips"].filename).write_bytes(b"weights")
    proc = _run_prefetch("--list", "--cache-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == set(WEIGHTS)
    for name, entry in WEIGHTS.items():
        assert str(tmp_path / entry.filename) in rows[name]
        assert rows[name].split()[1] == ("present" if name == "vgg16_lpips" else "missing")


def test_prefetch_list_uses_env_cache_and_rejects_unknown_names(tmp_path, monkeypatch, capsys):
    from cluster.prefetch import main

    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert f"cache dir: {tmp_path}" in out and "present" not in out
    (tmp_path / WEIGHTS["inception_fid"].filename).write_bytes(b"x")
    assert main(["--list"]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["inception_fid"] == "present" and rows["vgg16_lpips"] == "missing"
    with pytest.raises(SystemExit):
        main(["--only", "not_a_weight", "--cache-dir", str(tmp_path)])


def test_prefetch_writes_atomically_and_skips_present_files(tmp_path, monkeypatch, capsys):
    from cluster import prefetch

    calls = []

    def fake_torchvision(entry, final):  # stands in for the download; uses the real atomic save
        calls.append(entry.name)
        prefetch._save_state_dict_atomically({"features.0.weight": torch.ones(1)}, final)

    def failing_timm(entry, final):
        raise ConnectionError("no network in tests")

    monkeypatch.setitem(prefetch.FETCHERS, "torchvision", fake_torchvision)
    monkeypatch.setitem(prefetch.FETCHERS, "timm", failing_timm)
    assert prefetch.main(["--cache-dir", str(tmp_path), "--only", "vgg16_lpips"]) == 0
    assert prefetch.main(["--cache-dir", str(tmp_path), "--only", "vgg16_lpips"]) == 0  # present: skipped
    assert calls == ["vgg16_lpips"]
    assert torch.load(require_weights("vgg16_lpips", tmp_path), weights_only=True)["features.0.weight"].item() == 1
    assert prefetch.main(["--cache-dir", str(tmp_path), "--only", "tf_efficientnet_lite0"]) == 1
    assert "tf_efficientnet_lite0: FAILED" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS["vgg16_lpips"].filename]  # no partial files


def test_missing_weights_error_pickles():
    import pickle

    err = MissingWeightsError("vgg16_lpips", "/nowhere/x.pth", detail="extra")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, MissingWeightsError) and str(again) == str(err)
