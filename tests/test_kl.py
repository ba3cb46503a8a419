"""Closed-form KLs against torch.distributions and Monte Carlo, on random parameters."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, Normal, kl_divergence

from klbench.kl import (
    kl_bernoulli,
    kl_categorical,
    kl_normal_normal,
    kl_normal_std_normal,
    log_discretized_normal,
    log_normal_diag,
    monte_carlo_kl,
)

BATCH_SHAPES = [(1,), (7,), (3, 5)]


def diag_normal(mu, logvar):
    return Independent(Normal(mu, (0.5 * logvar).exp()), 1)


@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_normal_vs_std_normal_matches_torch(batch):
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(*batch, 4, generator=g), torch.randn(*batch, 4, generator=g)
    expected = kl_divergence(diag_normal(mu, logvar), diag_normal(torch.zeros_like(mu), torch.zeros_like(mu)))
    got = kl_normal_std_normal(mu, logvar)
    assert got.shape == batch
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_normal_vs_normal_matches_torch(batch):
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(*batch, 6, generator=g) for _ in range(4)]
    expected = kl_divergence(diag_normal(args[0], args[1]), diag_normal(args[2], args[3]))
    torch.testing.assert_close(kl_normal_normal(*args), expected, rtol=1e-5, atol=1e-5)


def test_normal_vs_normal_of_itself_is_zero_and_reduces_to_std_normal():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(kl_normal_normal(mu, logvar, mu, logvar), torch.zeros(5), atol=1e-6, rtol=0)
    zeros = torch.zeros_like(mu)
    torch.testing.assert_close(kl_normal_normal(mu, logvar, zeros, zeros), kl_normal_std_normal(mu, logvar))


def test_normal_kl_against_monte_carlo():
    g = torch.Generator().manual_seed(2)
    mu_q, logvar_q = torch.randn(3, 2, generator=g), 0.5 * torch.randn(3, 2, generator=g)
    mu_p, logvar_p = torch.randn(3, 2, generator=g), 0.5 * torch.randn(3, 2, generator=g)
    n = 200_000
    eps = torch.randn(n, 3, 2, generator=g, dtype=torch.float64)
    mu_q, logvar_q, mu_p, logvar_p = (t.double() for t in (mu_q, logvar_q, mu_p, logvar_p))

    estimate = monte_carlo_kl(
        lambda s: mu_q + eps[:s] * (0.5 * logvar_q).exp(),
        lambda z: log_normal_diag(z, mu_q, logvar_q),
        lambda z: log_normal_diag(z, mu_p, logvar_p),
        n,
    )
    z = mu_q + eps * (0.5 * logvar_q).exp()
    log_ratio = log_normal_diag(z, mu_q, logvar_q) - log_normal_diag(z, mu_p, logvar_p)
    standard_error = log_ratio.std(0) / n**0.5
    exact = kl_normal_normal(mu_q, logvar_q, mu_p, logvar_p)
    assert ((estimate - exact).abs() < 4 * standard_error).all()


@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_bernoulli_matches_torch(batch):
    g = torch.Generator().manual_seed(3)
    logits_q, logits_p = 3 * torch.randn(*batch, 10, generator=g), 3 * torch.randn(*batch, 10, generator=g)
    expected = kl_divergence(Independent(Bernoulli(logits=logits_q), 1), Independent(Bernoulli(logits=logits_p), 1))
    torch.testing.assert_close(kl_bernoulli(logits_q, logits_p), expected, rtol=1e-4, atol=1e-5)


def test_bernoulli_saturated_logits_stay_finite_and_nonnegative():
    logits_q = torch.tensor([[40.0, -40.0, 0.0]])
    logits_p = torch.tensor([[-40.0, 40.0, 0.0]])
    kl = kl_bernoulli(logits_q, logits_p)
    assert torch.isfinite(kl).all() and (kl > 70).all()  # ~ 2 * 40 nats, not inf/nan


@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_categorical_matches_torch(batch):
    g = torch.Generator().manual_seed(4)
    logits_q, logits_p = 2 * torch.randn(*batch, 6, generator=g), 2 * torch.randn(*batch, 6, generator=g)
    expected = kl_divergence(Categorical(logits=logits_q), Categorical(logits=logits_p))
    torch.testing.assert_close(kl_categorical(logits_q, logits_p), expected, rtol=1e-5, atol=1e-6)


def test_categorical_zero_probability_in_q_contributes_nothing():
    logits_q = torch.tensor([[0.0, -float("inf"), 0.0]])
    logits_p = torch.tensor([[0.0, 0.0, 0.0]])
    torch.testing.assert_close(kl_categorical(logits_q, logits_p), torch.tensor([torch.log(torch.tensor(1.5)).item()]))


def test_categorical_is_infinite_where_p_has_no_mass_and_q_does():
    logits_q = torch.tensor([[0.0, 0.0]])
    logits_p = torch.tensor([[0.0, -float("inf")]])
    assert kl_categorical(logits_q, logits_p).item() == float("inf")


def test_all_kls_nonnegative_on_random_parameters():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        a, b, c, d = (3 * torch.randn(50, 4, generator=g) for _ in range(4))
        assert (kl_normal_normal(a, b, c, d) >= -1e-5).all()
        assert (kl_normal_std_normal(a, b) >= -1e-5).all()
        assert (kl_bernoulli(a, c) >= -1e-5).all()
        assert (kl_categorical(a, c) >= -1e-5).all()


def test_log_normal_diag_matches_torch():
    x, mu, logvar = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    expected = diag_normal(mu, logvar).log_prob(x)
    torch.testing.assert_close(log_normal_diag(x, mu, logvar), expected, rtol=1e-5, atol=1e-5)


def level_bins(levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin edges of `levels` values evenly spaced on [-1, 1], the outer bins open: (L, 1) each, float64."""
    centers, half = torch.linspace(-1, 1, levels, dtype=torch.float64), 1 / (levels - 1)
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    return torch.cat([-inf, centers[1:] - half])[:, None], torch.cat([centers[:-1] + half, inf])[:, None]


@pytest.mark.parametrize("mu,sd", [(0.3, 0.2), (-0.9, 0.05), (0.0, 3.0), (0.6, 0.001)])
def test_log_discretized_normal_matches_the_normal_cdf_and_sums_to_one(mu, sd):
    lower, upper = level_bins(5)
    mean, logvar = torch.full_like(lower, mu), torch.full_like(lower, 2 * math.log(sd))
    got = log_discretized_normal(lower, upper, mean, logvar)  # (L,): one bin per row
    normal = Normal(torch.tensor(mu, dtype=torch.float64), sd)
    expected = (normal.cdf(upper) - normal.cdf(lower)).log()[:, 0]
    finite = expected > -30  # the CDF difference itself underflows further out
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-6, atol=1e-9)
    assert torch.logsumexp(got, 0).abs() < 1e-9


def test_log_discretized_normal_stays_exact_in_the_far_tails_and_has_finite_gradients():
    """Bins 40 standard deviations away: 1 - Phi underflows, the mirrored lower tail does not."""
    lower, upper = torch.tensor([[1.0], [-float("inf")]]), torch.tensor([[1.5], [-1.0]])
    mu = torch.tensor([[-39.0], [39.0]], requires_grad=True)
    logvar = torch.zeros(2, 1, requires_grad=True)
    got = log_discretized_normal(lower, upper, mu, logvar)
    # log(Phi(-40) - Phi(-40.5)) (mirror of [1, 1.5] about the mean -39) and log Phi(-40)
    log_phi = torch.special.log_ndtr(torch.tensor([-40.0, -40.5], dtype=torch.float64))
    expected = torch.stack([log_phi[0] + torch.log1p(-torch.exp(log_phi[1] - log_phi[0])), log_phi[0]])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    got.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()
