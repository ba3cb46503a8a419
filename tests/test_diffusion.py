"""The diffusion family: the forward process and its posterior against direct Gaussian
computations, the per-step KL against torch.distributions, the bounds against closed forms
(Gaussian data, independent discrete data), the estimators, the learned schedule, and one run
end to end."""

import csv
import json
import math

import pytest
import torch
from conftest import train_for_epochs
from torch.distributions import Categorical, Independent, Normal, kl_divergence

from klbench.config import load_config, resolve_run, validate_config
from klbench.errors import ConfigError
from klbench.ledger import Ledger
from klbench.settings import build_settings
from klbench.models.diffusion import (
    DDPM,
    VDM,
    Config,
    LearnedGamma,
    antithetic_times,
    cosine_betas,
    linear_betas,
    posterior,
)
from klbench.train import held_out_ledger, seed_everything

BETAS = {"linear": linear_betas, "cosine": cosine_betas}
VARIANTS = {
    "ddpm-linear": {},
    "ddpm-cosine": {"schedule": "cosine"},
    "vdm-fixed": {"process": "vdm", "schedule": "fixed"},
    "vdm-learned": {"process": "vdm", "schedule": "learned"},
}
MU, S, DIM = 0.7, 0.5, 2  # Gaussian test data N(MU, S^2 I_DIM)
GAUSSIAN_ENTROPY = 0.5 * DIM * math.log(2 * math.pi * math.e * S**2)


def make_config(**changes) -> Config:
    values = dict(process="ddpm", schedule="linear", timesteps=1000, objective="vlb", hidden=[32, 32],
                  time_embedding=16, gamma_min=-13.3, gamma_max=5.0, sample_steps=20)
    values.update(changes)
    return Config(**values)


def make_model(x, kind="continuous", levels=None, **changes):
    config = make_config(**changes)
    return {"ddpm": DDPM, "vdm": VDM}[config.process](config, x, kind, levels)


def ring(n=600, seed=0):
    """Points on a noisy ring of radius 1.5: continuous, unit scale, not Gaussian."""
    g = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    return 1.5 * torch.stack([angle.cos(), angle.sin()], 1) + 0.1 * torch.randn(n, 2, generator=g)


def alpha_bar(timesteps, schedule="linear"):
    """Ho et al.'s alpha_bar_t = prod_{s<=t} (1 - beta_s), float64, index t - 1."""
    return torch.cumprod(1 - BETAS[schedule](timesteps), 0)


def gaussian_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MU + S * torch.randn(n, DIM, generator=g)


def with_optimal_denoiser(model):
    """The base with the true mean and variance and a zero network is E[eps | z] exactly."""
    model.data_mean.fill_(MU)
    model.data_var.fill_(S**2)
    return model


def ddpm_gaussian_bound(betas):
    """The DDPM bound with the optimal denoiser on N(MU, S^2 I), in Ho et al.'s notation.

    prior = E KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1)); each step, with the reverse variance
    beta_t: KL = 0.5 (log(beta_t / beta~_t) + beta~_t / beta_t - 1 + c0^2 v_t / beta_t) per
    dimension, c0 = sqrt(ab_{t-1}) beta_t / (1 - ab_t) and v_t = Var(x0 | x_t); the decoder
    N(x_1 / sqrt(ab_1), (1 - ab_1) / ab_1) has expected -log density 0.5 log(2 pi e (1 - ab_1) / ab_1).
    """
    ab = torch.cumprod(1 - betas, 0)
    prior = 0.5 * (ab[-1] * (MU**2 + S**2) - ab[-1] - torch.log(1 - ab[-1]))
    beta, ab_t, ab_s = betas[1:], ab[1:], ab[:-1]
    beta_tilde = (1 - ab_s) * beta / (1 - ab_t)
    c0 = ab_s.sqrt() * beta / (1 - ab_t)
    v = S**2 * (1 - ab_t) / (ab_t * S**2 + 1 - ab_t)
    steps = 0.5 * (torch.log(beta / beta_tilde) + beta_tilde / beta - 1 + c0**2 * v / beta)
    reconstruction = 0.5 * math.log(2 * math.pi * math.e) + 0.5 * torch.log((1 - ab[0]) / ab[0])
    return DIM * (prior + steps.sum() + reconstruction).item()


def vdm_gaussian_bound(gamma_0, gamma_1):
    """The continuous-time VDM bound with the optimal denoiser on N(MU, S^2 I):
    E||eps - E[eps|z]||^2 = D S^2 / (S^2 + exp(gamma)) per unit gamma, whose integral gives
    diffusion = 0.5 D (log(1 + S^2 e^-gamma_0) - log(1 + S^2 e^-gamma_1))."""
    alpha2_1, sigma2_1 = 1 / (1 + math.exp(gamma_1)), 1 / (1 + math.exp(-gamma_1))
    prior = 0.5 * (alpha2_1 * (MU**2 + S**2) + sigma2_1 - 1 - math.log(sigma2_1))
    diffusion = 0.5 * (math.log1p(S**2 * math.exp(-gamma_0)) - math.log1p(S**2 * math.exp(-gamma_1)))
    reconstruction = 0.5 * (math.log(2 * math.pi * math.e) + gamma_0)
    return DIM * (prior + diffusion + reconstruction)


def assert_within(estimate: torch.Tensor, expected: float, sigmas: float = 4.0, slack: float = 0.0):
    """The mean of per-example estimates equals `expected` within `sigmas` standard errors."""
    mean, se = estimate.double().mean().item(), estimate.double().std().item() / math.sqrt(len(estimate))
    assert abs(mean - expected) <= sigmas * se + slack, f"{mean:.5f} vs {expected:.5f} (se {se:.5f})"


# --- the forward process -----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_gamma_table_is_hos_alpha_bar_as_log_snr(schedule):
    ab = alpha_bar(1000, schedule)
    model = make_model(torch.randn(10, 2), schedule=schedule)
    torch.testing.assert_close(model.gamma[1:].double(), torch.log((1 - ab) / ab), rtol=1e-6, atol=1e-5)
    betas = BETAS[schedule](1000)
    assert betas.max() <= 0.999
    if schedule == "linear":
        assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    else:  # Nichol & Dhariwal eq. 17 wherever the clip at 0.999 does not bind
        t = torch.arange(1, 1000, dtype=torch.float64) / 1000
        f = lambda s: torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        torch.testing.assert_close(ab[:-1], f(t) / f(torch.zeros((), dtype=torch.float64)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t", [2, 10, 500, 1000])
def test_forward_posterior_is_the_conditioned_joint_gaussian(t):
    """Given x0: x_{t-1} ~ N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) and x_t = sqrt(1 - beta_t) x_{t-1} +
    sqrt(beta_t) e; condition the joint Gaussian of (x_{t-1}, x_t) on x_t."""
    betas, ab = linear_betas(1000), alpha_bar(1000)
    g = torch.Generator().manual_seed(t)
    x0, x_t = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    var_s = 1 - ab[t - 2]
    cov = (1 - betas[t - 1]).sqrt() * var_s
    var_t = (1 - betas[t - 1]) * var_s + betas[t - 1]
    torch.testing.assert_close(var_t, 1 - ab[t - 1])
    mean = ab[t - 2].sqrt() * x0 + cov / var_t * (x_t - ab[t - 1].sqrt() * x0)
    var = var_s - cov**2 / var_t
    gamma = torch.log((1 - ab) / ab)
    got_mean, got_logvar = posterior(x0, x_t, gamma[t - 2], gamma[t - 1])
    torch.testing.assert_close(got_mean, mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_logvar.exp(), var.expand_as(mean), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("kind", ["continuous", "binary"])
@pytest.mark.parametrize("t", [2, 3, 100, 1000])
def test_step_kl_and_reverse_match_hos_gaussians_in_torch_distributions(kind, t):
    """q(x_{t-1}|x_t,x0) by Ho eq. 7, p(x_{t-1}|x_t) with mean by eq. 11 and variance beta_t
    (continuous data) or beta~_t (discrete data); KL by torch.distributions."""
    betas, ab = linear_betas(1000), alpha_bar(1000)
    beta, ab_t, ab_s = betas[t - 1], ab[t - 1], ab[t - 2]
    g = torch.Generator().manual_seed(t)
    x_data = (torch.rand(8, 4, generator=g) > 0.5).float() if kind == "binary" else torch.randn(8, 4, generator=g)
    model = make_model(x_data, kind)
    x0 = model.to_model_units(x_data).double()
    eps = torch.randn(8, 4, generator=g, dtype=torch.float64)
    eps_hat = eps + 0.3 * torch.randn(8, 4, generator=g, dtype=torch.float64)
    x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * eps
    mean_q = ab_s.sqrt() * beta / (1 - ab_t) * x0 + (1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t) * x_t
    var_q = (1 - ab_s) / (1 - ab_t) * beta
    mean_p = (x_t - beta / (1 - ab_t).sqrt() * eps_hat) / (1 - beta).sqrt()
    var_p = beta if kind == "continuous" else var_q
    expected = kl_divergence(Independent(Normal(mean_q, var_q.sqrt()), 1), Independent(Normal(mean_p, var_p.sqrt()), 1))
    got = model.kl_step((eps - eps_hat).pow(2).sum(-1).float(), torch.full((8,), t))
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=1e-5)
    reverse_mean, reverse_logvar = model.reverse(x_t.float(), eps_hat.float(), model.gamma[t - 1], model.gamma[t])
    torch.testing.assert_close(reverse_mean.double(), mean_p, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reverse_logvar.exp().double(), var_p.expand_as(mean_p), rtol=1e-4, atol=0)


# --- bounds with a known answer --------------------------------------------------------------


@pytest.mark.parametrize("timesteps", [50, 1000])
def test_ddpm_bound_with_the_optimal_denoiser_on_gaussian_data_is_the_closed_form(timesteps):
    x = gaussian_data(20_000)
    model = with_optimal_denoiser(make_model(x, timesteps=timesteps))
    torch.manual_seed(0)
    ledger = Ledger(model.ledger_terms(x, samples=16))
    assert_within(ledger.neg_elbo, ddpm_gaussian_bound(linear_betas(timesteps)))
    ab_1 = alpha_bar(timesteps)[0]
    expected = 0.5 * DIM * math.log(2 * math.pi * math.e * (1 - ab_1) / ab_1)
    torch.testing.assert_close(ledger.terms["reconstruction"].double(),
                               torch.full((len(x),), expected, dtype=torch.float64))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_optimal_bound_decreases_to_the_entropy_as_t_grows(schedule):
    bounds = [ddpm_gaussian_bound(BETAS[schedule](timesteps)) for timesteps in (10, 50, 200, 1000, 4000)]
    assert all(a > b for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] > GAUSSIAN_ENTROPY
    assert bounds[3] - GAUSSIAN_ENTROPY < 3e-3 and bounds[4] - GAUSSIAN_ENTROPY < 1e-3


@pytest.mark.parametrize("schedule", ["fixed", "learned"])
def test_vdm_bound_with_the_optimal_denoiser_is_the_closed_form_for_any_schedule_shape(schedule):
    """The continuous-time bound depends on gamma(t) only through its endpoints (Kingma et al.
    sec. 4): a learned schedule with a scrambled shape gives the fixed schedule's value."""
    x = gaussian_data(20_000)
    model = with_optimal_denoiser(make_model(x, process="vdm", schedule=schedule))
    if schedule == "learned":
        torch.manual_seed(1)
        with torch.no_grad():
            for name, parameter in model.schedule.named_parameters():
                if name not in ("gamma_0", "raw_span"):
                    parameter.add_(2 * torch.randn_like(parameter))
    torch.manual_seed(0)
    ledger = Ledger(model.ledger_terms(x, samples=16))
    assert_within(ledger.neg_elbo, vdm_gaussian_bound(-13.3, 5.0))


def test_vdm_optimal_bound_approaches_the_entropy_as_the_endpoints_widen():
    bounds = [vdm_gaussian_bound(-g, g) for g in (5.0, 10.0, 15.0, 20.0)]
    assert all(a > b > GAUSSIAN_ENTROPY for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] - GAUSSIAN_ENTROPY < 1e-6
    assert vdm_gaussian_bound(-13.3, 5.0) - GAUSSIAN_ENTROPY < 5e-3


@pytest.mark.parametrize("process", ["ddpm", "vdm"])
@pytest.mark.parametrize("kind,levels", [("binary", None), ("discrete", 5)])
def test_bound_on_independent_discrete_data_with_the_exact_denoiser_is_at_the_entropy(process, kind, levels):
    """Independent dimensions with level probabilities p: logits log p make the denoiser the
    exact posterior, so the bound (on the discrete data, in nats) sits just above -log P(x)."""
    n_levels = levels or 2
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(1.5 * torch.randn(3, n_levels, generator=g), -1)  # (D, L)
    x = Categorical(probs).sample((20_000,)).float()
    model = make_model(x, kind, levels, process=process, schedule="linear" if process == "ddpm" else "fixed")
    with torch.no_grad():
        model.denoiser.out.bias.copy_(probs.log().T.flatten())  # logits are laid out (L, D)
    torch.manual_seed(0)
    ledger = Ledger(model.ledger_terms(x, samples=16))
    nll = -probs.log().gather(1, x.long().T).sum(0).double()  # -log P(x), (N,)
    gap = ledger.neg_elbo - nll
    assert_within(gap, 0.0, slack=0.005)
    recon = ledger.terms["reconstruction"]
    assert (recon >= 0).all() and recon.max() < 1e-6


def test_prior_term_is_negligible_for_the_standard_linear_schedule():
    x = (torch.rand(200, 784, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    prior = make_model(x, "binary").prior(2 * x - 1)
    assert (prior >= 0).all() and prior.max() < 0.02  # 784 dimensions: < 3e-5 nats each
    y = ring()
    assert make_model(y).prior(y).max() < 1e-3


# --- estimators --------------------------------------------------------------------------------


def test_antithetic_times_are_uniform_and_fill_every_stratum():
    torch.manual_seed(0)
    n, m = 8, 20_000
    u = antithetic_times(n, (m,))
    assert u.shape == (n, m) and ((u >= 0) & (u < 1)).all()
    strata = (u * n).floor().sort(0).values
    assert torch.equal(strata, torch.arange(n, dtype=u.dtype)[:, None].expand(n, m))
    grid = torch.arange(1, m + 1) / m
    for row in u:  # each draw is U[0, 1): Kolmogorov-Smirnov distance below its 0.1% critical value
        assert (row.sort().values - grid).abs().max() < 1.95 / math.sqrt(m)
    batch = antithetic_times(256, ())  # training: one time per example, stratified across the batch
    assert torch.equal((batch * 256).floor().sort().values, torch.arange(256, dtype=batch.dtype))


@pytest.mark.parametrize("simple", [False, True])
def test_ddpm_draws_steps_with_the_stated_probabilities(simple):
    model = make_model(torch.randn(10, 2), timesteps=20)
    torch.manual_seed(0)
    t, prob = model.draw_steps(torch.rand(200_000), simple)
    assert t.min() >= 2 and t.max() <= 20
    expected = torch.full((19,), 1 / 19) if simple else model.step_prob
    if not simple:  # uniform in log-SNR
        delta = model.gamma[2:] - model.gamma[1:-1]
        torch.testing.assert_close(expected, delta / delta.sum())
    torch.testing.assert_close(prob, expected[t - 2])
    frequency = torch.bincount(t - 2, minlength=19) / len(t)
    assert ((frequency - expected).abs() < 4 * (expected / len(t)).sqrt() + 1e-4).all()


@pytest.mark.parametrize("simple", [False, True])
def test_ddpm_diffusion_estimate_is_unbiased_for_the_sum_over_steps(simple):
    """With the optimal denoiser KL_t(x) is exact per draw (the control variate removes the
    noise draw), so the estimate can be compared with the sum over all steps tightly."""
    x = gaussian_data(50)
    model = with_optimal_denoiser(make_model(x, timesteps=40))
    exact = sum(model.step_loss(x, torch.full((len(x),), t))[0] for t in range(2, 41))
    torch.manual_seed(0)
    estimate, _ = model.diffusion_term(x, antithetic_times(4000, (len(x),)), simple)
    torch.testing.assert_close(estimate.mean(0), exact, rtol=0.01, atol=0.01)


def test_control_variate_keeps_the_mean_and_cuts_the_spread():
    x = ring(4)
    model = make_model(x, process="vdm", schedule="fixed")
    torch.manual_seed(0)
    with torch.no_grad():
        model.denoiser.out.weight.normal_(0, 0.1)
    for gamma in (-10.0, 0.0, 4.0):
        sq_err, sq_err_bound = model.noise_errors(x.expand(20_000, -1, -1), torch.full((20_000, 4), gamma))
        se = (sq_err.std(0) + sq_err_bound.std(0)) / math.sqrt(20_000)
        assert ((sq_err.mean(0) - sq_err_bound.mean(0)).abs() < 4 * se).all()
        if gamma < 0:
            assert (sq_err_bound.std(0) < 0.5 * sq_err.std(0)).all()


# --- the learned schedule ----------------------------------------------------------------------


def assert_monotone(schedule):
    t = torch.linspace(0, 1, 2001, requires_grad=True)
    shape, slope = schedule.shape(t)
    assert shape[0].abs() < 1e-6 and (shape[-1] - 1).abs() < 1e-6
    assert (shape.diff() > 0).all() and (slope > 0).all()
    (derivative,) = torch.autograd.grad(shape.sum(), t)
    torch.testing.assert_close(slope, derivative, rtol=1e-4, atol=1e-5)
    gamma_0, gamma_1 = schedule.endpoints()
    assert gamma_0 < gamma_1


def test_learned_schedule_is_monotone_with_the_right_slope_for_any_parameters():
    torch.manual_seed(0)
    for _ in range(5):
        schedule = LearnedGamma(-13.3, 5.0)
        with torch.no_grad():
            for parameter in schedule.parameters():
                parameter.add_(3 * torch.randn_like(parameter))
        assert_monotone(schedule)


def test_learned_schedule_stays_monotone_in_training_and_its_shape_gets_the_variance_gradient():
    """loss().backward() gives the schedule's endpoints and the network the gradient of the
    bound, and its shape that of the mean squared diffusion term (Kingma et al. sec. 5)."""
    x = ring(256)
    torch.manual_seed(0)
    model = make_model(x, process="vdm", schedule="learned")
    with torch.no_grad():
        model.denoiser.out.weight.normal_(0, 0.1)
    torch.manual_seed(1)
    objective, _ = model.loss(x, batch_index=0, num_batches=1)
    objective.backward()
    shape_params = [p for n, p in model.schedule.named_parameters() if n not in ("gamma_0", "raw_span")]
    bound_params = [model.schedule.gamma_0, model.schedule.raw_span, model.denoiser.out.weight]
    got = [p.grad.clone() for p in shape_params + bound_params]
    torch.manual_seed(1)  # the same draws, by hand
    u = antithetic_times(len(x), ())[None]
    shape, slope = model.schedule.shape(u)
    gamma_t, dgamma_t = model.gamma_of_shape(shape, slope)
    diffusion = 0.5 * dgamma_t * model.noise_errors(x, gamma_t)[1]
    expected = torch.autograd.grad(diffusion.pow(2).mean(), shape_params, retain_graph=True)
    bound = (model.prior(x) + diffusion[0] + model.reconstruction(x)).mean()
    expected += torch.autograd.grad(bound, bound_params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)

    seed_everything(0)
    train_for_epochs(model, (x,), (x[:64],), epochs=10, batch_size=64, lr=0.05)
    assert_monotone(model.schedule)


# --- the ledger and training -------------------------------------------------------------------


KINDS = {
    "continuous": (lambda: ring(), None),
    "binary": (lambda: (ring() > 0).float().repeat(1, 3), None),
    "discrete": (lambda: ring().mul(3).add(8).round().clamp(0, 16), 17),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_ledger_terms_are_finite_sum_to_neg_elbo_and_kls_are_nonnegative(variant, kind):
    make_x, levels = KINDS[kind]
    x = make_x()
    torch.manual_seed(0)
    model = make_model(x, kind, levels, **VARIANTS[variant])
    seed_everything(0)
    train_for_epochs(model, (x,), (x[:100],), epochs=2, batch_size=100, lr=3e-3)
    ledger = held_out_ledger(model, (x,), samples=4)
    assert set(ledger.terms) == {"prior", "diffusion", "reconstruction"}
    for value in ledger.terms.values():
        assert value.shape == (len(x),) and torch.isfinite(value).all()
    # the prior term against torch.distributions: KL(N(alpha_T y, sigma_T^2) || N(0, I)) at the last level
    gamma_last = model.endpoints()[1].double()
    alpha, sigma = torch.sigmoid(-gamma_last).sqrt(), torch.sigmoid(gamma_last).sqrt()
    y = model.to_model_units(x).double()
    prior = torch.distributions.kl_divergence(torch.distributions.Normal(alpha * y, sigma),
                                              torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(ledger.terms["prior"].double(), prior, rtol=1e-4, atol=1e-6)
    assert (ledger.terms["prior"] >= 0).all()
    diffusion = ledger.terms["diffusion"]
    if kind == "continuous":  # the control variate makes single estimates noisy around their KL
        assert diffusion.mean() > 0
    else:
        assert (diffusion >= 0).all() and (ledger.terms["reconstruction"] >= 0).all()
    samples = model.sample(50)
    assert samples.shape == (50, x.shape[1]) and torch.isfinite(samples).all()
    if kind != "continuous":
        assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() <= model.levels - 1


@pytest.mark.parametrize("variant", ["ddpm-linear", "vdm-learned"])
def test_training_lowers_the_held_out_bound_below_the_gaussian_fit(variant):
    """Two clusters at (+-1.5, 0): the untrained model is the Gaussian fit; 400 steps learn the
    clusters and gain over a nat (the true entropy is 2 nats below the Gaussian fit's). After
    150 steps the gain still ranged from 0.3 to 1.2 nats over data seeds: too early to test."""
    g = torch.Generator().manual_seed(0)
    side = 2 * (torch.rand(1200, generator=g) > 0.5).float() - 1
    x = torch.stack([1.5 * side, torch.zeros(1200)], 1) + 0.1 * torch.randn(1200, 2, generator=g)
    torch.manual_seed(0)
    model = make_model(x[:1000], hidden=[64, 64], **VARIANTS[variant])
    seed_everything(0)
    before = held_out_ledger(model, (x[1000:],), samples=16).means()["neg_elbo"]
    train_for_epochs(model, (x[:1000],), (x[1000:],), epochs=40, batch_size=100, lr=1e-2)
    seed_everything(0)
    after = held_out_ledger(model, (x[1000:],), samples=16).means()["neg_elbo"]
    assert after < before - 1.0


def test_training_objectives():
    """vlb is the mean of the ledger terms; simple is the mean squared noise error per dimension."""
    x = ring(64)
    for objective in ("vlb", "simple"):
        model = make_model(x, objective=objective)
        torch.manual_seed(0)
        value, terms = model.loss(x, batch_index=0, num_batches=1)
        if objective == "vlb":
            assert value.item() == pytest.approx(sum(terms.values()).mean().item(), rel=1e-6)
        else:  # a zero network on top of the base: the base's error, about 1 per dimension
            assert 0 < value.item() < 2


def test_samplers_walk_the_schedule_from_the_last_to_the_first_noise_level():
    x = ring(10)
    ddpm = make_model(x, timesteps=100, sample_steps=10)
    gammas = ddpm.sampling_gammas()
    assert len(gammas) == 11 and gammas[0] == ddpm.gamma[100] and gammas[-1] == ddpm.gamma[1]
    assert (gammas.diff() < 0).all()
    assert torch.equal(make_model(x, timesteps=100, sample_steps=500).sampling_gammas(), ddpm.gamma[1:].flip(0))
    vdm = make_model(x, process="vdm", schedule="fixed", sample_steps=10)
    torch.testing.assert_close(vdm.sampling_gammas(), torch.linspace(5.0, -13.3, 11))


def test_loss_curves_lie_on_their_fixed_grids_and_integrate_to_the_diffusion_term():
    x = gaussian_data(2000)
    ddpm = make_model(x)
    curve = ddpm.loss_curve(x[:100], 32)
    assert list(curve) == ["t", "log_snr", "loss"] and curve["t"][0] == 2 and curve["t"][-1] == 1000
    assert len(curve["t"]) == 32 and (curve["log_snr"].diff() < 0).all() and (curve["loss"] >= 0).all()
    vdm = with_optimal_denoiser(make_model(x, process="vdm", schedule="fixed"))
    torch.manual_seed(0)
    curve = vdm.loss_curve(x, 100)
    torch.testing.assert_close(curve["log_snr"], torch.linspace(-5.0, 13.3, 100))
    integral = torch.trapezoid(curve["loss"], curve["log_snr"]).item()
    diffusion = 0.5 * DIM * (math.log1p(S**2 * math.exp(13.3)) - math.log1p(S**2 * math.exp(-5.0)))
    assert integral == pytest.approx(diffusion, rel=0.01)


@pytest.mark.parametrize("change,message", [
    ({"process": "sde"}, "config key 'models.m.params.process': 'sde' is not one of"),
    ({"schedule": "fixed"}, "schedule of process 'ddpm'"),
    ({"timesteps": 1}, "config key 'models.m.params.timesteps': 1 is less than the minimum of 2"),
    ({"process": "vdm", "schedule": "learned", "objective": "simple"}, "objective must be 'vlb'"),
    ({"hidden": []}, "config key 'models.m.params.hidden': [] should be non-empty"),
    ({"time_embedding": 7}, "config key 'models.m.params.time_embedding': 7 is not a multiple of 2"),
    ({"gamma_min": 5.0}, "gamma_min must be < gamma_max"),
    ({"sample_steps": 0}, "config key 'models.m.params.sample_steps': 0 is less than the minimum of 1"),
])
def test_config_rejects_bad_values_naming_the_field(change, message):
    """Limits are declared on the Config's fields (checked by build_settings, naming the key);
    rules between fields are the Config's own (its __post_init__)."""
    with pytest.raises(ConfigError) as error:
        build_settings(Config, change, "models.m.params")
    assert message in str(error.value)


# --- one run end to end ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_diffusion_run_writes_its_ledger_curve_and_figures(repo, tmp_path, monkeypatch):
    from klbench.run import execute_run
    from klbench.tracking import init_store

    monkeypatch.chdir(tmp_path)
    raw = load_config([repo / "config" / "config.yaml"])
    raw["families"]["diffusion"] = {"params": {"hidden": [32, 32], "time_embedding": 16, "sample_steps": 20},
                                    "evaluate": {"curve_points": 8}}
    raw["models"]["vdm-learned"] = {"family": "diffusion", "params": {"process": "vdm", "schedule": "learned",
                                                                      "objective": "vlb"}}
    raw["datasets"]["checkerboard"] = {"options": {"n_train": 500, "n_test": 200}}
    raw["train"]["steps"] = 8
    run = resolve_run(validate_config(raw), "checkerboard", "vdm-learned", 0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_store(uri, ["diffusion"])
    ledger = execute_run(run, tmp_path / "out", progress=False, tracking_uri=uri)
    assert ledger == json.loads((tmp_path / "out" / "ledger.json").read_text())
    terms, derived = ledger["terms"], ledger["derived"]
    assert set(terms) == {"prior", "diffusion", "reconstruction"}
    diagnostics = ledger["diagnostics"]
    # continuous data: reconstruction is the decoder Gaussian's entropy, 0.5 D (log 2 pi e + gamma_first),
    # and gamma_first = -log_snr_max: two routes to one number
    expected = 0.5 * 2 * (math.log(2 * math.pi * math.e) - diagnostics["log_snr_max"])
    assert terms["reconstruction"] == pytest.approx(expected, rel=1e-5)
    assert derived["kl_total"] > 0
    with (tmp_path / "out" / "loss_curve.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and list(rows[0]) == ["log_snr", "loss"]
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 0
    assert (tmp_path / "out" / "samples.png").stat().st_size > 0
    assert diagnostics["log_snr_max"] > diagnostics["log_snr_min"] and diagnostics["diffusion_se"] > 0
