"""The CTM math against closed forms: Gaussian-mixture denoiser and its exact PF-ODE flow."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import ExactFlow, make_tiny_model
from ctm_core import (EMABank, GridTimes, WeightSchedule, ctm_loss, dsm_loss, edm_scalings, gamma_sample,
                      cm_multistep_sample, ctm_consistency_fn, heun_sample, karras_grid, l2_distance,
                      sample_cd_times, sample_ctm_times, sample_dsm_times, solve_on_grid, solve_path)
from ctm_core.losses import dsm_uniform_rows
from ctm_core.process import VEProcess


def _log_path(t: float, u: float, steps: int, batch: int) -> torch.Tensor:
    times = torch.logspace(math.log10(t), math.log10(u), steps + 1, dtype=torch.float64)
    return times[:, None].expand(-1, batch)


# ---------------------------------------------------------------------------------------------- grid

def test_karras_grid_endpoints_and_order(process):
    grid = karras_grid(18, process)
    assert grid[0] == process.sigma_max and grid[-1] == process.sigma_min
    assert torch.all(grid[1:] < grid[:-1])
    # CIFAR-10's N=18 grid as printed in the official code's notes
    assert grid[1].item() == pytest.approx(57.6, rel=2e-3) and grid[-2].item() == pytest.approx(0.0075, rel=2e-2)


def test_edm_scalings_unit_variance(process):
    t = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm_scalings(t, process.sigma_data)
    sd2 = process.sigma_data ** 2
    assert torch.allclose(c_in ** 2 * (sd2 + t ** 2), torch.ones(3, dtype=torch.float64))
    # effective training target (x0 - c_skip x_t) / c_out has unit variance
    assert torch.allclose(((1 - c_skip) ** 2 * sd2 + c_skip ** 2 * t ** 2) / c_out ** 2, torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- solvers

@pytest.mark.parametrize("method,order", [("heun", 2.0), ("euler", 1.0)])
def test_solver_convergence_order(mixture, method, order):
    gen = torch.Generator().manual_seed(0)
    x0 = mixture.sample(64, gen).double()
    t, u = 5.0, 0.2
    x_t = x0 + t * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    exact = mixture.flow(x_t, t, u)
    errors = [(solve_path(mixture.denoiser, x_t, _log_path(t, u, n, 64), method) - exact).norm(dim=1).mean().item()
              for n in (8, 16, 32, 64)]
    ratios = [errors[i] / errors[i + 1] for i in range(3)]
    observed = math.log2(ratios[-1])
    assert abs(observed - order) < 0.25, (errors, ratios)


def test_solver_per_sample_times_match_individual_solves(mixture, process):
    grid = karras_grid(18, process)
    gen = torch.Generator().manual_seed(1)
    x = mixture.sample(4, gen).double() + 3.0 * torch.randn(4, 2, generator=gen, dtype=torch.float64)
    start, end = torch.tensor([2, 5, 5, 9]), torch.tensor([4, 5, 12, 17])
    batched = solve_on_grid(mixture.denoiser, x, grid, start, end, "heun", max_steps=17)
    for b in range(4):
        single = solve_on_grid(mixture.denoiser, x[b:b + 1], grid, start[b:b + 1], end[b:b + 1], "heun")
        assert torch.allclose(batched[b], single[0], atol=1e-12)
    assert torch.equal(batched[1], x[1])  # t == u: no step at all


def test_solver_refuses_too_many_steps(process, mixture):
    grid = karras_grid(18, process)
    with pytest.raises(ValueError, match="max_steps"):
        solve_on_grid(mixture.denoiser, torch.zeros(1, 2), grid, torch.tensor([0]), torch.tensor([17]), max_steps=16)


def test_heun_on_grid_converges_to_exact_flow(mixture, process):
    gen = torch.Generator().manual_seed(2)
    x = mixture.sample(32, gen).double() + 2.0 * torch.randn(32, 2, generator=gen, dtype=torch.float64)
    coarse, fine = karras_grid(40, process), karras_grid(157, process)  # 39 and 4 x 39 intervals
    assert torch.allclose(coarse[10], fine[40]) and torch.allclose(coarse[30], fine[120])
    exact = mixture.flow(x, coarse[10], coarse[30])
    errors = []
    for grid, (i, j) in ((coarse, (10, 30)), (fine, (40, 120))):
        approx = solve_on_grid(mixture.denoiser, x, grid, torch.full((32,), i), torch.full((32,), j), "heun")
        errors.append((approx - exact).abs().max().item())
    assert errors[0] < 5e-3 and errors[1] < errors[0] / 8, errors


# ---------------------------------------------------------------------------------------------- G and the CTM loss

def test_jump_to_same_time_is_identity(process):
    model = make_tiny_model(process)
    x = torch.randn(16, 2)
    t = karras_grid(18, process, torch.float32)[torch.randint(0, 18, (16,))]
    assert torch.equal(model.jump(x, t, t), x)
    assert torch.allclose(model.denoiser(x, t), model.denoise(x, t, t))


def _exact_solver(mixture, grid):
    return lambda x, ti, ui: solve_on_grid(mixture.denoiser, x, grid, ti, ui, "heun")


def test_ctm_loss_vanishes_for_exact_flow_and_grows_when_perturbed(mixture, process):
    grid = karras_grid(18, process)
    gen = torch.Generator().manual_seed(3)
    x0 = mixture.sample(48, gen).double()
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    times, _ = sample_ctm_times(48, 18, 17, gen)
    exact = ExactFlow(mixture, process)
    exact_solver = lambda x, ti, ui: mixture.flow(x, grid[ti], grid[ui])

    class Perturbed(ExactFlow):
        def jump(self, x, t, s, class_labels=None):
            out = super().jump(x, t, s)
            t_, s_ = torch.as_tensor(t).expand(x.shape[0]), torch.as_tensor(s).expand(x.shape[0])
            return out + 0.2 * (1 - s_ / t_)[:, None]  # a bias that vanishes when s = t, as G must

    perturbed = Perturbed(mixture, process)
    # exact solver: zero up to integration tolerance; the 18-point Heun solver: zero up to its error
    loss_exact = ctm_loss(exact, exact, exact_solver, x0, noise, times, grid, l2_distance).distance
    loss_heun = ctm_loss(exact, exact, _exact_solver(mixture, grid), x0, noise, times, grid, l2_distance).distance
    loss_p = ctm_loss(perturbed, exact, exact_solver, x0, noise, times, grid, l2_distance).distance
    assert loss_exact.mean() < 1e-14, loss_exact.mean()
    assert loss_heun.mean() < 1e-3, loss_heun.mean()
    assert loss_p.mean() > 1e-3 and loss_p.mean() > 10 * loss_heun.mean()


def test_ctm_loss_with_student_target_choice(process, mixture):
    grid = karras_grid(18, process, torch.float32)
    student = make_tiny_model(process, seed=0)
    bank = EMABank(student, [0.999])
    target = bank[0.999]
    gen = torch.Generator().manual_seed(4)
    x0, noise = mixture.sample(8, gen), torch.randn(8, 2, generator=gen)
    t_idx = torch.arange(8)
    times = GridTimes(t_idx, t_idx + 3, t_idx + 6)  # s < u, so the u -> s jump matters
    solver = _exact_solver(mixture, grid)
    a = ctm_loss(student, target, solver, x0, noise, times, grid, target_inner="student").distance
    b = ctm_loss(student, target, solver, x0, noise, times, grid, target_inner="target").distance
    assert torch.allclose(a, b)  # target == student at initialisation
    with torch.no_grad():
        student.backbone.out.bias.add_(0.3)
    a = ctm_loss(student, target, solver, x0, noise, times, grid, target_inner="student").distance
    b = ctm_loss(student, target, solver, x0, noise, times, grid, target_inner="target").distance
    assert not torch.allclose(a, b)


def test_gradients_reach_the_student_only(process, mixture):
    grid = karras_grid(18, process, torch.float32)
    student = make_tiny_model(process, seed=0)
    teacher = make_tiny_model(process, seed=1).requires_grad_(False)
    bank = EMABank(student, [0.99, 0.999])
    gen = torch.Generator().manual_seed(5)
    x0, noise = mixture.sample(16, gen), torch.randn(16, 2, generator=gen)
    times, _ = sample_ctm_times(16, 18, 17, gen)
    solver = lambda x, ti, ui: solve_on_grid(teacher.denoiser, x, grid, ti, ui, "heun")
    loss = ctm_loss(student, bank[0.999], solver, x0, noise, times, grid).distance
    loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in bank.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_jumps_to_sigma_min_skip_the_identity_outer_call_exactly(process, mixture):
    """s = sigma_min everywhere (s_strategy 'min', CD): the flagged draw gives the same loss and
    student gradients as the unflagged one, with no target-network call outside the u -> s jump."""
    grid = karras_grid(18, process, torch.float32)
    student = make_tiny_model(process, seed=0)
    with torch.no_grad():
        student.backbone.out.bias.add_(0.3)  # student != target, so every call's output matters
    target = EMABank(make_tiny_model(process, seed=2), [0.9])[0.9]
    gen = torch.Generator().manual_seed(8)
    x0, noise = mixture.sample(16, gen), torch.randn(16, 2, generator=gen)
    flagged, _ = sample_ctm_times(16, 18, 17, gen, s_strategy="min")
    assert flagged.s_at_end and not sample_ctm_times(16, 18, 17, gen)[0].s_at_end
    assert sample_cd_times(4, 18, gen).s_at_end
    plain = GridTimes(flagged.t_idx, flagged.u_idx, flagged.s_idx)
    solver = _exact_solver(mixture, grid)
    calls = []
    target.backbone.register_forward_hook(lambda *_: calls.append(1))
    results = []
    for times in (plain, flagged):
        calls.clear()
        student.zero_grad()
        for inner in ("student", "target"):
            loss, x_est, _ = ctm_loss(student, target, solver, x0, noise, times, grid, target_inner=inner)
            loss.sum().backward()
        results.append((loss.detach(), x_est.detach(), [p.grad.clone() for p in student.parameters()], len(calls)))
    (loss_a, est_a, grads_a, calls_a), (loss_b, est_b, grads_b, calls_b) = results
    assert calls_a == 5 and calls_b == 1  # 2 outer calls per loss, and the 'target' inner jump
    assert torch.equal(loss_a, loss_b) and torch.equal(est_a, est_b)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(grads_a, grads_b))
    # an explicit end other than sigma_min (the paper's 0) keeps the outer call
    calls.clear()
    ctm_loss(student, target, solver, x0, noise, flagged, grid, end_time=0.0)
    assert len(calls) == 2


def test_ctm_loss_refuses_a_trainable_target(process, mixture):
    grid = karras_grid(18, process, torch.float32)
    model = make_tiny_model(process)
    times = GridTimes(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="target"):
        ctm_loss(model, model, lambda x, a, b: x, torch.zeros(1, 2), torch.zeros(1, 2), times, grid)


def test_ctm_time_sampling_matches_official_draw():
    gen = torch.Generator().manual_seed(6)
    ks = []
    for _ in range(3000):
        times, k = sample_ctm_times(4, 18, 17, gen)
        assert torch.all(times.u_idx - times.t_idx == k)
        assert torch.all(times.s_idx >= times.u_idx) and torch.all(times.s_idx <= 17)
        assert torch.all(times.t_idx >= 0)
        ks.append(k)
    ks = torch.tensor(ks, dtype=torch.float64)
    # P(k) proportional to k on 1..17: E[k] = sum k^2 / sum k = 1785 / 153 = 11.67
    assert ks.mean().item() == pytest.approx(1785 / 153, abs=0.25)
    cd = sample_cd_times(64, 18, gen)
    assert torch.all(cd.u_idx == cd.t_idx + 1) and torch.all(cd.s_idx == 17)


# ---------------------------------------------------------------------------------------------- DSM

def test_dsm_loss_of_exact_denoiser_is_posterior_variance(mixture, process):
    gen = torch.Generator().manual_seed(7)
    n = 100_000
    x0 = mixture.sample(n, gen).double()
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = sample_dsm_times(n, process, gen).double()
    loss = dsm_loss(mixture.denoiser, x0, t, noise, weighting="uniform")
    posterior = mixture.posterior_variance(x0 + t[:, None] * noise, t) / mixture.dim
    stderr = (loss - posterior).std() / math.sqrt(n)
    # Monte-Carlo tolerance: 4 standard errors of the paired difference
    assert abs(loss.mean() - posterior.mean()) < 4 * stderr, (loss.mean(), posterior.mean(), stderr)
    wrong = dsm_loss(lambda x, s: 1.1 * mixture.denoiser(x, s), x0, t, noise, weighting="uniform")
    excess = wrong - loss
    assert excess.mean() > 10 * excess.std() / math.sqrt(n)


def test_dsm_time_sampling_halves(process):
    gen = torch.Generator().manual_seed(8)
    t = sample_dsm_times(200_000, process, gen).double()
    rows = dsm_uniform_rows(200_000, 0.5)
    lognormal, uniform = t[~rows], t[rows]
    assert len(lognormal) == len(uniform) == 100_000
    assert lognormal.log().mean().item() == pytest.approx(-1.2, abs=0.02)
    assert lognormal.log().std().item() == pytest.approx(1.2, abs=0.03)
    # xi in [0, 0.7] of the rho-schedule: sigma in [karras(0.7), 80]
    lo = (80 ** (1 / 7) + 0.7 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert uniform.min().item() >= lo * 0.999 and uniform.max().item() <= 80
    assert uniform.median().item() > lognormal.median().item()


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_every_microbatch_slice_holds_both_dsm_time_kinds(fraction):
    """The official code draws the mixture per microbatch; our global draw is sliced per rank and
    microbatch (e.g. CIFAR-10's GAN microbatch of 11), so every slice must hold its share of each kind."""
    rows = dsm_uniform_rows(256, fraction)
    assert int(rows.sum()) == int(256 * fraction)
    for m in (1, 3, 11, 64, 128):
        for start in range(0, 256 - m + 1):
            n = int(rows[start:start + m].sum())
            assert math.floor(m * fraction) <= n <= math.ceil(m * fraction), (m, start, n)


# ---------------------------------------------------------------------------------------------- samplers

def test_gamma_one_equals_cm_multistep(process):
    model = make_tiny_model(process)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(9))
    nfe = 4
    a = gamma_sample(model, z, nfe, gamma=1.0, generator=torch.Generator().manual_seed(10))
    times = karras_grid(nfe + 1, process).tolist()[:-1]
    b = cm_multistep_sample(ctm_consistency_fn(model), z, times, process, generator=torch.Generator().manual_seed(10))
    assert torch.allclose(a, b, atol=1e-6)


def test_gamma_zero_with_exact_flow_reproduces_the_flow(mixture, process):
    exact = ExactFlow(mixture, process)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    reference = mixture.flow(z * process.sigma_max, process.sigma_max, process.sigma_min)
    for nfe in (1, 2, 4):
        samples = gamma_sample(exact, z, nfe, gamma=0.0)
        assert torch.allclose(samples, reference, atol=1e-6), nfe


def test_gamma_sampling_boundary_cases_and_randomness(process):
    model = make_tiny_model(process)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(12))
    one = gamma_sample(model, z, 1, gamma=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(one, model.jump(z * process.sigma_max, process.sigma_max, process.sigma_min))
    a = gamma_sample(model, z, 3, gamma=0.5, generator=torch.Generator().manual_seed(0))
    b = gamma_sample(model, z, 3, gamma=0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)
    assert torch.equal(gamma_sample(model, z, 3, 0.0), gamma_sample(model, z, 3, 0.0))


def test_teacher_heun_sampler_matches_exact_flow(mixture, process):
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    samples = heun_sample(mixture.denoiser, z, 80, process)
    reference = mixture.flow(z * process.sigma_max, process.sigma_max, process.sigma_min)
    # the last step goes sigma_min -> 0, which barely moves x
    assert (samples - reference).abs().max() < 1e-2


# ---------------------------------------------------------------------------------------------- EMA and schedules

def test_ema_bank_tracks_rates(process):
    model = make_tiny_model(process)
    bank = EMABank(model, [0.0, 0.5, 0.9])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = [p.clone() for p in bank[0.5].parameters()]
    bank.update(model)
    for p_avg, p_before, p in zip(bank[0.5].parameters(), before, model.parameters()):
        assert torch.allclose(p_avg, 0.5 * p_before + 0.5 * p)
    for p_avg, p in zip(bank[0.0].parameters(), model.parameters()):
        assert torch.equal(p_avg, p)
    assert not any(p.requires_grad for p in bank.parameters())


def test_weight_schedule_shapes():
    ramp = WeightSchedule(value=1.0, start=10, ramp_steps=9)
    assert ramp(9) == 0 and not ramp.is_active(9)
    assert 0 < ramp(10) < ramp(14) < ramp(18) < 1 and ramp(19) == 1.0 and ramp(10**6) == 1.0
    cos = WeightSchedule(value=2.0, start=0, ramp_steps=100, shape="cosine")
    assert cos(50) == pytest.approx(1.0, abs=0.05)
    parsed = WeightSchedule.parse("0.1@200+100cos:adaptive", adaptive_max=10.0)
    assert parsed == WeightSchedule(0.1, 200, 100, "cosine", True, 0.0, 10.0)
    assert WeightSchedule.parse(parsed.label(), adaptive_max=10.0) == parsed
    assert WeightSchedule.parse("off").is_off and WeightSchedule.parse("off").label() == "off"


def test_learning_rate_warms_up_then_decays_to_zero():
    from ctm_core.schedules import learning_rate

    assert [learning_rate(s, 1.0, 4, "none", 100) for s in (0, 1, 3, 50, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    lin = [learning_rate(s, 2.0, 0, "linear", 100) for s in (0, 25, 50, 99)]
    assert lin == pytest.approx([2.0, 1.5, 1.0, 0.02])
    cos = [learning_rate(s, 2.0, 0, "cosine", 100) for s in (0, 50, 100)]
    assert cos == pytest.approx([2.0, 1.0, 0.0], abs=1e-12)
    assert learning_rate(2, 1.0, 10, "cosine", 100) < learning_rate(2, 1.0, 10, "none", 100)  # both apply
    with pytest.raises(ValueError, match="decay"):
        learning_rate(0, 1.0, 0, "step", 100)


# ---------------------------------------------------------------------------------------------- dtypes, determinism

def test_bf16_autocast_on_cpu(process):
    model = make_tiny_model(process)
    x, t = torch.randn(8, 2), torch.full((8,), 3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.jump(x, t, torch.full((8,), 0.5))
    high = model.jump(x, t, torch.full((8,), 0.5))
    assert low.shape == high.shape and torch.allclose(low.float(), high, rtol=5e-2, atol=5e-2)


def test_images_shape_and_dtype(process):
    class ConvBackbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, noise_t, noise_s, class_labels=None):
            return self.conv(x) * (1 + noise_t - noise_s).reshape(-1, 1, 1, 1)

    from ctm_core import CTMModel
    model = CTMModel(ConvBackbone(), process)
    for dtype in (torch.float32, torch.float64):
        model = model.to(dtype)
        x = torch.randn(4, 3, 8, 8, dtype=dtype)
        out = model.jump(x, torch.full((4,), 10.0, dtype=dtype), torch.full((4,), 1.0, dtype=dtype))
        assert out.shape == x.shape and out.dtype == dtype


def test_losses_are_deterministic_under_a_seed(process, mixture):
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        student = make_tiny_model(process, seed=seed)
        target = EMABank(student, [0.999])[0.999]
        grid = karras_grid(18, process, torch.float32)
        times, _ = sample_ctm_times(8, 18, 17, gen)
        x0, noise = mixture.sample(8, gen), torch.randn(8, 2, generator=gen)
        return ctm_loss(student, target, _exact_solver(mixture, grid), x0, noise, times, grid)[0]

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_argument(process):
    model = make_tiny_model(process)
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"\bs\b"):
        model.jump(x, torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.5]))
    with pytest.raises(ValueError, match=r"\bt\b"):
        model.jump(x, torch.tensor([100.0, 1.0]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"\bt\b"):
        model.denoiser(x, torch.tensor([0.001, 1.0]))
    with pytest.raises(ValueError, match="mu"):
        EMABank(model, [1.0])
    with pytest.raises(ValueError, match="mu"):
        EMABank(model, [-0.1])
    with pytest.raises(ValueError, match="num_points"):
        karras_grid(1, process)
    with pytest.raises(ValueError, match="num_points"):
        sample_ctm_times(4, 1, 17)
    with pytest.raises(ValueError, match="value"):
        WeightSchedule(value=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        gamma_sample(model, x, 2, gamma=1.5)
    with pytest.raises(ValueError, match="sigma_max"):
        VEProcess(sigma_min=1.0, sigma_max=0.5)


def test_g_and_G_match_the_formulas(process):
    class Constant(torch.nn.Module):
        def forward(self, x, noise_t, noise_s, class_labels=None):
            return torch.ones_like(x) * (1 + noise_s[:, None])  # depends on s through c_noise(s) = ln(s)/4

    from ctm_core import CTMModel
    model = CTMModel(Constant(), process)
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.01], dtype=torch.float64)
    s = t * torch.tensor([0.5, 0.1, 0.0, 1.0, 0.2], dtype=torch.float64)
    sd = process.sigma_data
    c_skip, c_out = sd ** 2 / (t ** 2 + sd ** 2), t * sd / (t ** 2 + sd ** 2).sqrt()
    s_embed = s.clamp(min=process.sigma_min)  # s = 0 is embedded as sigma_min
    g = c_skip[:, None] * x + c_out[:, None] * (1 + s_embed.log()[:, None] / 4)
    assert torch.allclose(model.denoise(x, t, s), g)
    assert torch.allclose(model.jump(x, t, s), (s / t)[:, None] * x + (1 - s / t)[:, None] * g)


def test_gan_losses_update_only_their_own_side(process, mixture):
    from ctm_core import discriminator_loss, generator_adversarial_loss
    from ctm_core.discriminators import VectorDiscriminator

    grid = karras_grid(18, process, torch.float32)
    student = make_tiny_model(process)
    target = EMABank(student, [0.999])[0.999]
    disc = VectorDiscriminator(2, hidden=16, depth=2)
    gen = torch.Generator().manual_seed(14)
    x0, noise = mixture.sample(16, gen), torch.randn(16, 2, generator=gen)
    times, _ = sample_ctm_times(16, 18, 17, gen)
    x_est = ctm_loss(student, target, _exact_solver(mixture, grid), x0, noise, times, grid).x_est

    generator_adversarial_loss(disc, x_est).backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # the freeze is undone after the call

    student.zero_grad(set_to_none=True)
    discriminator_loss(disc, x0, x_est).backward()
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is not None for p in disc.parameters())


def test_adaptive_weight_is_the_clamped_ratio_of_last_layer_gradient_norms():
    from ctm_core import adaptive_weight, last_layer_grad_norm
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    reference, term = (3 * w).sum(), (w ** 2).sum()  # grads (3, 3) and (2, 4)
    ref_norm = last_layer_grad_norm(reference, w)
    assert ref_norm.item() == pytest.approx(18 ** 0.5)
    term_norm = last_layer_grad_norm(term, w)
    assert adaptive_weight(ref_norm, term_norm, eps=0.0).item() == pytest.approx((18 / 20) ** 0.5)
    assert adaptive_weight(ref_norm, term_norm, min_value=0.01, max_value=0.5, eps=0.0).item() == pytest.approx(0.5)
    assert not adaptive_weight(ref_norm, term_norm).requires_grad
    # through an intermediate output y = w * (5, 7) whose gradient is known: d<y, g>/dw = g * (5, 7)
    y = w * torch.tensor([5.0, 7.0])
    assert last_layer_grad_norm(y, w, torch.tensor([1.0, 2.0])).item() == pytest.approx((25 + 196) ** 0.5)


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_generator_objective_has_the_plain_objectives_gradient(process, mixture, adaptive):
    """The objective back-propagates the student once from its jump (surrogate <sg(dL/dy), y>); its
    gradient and logged weights must equal the textbook sum lambda_CTM L_CTM + w_DSM L_DSM + w_GAN L_GAN
    with VQGAN weights from each term's own last-layer gradient."""
    from ctm_core import adaptive_weight, dsm_loss, generator_adversarial_loss, last_layer_grad_norm
    from ctm_core.config import load_config
    from ctm_core.discriminators import VectorDiscriminator
    from ctm_core.objective import GeneratorObjective, MicroBatch, StepWeights

    cfg = load_config(overrides=["mode=ctm", "data.spec=toy:gmm2d_8", "teacher.checkpoint=unused"])
    grid = karras_grid(cfg.ctm.num_points, process, torch.float32)
    student = make_tiny_model(process, seed=0)
    teacher = make_tiny_model(process, seed=1).requires_grad_(False)
    target = EMABank(make_tiny_model(process, seed=2), [0.9])[0.9]
    disc = VectorDiscriminator(2, hidden=16, depth=2)
    gen = torch.Generator().manual_seed(9)
    b = 32
    times, _ = sample_ctm_times(b, cfg.ctm.num_points, cfg.ctm.max_steps, gen)
    mb = MicroBatch(x0=mixture.sample(b, gen), labels=None, noise=torch.randn(b, 2, generator=gen), times=times,
                    dsm_noise=torch.randn(b, 2, generator=gen), dsm_t=sample_dsm_times(b, process, gen))
    weights = StepWeights(ctm=1.0, dsm=0.7, gan=0.3, dsm_adaptive=adaptive, gan_adaptive=adaptive,
                          dsm_clamp=(0.0, 1e4), gan_clamp=(0.0, 1e4))
    objective = GeneratorObjective(student, cfg, grid, l2_distance, target, teacher, disc)
    loss, logs, _ = objective(mb, weights)
    (loss / b).backward()
    grads = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    solver = lambda x, ti, ui: solve_on_grid(teacher.denoiser, x, grid, ti, ui, "heun", cfg.ctm.max_steps)
    terms = ctm_loss(student, target, solver, mb.x0, mb.noise, times, grid, l2_distance, cfg.ctm.target_inner)
    l_ctm = terms.distance.mean()
    l_dsm = dsm_loss(student.denoiser, mb.x0, mb.dsm_t, mb.dsm_noise, cfg.loss.dsm.weighting,
                     process.sigma_data).mean()
    l_gan = generator_adversarial_loss(disc, terms.x_est)
    last = student.backbone.last_layer_weight()
    w_dsm, w_gan = torch.tensor(1.0), torch.tensor(1.0)
    if adaptive:
        ref = last_layer_grad_norm(l_ctm, last)
        w_dsm = adaptive_weight(ref, last_layer_grad_norm(l_dsm, last))
        w_gan = adaptive_weight(ref, last_layer_grad_norm(l_gan, last))
        assert 0.05 < w_dsm < 20 and 0.05 < w_gan < 20 and not torch.isclose(w_dsm, w_gan)
    (l_ctm + 0.7 * w_dsm * l_dsm + 0.3 * w_gan * l_gan).backward()
    for got, want in zip(grads, (p.grad for p in student.parameters())):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (got - want).abs().max()
    assert logs["weight_dsm"].item() == pytest.approx(0.7 * w_dsm.item(), rel=1e-5)
    assert logs["weight_gan"].item() == pytest.approx(0.3 * w_gan.item(), rel=1e-5)
    assert logs["loss_ctm"].item() == pytest.approx(l_ctm.item(), rel=1e-6)
    assert all(p.grad is None for p in disc.parameters()) and all(p.grad is None for p in target.parameters())




def test_jump_and_denoise_in_one_call_equal_the_two_calls(process):
    """The CTM objective gets the student's jump and its DSM denoiser from one network call on the
    stacked batch; per sample that must be exactly what the two calls give (labels included)."""
    from ctm_core.networks import UNetBackbone
    from ctm_core.parameterization import CTMModel

    torch.manual_seed(0)
    backbone = UNetBackbone(img_resolution=8, in_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                            attn_resolutions=(4,), num_classes=4)
    with torch.no_grad():
        backbone.last_layer_weight().normal_(0, 0.1)
    model = CTMModel(backbone, process).eval()
    gen = torch.Generator().manual_seed(1)
    x, x_dsm = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, 3, 8, 8, generator=gen)
    t, t_dsm = torch.tensor([5.0, 1.0, 0.3]), torch.tensor([0.1, 2.0, 40.0])
    s = t * torch.tensor([0.5, 0.0, 0.9])
    labels = torch.tensor([0, 3, 1])
    jump, denoised = model.jump_and_denoise(x, t, s, x_dsm, t_dsm, labels)
    torch.testing.assert_close(jump, model.jump(x, t, s, labels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(denoised, model.denoiser(x_dsm, t_dsm, labels), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(denoised, model.denoiser(x_dsm, t_dsm, labels.flip(0)), atol=1e-4), "labels matter"


def test_host_known_solver_steps_give_the_same_solution(mixture, process):
    """The draws record the solver's step count on the host (k; CD: 1), so the teacher's solver does
    not read the indices back from the device; the solution must not change, and a wrong count would."""
    from ctm_core.losses import sample_cd_times

    grid = karras_grid(18, process, torch.float64)
    gen = torch.Generator().manual_seed(4)
    times, k = sample_ctm_times(64, 18, 17, gen)
    assert times.steps == k and bool(((times.u_idx - times.t_idx) == k).all())
    assert times.rows(3, 9, "cpu").steps == k
    cd = sample_cd_times(8, 18, gen)
    assert cd.steps == 1 and bool(((cd.u_idx - cd.t_idx) == 1).all())
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64) * grid[times.t_idx][:, None]
    checked = solve_on_grid(mixture.denoiser, x, grid, times.t_idx, times.u_idx, "heun", 17)
    trusted = solve_on_grid(mixture.denoiser, x, grid, times.t_idx, times.u_idx, "heun", 17, times.steps)
    torch.testing.assert_close(trusted, checked, rtol=0, atol=0)
    if k > 1:
        short = solve_on_grid(mixture.denoiser, x, grid, times.t_idx, times.u_idx, "heun", 17, k - 1)
        assert not torch.allclose(short, checked)


def test_broadcast_time_fills_numbers_on_the_tensors_device_and_shapes_per_sample_times():
    """Numbers become a fill in x's dtype (on a GPU a copy of a number from host memory would make the
    host wait for the GPU); tensors keep their values; a wrong length is refused."""
    from ctm_core.process import broadcast_time

    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    filled = broadcast_time(0.5, x)
    assert filled.shape == (3, 1, 1, 1) and filled.dtype == torch.float64 and bool((filled == 0.5).all())
    torch.testing.assert_close(broadcast_time(torch.tensor(2.0), x), torch.full((3, 1, 1, 1), 2.0, dtype=torch.float64))
    torch.testing.assert_close(broadcast_time(torch.arange(3.0), x).reshape(-1), torch.arange(3.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="time must be a scalar or have shape"):
        broadcast_time(torch.ones(2), x)
