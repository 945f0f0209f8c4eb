"""Tests for ctm_core.networks: interface, initialisation, conditioning, precision, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ctm_core.networks import MLPBackbone, UNetBackbone, count_parameters

# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The nets here are tiny: intra-op threads only add contention on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_unet(num_classes: int = 0, dropout: float = 0.0, **kwargs) -> UNetBackbone:
    cfg = dict(img_resolution=8, in_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(4,), dropout=dropout, num_classes=num_classes)
    cfg.update(kwargs)
    return UNetBackbone(**cfg)


def tiny_mlp(num_classes: int = 0, dim: int = 2, **kwargs) -> MLPBackbone:
    return MLPBackbone(dim=dim, hidden=32, depth=2, emb_dim=16, num_classes=num_classes, **kwargs)


def make_inputs(model, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, UNetBackbone):
        shape = (batch, model.in_channels, model.img_resolution, model.img_resolution)
    else:
        shape = (batch, model.dim)
    x = torch.randn(shape, generator=g)
    sigma_t = torch.exp(torch.empty(batch).uniform_(math.log(0.002), math.log(80.0), generator=g))
    sigma_s = sigma_t * torch.rand(batch, generator=g)
    noise_t, noise_s = sigma_t.log() / 4, sigma_s.clamp_min(0.002).log() / 4
    labels = torch.randint(0, model.num_classes, (batch,), generator=g) if model.num_classes else None
    return x, noise_t, noise_s, labels


def perturb_output_layer(model, std: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.last_layer_weight()
        w.copy_(torch.randn(w.shape, generator=g) * std)


def randomize(model, seed: int = 2) -> None:
    """Give every weight matrix/kernel a generic O(1/sqrt(fan_in)) value (norm scales and
    biases keep their init) so that each path, including the near-zero-init ones, carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


MODELS = {
    "mlp": lambda: tiny_mlp(),
    "mlp_cond": lambda: tiny_mlp(num_classes=5),
    "unet": lambda: tiny_unet(),
    "unet_cond": lambda: tiny_unet(num_classes=4),
    "unet_film16": lambda: tiny_unet(img_resolution=16, channel_mult=(1, 1, 2), attn_resolutions=(8,),
                                     adaptive_scale=True, num_heads=2),
}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


# ---------------------------------------------------------------------------------------------
# Shapes, dtype, zero init


def test_output_shape_dtype_and_zero_at_init(model):
    x, nt, ns, y = make_inputs(model)
    out = model(x, nt, ns, y)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.count_nonzero(out) == 0, "zero-initialised output layer must give F = 0"
    perturb_output_layer(model)
    out = model(x, nt, ns, y)
    assert out.abs().mean() > 1e-3
    assert torch.isfinite(out).all()


def test_last_layer_weight_is_the_output_layer(model):
    w = model.last_layer_weight()
    assert isinstance(w, torch.nn.Parameter)
    assert any(w is p for p in model.parameters())
    assert torch.count_nonzero(w) == 0
    out_dim = model.out_channels if isinstance(model, UNetBackbone) else model.dim
    assert w.shape[0] == out_dim


def test_unet_out_channels_differs_from_input():
    net = tiny_unet(out_channels=5).eval()
    x, nt, ns, _ = make_inputs(net)
    assert net(x, nt, ns).shape == (3, 5, 8, 8)


def test_float64_input_gives_float64_output():
    net = tiny_mlp().double()
    x, nt, ns, _ = make_inputs(net)
    out = net(x.double(), nt.double(), ns.double())
    assert out.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Conditioning: t, s and the class all matter


def test_s_and_t_matter_with_only_output_layer_perturbed(model):
    """With the default init (tiny but non-zero residual convs) s and t already reach F."""
    perturb_output_layer(model)
    x, nt, ns, y = make_inputs(model)
    base = model(x, nt, ns, y)
    assert not torch.equal(model(x, nt, ns + 0.5, y), base), "noise_s has no effect"
    assert not torch.equal(model(x, nt + 0.5, ns, y), base), "noise_t has no effect"


def test_s_and_t_matter_substantially_after_randomization(model):
    randomize(model)
    x, nt, ns, y = make_inputs(model)
    base = model(x, nt, ns, y)
    scale = base.abs().mean()
    for name, out in (("noise_s", model(x, nt, ns + 0.5, y)), ("noise_t", model(x, nt + 0.5, ns, y))):
        rel = (out - base).abs().mean() / scale
        assert rel > 1e-2, f"{name} barely changes the output (relative change {rel:.2e})"
    # s and t enter through different layers: swapping them must change the output.
    assert not torch.allclose(model(x, ns, nt, y), base)


def test_s_effect_is_per_sample(model):
    """Changing s for sample 0 only must leave the other samples untouched (no batch mixing)."""
    randomize(model)
    x, nt, ns, y = make_inputs(model)
    base = model(x, nt, ns, y)
    ns2 = ns.clone()
    ns2[0] += 0.5
    out = model(x, nt, ns2, y)
    assert not torch.allclose(out[0], base[0])
    torch.testing.assert_close(out[1:], base[1:])


@pytest.mark.parametrize("factory", [lambda: tiny_mlp(num_classes=5), lambda: tiny_unet(num_classes=4)])
def test_class_label_matters(factory):
    torch.manual_seed(0)
    net = factory().eval()
    randomize(net)
    x, nt, ns, y = make_inputs(net)
    other = (y + 1) % net.num_classes
    assert not torch.allclose(net(x, nt, ns, y), net(x, nt, ns, other))


# ---------------------------------------------------------------------------------------------
# Precision, memory format, compile


@pytest.mark.parametrize("name", ["mlp", "unet_cond", "unet_film16"])
def test_bf16_autocast_cpu_close_to_fp32(name):
    torch.manual_seed(0)
    net = MODELS[name]().eval()
    randomize(net)
    x, nt, ns, y = make_inputs(net)
    ref = net(x, nt, ns, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, nt, ns, y)
    assert out.dtype == torch.float32, "output is returned in x_in's dtype"
    rel = (out - ref).norm() / ref.norm()
    assert rel < 5e-2, f"bf16 autocast deviates by {rel:.3f} (relative L2)"
    assert rel > 0, "autocast seems to have had no effect"


def test_full_bf16_weights_run():
    torch.manual_seed(0)
    net = tiny_unet(num_classes=4).eval()
    randomize(net)
    x, nt, ns, y = make_inputs(net)
    ref = net(x, nt, ns, y)
    out = net.to(torch.bfloat16)(x.bfloat16(), nt, ns, y)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 5e-2


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    net = tiny_unet(num_classes=4).eval()
    randomize(net)
    x, nt, ns, y = make_inputs(net)
    ref = net(x, nt, ns, y)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x_cl, nt, ns, y), ref, rtol=1e-4, atol=1e-5)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x_cl, nt, ns, y)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_has_no_graph_breaks():
    """fullgraph=True fails on any graph break, e.g. data-dependent Python control flow.
    The 'eager' backend traces with dynamo but skips code generation, so this stays fast."""
    torch.manual_seed(0)
    net = tiny_unet(num_classes=4).eval()
    randomize(net)
    x, nt, ns, y = make_inputs(net)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, nt, ns, y), net(x, nt, ns, y))
    mlp = tiny_mlp().eval()
    randomize(mlp)
    xm, ntm, nsm, _ = make_inputs(mlp)
    compiled_mlp = torch.compile(mlp, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled_mlp(xm, ntm, nsm), mlp(xm, ntm, nsm))


@pytest.mark.parametrize("factory", [lambda: tiny_unet(num_classes=4), tiny_mlp])
def test_compiled_trunk_leaves_the_last_layer_gradient_cheap(factory):
    """compile_trunk (train.compile) keeps the output layer out of the compiled graph. The adaptive weights'
    last-layer gradient must then cost only that layer's weight gradient; with the whole network compiled,
    it runs the compiled backward of every parameter (here: more than 10x the FLOPs). 'aot_eager' compiles
    forward and backward as one autograd function, as inductor does, without a C++ compiler."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = factory().train()
    randomize(net)
    x, nt, ns, y = make_inputs(net)
    y = y if net.num_classes else None
    eager_out = net(x, nt, ns, y)
    grad_out = torch.randn_like(eager_out)
    eager_last, = torch.autograd.grad(eager_out, net.last_layer_weight(), grad_out, retain_graph=True)
    eager_grads = torch.autograd.grad(eager_out, list(net.parameters()), grad_out)

    def last_layer_flops(model):
        out = model(x, nt, ns, y)
        with FlopCounterMode(display=False) as counter:
            grad, = torch.autograd.grad(out, model.last_layer_weight(), grad_out, retain_graph=True)
        return out, grad, counter.get_total_flops()

    whole = copy.deepcopy(net)
    whole.compile(backend="aot_eager")
    _, _, whole_flops = last_layer_flops(whole)
    net.compile_trunk(backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise
    out, last_grad, trunk_flops = last_layer_flops(net)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(last_grad, eager_last)
    assert 0 < 10 * trunk_flops < whole_flops, (trunk_flops, whole_flops)
    for got, want in zip(torch.autograd.grad(out, list(net.parameters()), grad_out), eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_compile_options_keep_eager_rounding_where_inductor_compiles():
    """compile_options adds inductor's emulate_precision_casts, keeps the caller's options (theirs win),
    and leaves other backends' arguments alone (they take no inductor options)."""
    from ctm_core.networks import compile_options

    assert compile_options() == {"options": {"emulate_precision_casts": True}}
    assert compile_options(fullgraph=True, options={"max_autotune": True}) == {
        "fullgraph": True, "options": {"emulate_precision_casts": True, "max_autotune": True}}
    assert compile_options(options={"emulate_precision_casts": False}) == {"options": {"emulate_precision_casts": False}}
    assert compile_options(backend="aot_eager", fullgraph=True) == {"backend": "aot_eager", "fullgraph": True}


def test_inductor_compiled_trunk_rounds_to_bf16_exactly_as_eager():
    """The trainer compiles the teacher (and, with train.compile, the student) with inductor. CTM's loss is a
    difference of a compiled and an eager pass of nearly the same network, so both must round to bf16 alike
    (networks.trunk.compile_options). A bf16 U-Net compiled by compile_trunk gives eager's output bit for bit.
    Measured when written: torch.compile without compile_options differs from eager by up to 2.7e-2 here,
    so dropping EAGER_ROUNDING fails this test. One inductor compile on the CPU: ~1 min on 2 cores."""
    torch.manual_seed(0)
    net = tiny_unet().eval()
    randomize(net)
    net = net.to(torch.bfloat16)
    x, nt, ns, _ = make_inputs(net)
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        eager = net(x, nt, ns)
        net.compile_trunk()
        compiled = net(x, nt, ns)
    assert compiled.dtype == torch.bfloat16
    assert torch.equal(compiled, eager), (compiled.float() - eager.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Gradients and determinism


def test_gradients_reach_every_parameter(model):
    """At the default init every parameter gets a gradient tensor (no None: nothing unused).
    After randomization every gradient is also non-zero (the zero output layer blocks
    upstream gradients only at the very first step)."""
    model.train()
    x, nt, ns, y = make_inputs(model)
    model(x, nt, ns, y).square().mean().backward()  # zero at init, but the graph is complete
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert model.last_layer_weight().grad.abs().sum() == 0  # d(mean F^2)/dW = 0 when F = 0

    model.zero_grad(set_to_none=True)
    randomize(model)
    target = torch.randn_like(x)
    (model(x, nt, ns, y) - target).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"parameters with zero gradient: {dead}"


@pytest.mark.parametrize("factory", [lambda: tiny_mlp(num_classes=5, dropout=0.2),
                                     lambda: tiny_unet(num_classes=4, dropout=0.2)])
def test_determinism_under_manual_seed(factory):
    def build_and_run():
        torch.manual_seed(123)
        net = factory()
        perturb_output_layer(net)
        net.train()  # dropout active: also consumes the global RNG
        x, nt, ns, y = make_inputs(net)
        return [p.detach().clone() for p in net.parameters()], net(x, nt, ns, y)

    params_a, out_a = build_and_run()
    params_b, out_b = build_and_run()
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert torch.equal(out_a, out_b)


def test_dropout_active_in_train_mode_only():
    torch.manual_seed(0)
    net = tiny_unet(dropout=0.5)
    randomize(net)
    x, nt, ns, _ = make_inputs(net)
    net.train()
    assert not torch.equal(net(x, nt, ns), net(x, nt, ns))
    net.eval()
    assert torch.equal(net(x, nt, ns), net(x, nt, ns))


# ---------------------------------------------------------------------------------------------
# Size at the paper's CIFAR-10 setting


def test_cifar10_parameter_count():
    with torch.device("meta"):
        net = UNetBackbone(img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                           num_blocks=4, attn_resolutions=(16,), dropout=0.13)
        net_cond = UNetBackbone(img_resolution=32, in_channels=3, num_classes=10)
    n = count_parameters(net)
    print(f"CIFAR-10 CTM U-Net parameters: {n:,} (class-conditional: {count_parameters(net_cond):,})")
    assert 55_000_000 <= n <= 62_000_000
    # The s-conditioning (separate s-mapping MLP + one affine_s per block) is an exact add-on to
    # the DDPM++ body: removing it leaves EDM's 55.7M.
    s_params = sum(p.numel() for name, p in net.named_parameters() if "affine_s" in name or "map_s" in name)
    assert 55_600_000 <= n - s_params <= 55_800_000
    assert count_parameters(net_cond) - n == 10 * 128
    assert count_parameters(net, trainable_only=True) == n


# ---------------------------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize("name", ["mlp_cond", "unet_cond"])
def test_bad_inputs_raise_value_error_naming_argument(name):
    torch.manual_seed(0)
    net = MODELS[name]().eval()
    x, nt, ns, y = make_inputs(net)
    cases = [
        ("x_in", lambda: net(x[..., :1], nt, ns, y)),            # wrong data shape
        ("x_in", lambda: net(x[0], nt, ns, y)),                  # missing batch dim
        ("x_in", lambda: net(x.long(), nt, ns, y)),              # integer data
        ("noise_t", lambda: net(x, nt[:2], ns, y)),              # wrong batch size
        ("noise_t", lambda: net(x, nt[:, None], ns, y)),         # (B, 1) instead of (B,)
        ("noise_s", lambda: net(x, nt, ns.long(), y)),           # integer noise
        ("noise_s", lambda: net(x, nt, 0.3, y)),                 # not a tensor
        ("class_labels", lambda: net(x, nt, ns, None)),          # missing labels
        ("class_labels", lambda: net(x, nt, ns, y.float())),     # float labels
        ("class_labels", lambda: net(x, nt, ns, y[:1])),         # wrong batch size
    ]
    for arg, call in cases:
        with pytest.raises(ValueError, match=arg):
            call()


def test_labels_given_to_unconditional_model_raise():
    net = tiny_mlp().eval()
    x, nt, ns, _ = make_inputs(net)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, nt, ns, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(img_resolution=9), "img_resolution"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(dropout=1.5), "dropout"),
        (dict(num_classes=-1), "num_classes"),
        (dict(model_channels=0), "model_channels"),
    ],
)
def test_bad_unet_constructor_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tiny_unet(**kwargs)


@pytest.mark.parametrize("kwargs, arg", [(dict(dim=0), "dim"), (dict(emb_dim=15), "emb_dim"),
                                         (dict(depth=0), "depth"), (dict(dropout=-0.1), "dropout")])
def test_bad_mlp_constructor_arguments(kwargs, arg):
    cfg = dict(dim=2, hidden=32, depth=2, emb_dim=16)
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        MLPBackbone(**cfg)


def test_group_norm_keeps_bf16_under_autocast_with_fp32_statistics():
    """Under CUDA's bf16 autocast torch would upcast each activation to fp32 for the norm (and the
    next convolution would cast it back): the U-Net's GroupNorm returns its input's dtype, with the
    statistics still accumulated in fp32 (an offset mean would show it)."""
    from ctm_core.networks.unet import GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = 3.0 + 2.0 * torch.randn(2, 16, 8, 8)  # an offset mean: fp32 statistics matter
    ref = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 1e-2
    torch.testing.assert_close(norm(x), ref)  # fp32 in, fp32 out: a plain GroupNorm


def test_group_norm_adds_its_shift_and_applies_silu_where_the_unet_built_it_to():
    """The U-Net's norms carry the SiLU that follows them (and norm1 the time conditioning added before
    it), so that on CUDA one kernel does all three; off the Triton path they compute what the
    separate ops did. The attention block's norm and the FiLM variant's norm1 have no SiLU."""
    from torch.nn import functional as F

    from ctm_core.networks.unet import GroupNorm, use_triton_norms

    torch.manual_seed(0)
    norm = GroupNorm(4, 16, eps=1e-6, silu=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x, shift = torch.randn(2, 16, 4, 4), torch.randn(2, 16)
    ref = F.silu(F.group_norm(x + shift[:, :, None, None], 4, norm.weight, norm.bias, 1e-6))
    torch.testing.assert_close(norm(x, shift=shift), ref)

    unet = tiny_unet()
    assert unet.enc[0].norm0.silu and unet.enc[0].norm1.silu and unet.norm_out.silu
    assert not next(b for b in unet.dec if b.attn is not None).attn.norm.silu
    assert not tiny_unet(adaptive_scale=True).enc[0].norm1.silu  # FiLM: scale and shift come between
    norms = [m for m in unet.modules() if isinstance(m, GroupNorm)]
    assert norms and all(m.triton for m in norms)  # the default: the kernels wherever CUDA runs
    use_triton_norms(unet, False)
    assert not any(m.triton for m in norms)


@pytest.mark.parametrize("adaptive_scale", [False, True])
def test_unet_block_adds_conv0_bias_through_norm1_shift_as_the_plain_block_would(adaptive_scale):
    """The residual block hands conv0's bias to norm1 as part of its shift instead of adding it to conv0's
    output (one pass over the activation less, each way). The block must still compute DDPM++'s
    norm1(conv0(x) + cond) (FiLM: scale and shift after norm1(conv0(x))), with the same gradients, also for
    conv0's bias. Checked in float64 against the plain ops, with every bias non-zero."""
    from torch.nn import functional as F

    from ctm_core.networks.unet import UNetBlock

    torch.manual_seed(0)
    block = UNetBlock(8, 16, emb_channels=12, resample="down", dropout=0.0, adaptive_scale=adaptive_scale).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, emb_t, emb_s = torch.randn(3, 8, 8, 8).double(), torch.randn(3, 12).double(), torch.randn(3, 12).double()

    def plain(x, emb_t, emb_s):
        h = block.conv0(F.avg_pool2d(block.norm0(x), 2))  # conv0 with its bias, as nn.Conv2d adds it
        cond = block.affine_t(emb_t) + block.affine_s(emb_s)
        n1 = block.norm1
        if adaptive_scale:
            scale, shift = cond[:, :, None, None].chunk(2, dim=1)
            h = F.silu(shift + F.group_norm(h, n1.num_groups, n1.weight, n1.bias, n1.eps) * (scale + 1))
        else:
            h = F.silu(F.group_norm(h + cond[:, :, None, None], n1.num_groups, n1.weight, n1.bias, n1.eps))
        h = block.conv1(h)
        return (h + block.skip(F.avg_pool2d(x, 2))) * math.sqrt(0.5)

    out, ref = block(x, emb_t, emb_s), plain(x, emb_t, emb_s)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    params = list(block.parameters())
    grads = torch.autograd.grad(out, params, grad_out)
    ref_grads = torch.autograd.grad(ref, params, grad_out)
    assert block.conv0.bias.abs().min() > 0
    for (name, _), g, r in zip(block.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)
