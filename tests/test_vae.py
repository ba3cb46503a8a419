"""The VAE family: its ledger, bounds and diagnostics hold their identities, and the
linear-Gaussian VAE reaches the closed-form probabilistic-PCA maximum likelihood."""

import math

import pytest
import torch

from conftest import train_for_epochs
from klbench.data import load_dataset
from klbench.errors import TrainingError
from klbench.kl import log_normal_diag
from klbench.models.vae import VAE, Config, build, iwae_bounds, mutual_information
from klbench.train import held_out_ledger, seed_everything


def make_config(**changes) -> Config:
    values = dict(latent_dim=3, hidden=[16], beta=1.0, k=1, prior="standard", prior_components=4,
                  decoder_scale="diagonal")
    values.update(changes)
    return Config(**values)


def continuous_data(n=300, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    return z @ torch.randn(2, dim, generator=g) + 0.3 * torch.randn(n, dim, generator=g)


def trained(model, x, epochs=30):
    seed_everything(0)
    train_for_epochs(model, (x,), (x[:50],), epochs=epochs, batch_size=64, lr=3e-3)
    return model


KINDS = {
    "continuous": (lambda: continuous_data(), {}),
    "binary": (lambda: (continuous_data() > 0).float(), {}),
    "discrete": (lambda: continuous_data().mul(3).add(8).round().clamp(0, 16), {"levels": 17}),
}


@pytest.fixture(params=[("continuous", "standard"), ("binary", "mog"), ("discrete", "standard"), ("continuous", "mog")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model_and_data(request):
    kind, prior = request.param
    make_x, extra = KINDS[kind]
    x = make_x()
    torch.manual_seed(0)
    model = VAE(make_config(prior=prior), x.shape[1], kind, **extra)
    return trained(model, x, epochs=10), x


def test_training_loss_with_beta_one_is_the_ledger_total():
    x = continuous_data()
    torch.manual_seed(0)
    model = VAE(make_config(), x.shape[1], "continuous")
    torch.manual_seed(1)
    objective, terms = model.loss(x, batch_index=0, num_batches=1)
    assert objective.item() == pytest.approx((terms["rate"] + terms["distortion"]).mean().item(), rel=1e-6)


def test_the_k_sample_elbo_averages_k_single_sample_estimates_and_the_iwae_objective_is_below_it():
    """Burda et al.'s two k-sample objectives on the same draws: the k-sample ELBO is the mean
    of -log w_i, the IWAE objective -log mean_i w_i; by Jensen the IWAE objective is lower."""
    x = continuous_data()
    torch.manual_seed(0)
    elbo_model = VAE(make_config(k=5, objective="elbo", activation="tanh"), x.shape[1], "continuous")
    iwae_model = VAE(make_config(k=5, activation="tanh"), x.shape[1], "continuous")
    iwae_model.load_state_dict(elbo_model.state_dict())
    assert isinstance(elbo_model.encoder[1], torch.nn.Tanh)
    torch.manual_seed(1)
    elbo, _ = elbo_model.loss(x, batch_index=0, num_batches=1)
    torch.manual_seed(1)
    iwae, _ = iwae_model.loss(x, batch_index=0, num_batches=1)
    torch.manual_seed(1)  # the same 5 draws by hand: -mean_i log w_i over the batch
    y = elbo_model.observe(x)
    mu, logvar = elbo_model.encode(y)
    z = elbo_model.sample_posterior(mu, logvar, 5)
    log_w = elbo_model.log_prior(z) - log_normal_diag(z, mu, logvar) - elbo_model.distortion(y, z)
    # the objective uses the closed-form KL, whose mean over draws equals that of log e - log m
    assert elbo.item() == pytest.approx(-log_w.mean().item(), abs=0.05)
    assert iwae.item() == pytest.approx(-(torch.logsumexp(log_w, 0) - math.log(5)).mean().item(), rel=1e-5)
    assert iwae.item() < elbo.item()


def test_beta_weights_training_but_not_the_ledger():
    x = continuous_data()
    torch.manual_seed(0)
    model = VAE(make_config(beta=4.0), x.shape[1], "continuous")
    torch.manual_seed(1)
    objective, terms = model.loss(x, batch_index=0, num_batches=1)
    assert objective.item() == pytest.approx((4.0 * terms["rate"] + terms["distortion"]).mean().item(), rel=1e-6)


def test_ledger_terms_finite_and_rate_nonnegative(model_and_data):
    model, x = model_and_data
    ledger = held_out_ledger(model, (x,), samples=64)
    for value in ledger.terms.values():
        assert torch.isfinite(value).all()
    rate = ledger.terms["rate"]
    if model.config.prior == "standard":
        assert (rate >= 0).all()  # closed form
    else:
        assert rate.mean() > -3 * rate.std() / math.sqrt(len(rate))  # Monte Carlo: >= 0 up to noise


def test_standard_prior_rate_closed_form_matches_monte_carlo():
    x = continuous_data()
    torch.manual_seed(0)
    model = trained(VAE(make_config(), x.shape[1], "continuous"), x)
    mu, logvar = model.encode(x)
    z = model.sample_posterior(mu.detach(), logvar.detach(), 20_000).double()
    mc = (log_normal_diag(z, mu.double(), logvar.double()) - log_normal_diag(z, 0 * z, 0 * z)).mean(0)
    torch.testing.assert_close(model.rate(mu, logvar, z).double(), mc, atol=0.05, rtol=0.02)


def test_iwae_bound_is_monotone_in_k_and_above_the_elbo(model_and_data):
    model, x = model_and_data
    torch.manual_seed(3)
    bounds = iwae_bounds(model, x, (1, 8, 64, 512))
    # nested groups make the ordering exact per example (Jensen), not just in expectation
    assert (bounds[1] >= bounds[8] - 1e-9).all() and (bounds[8] >= bounds[64] - 1e-9).all()
    assert (bounds[64] >= bounds[512] - 1e-9).all()
    elbo_nll = held_out_ledger(model, (x,), samples=256).neg_elbo.double()
    # -L_1 is a Monte Carlo -ELBO: it matches the ledger within noise, and IWAE(512) <= ELBO
    assert bounds[1].mean().item() == pytest.approx(elbo_nll.mean().item(), abs=0.05 + 0.01 * abs(elbo_nll.mean().item()))
    assert bounds[512].mean().item() <= elbo_nll.mean().item() + 1e-3
    assert bounds[512].mean().item() < bounds[1].mean().item()


def test_mutual_information_estimate_on_trained_models(model_and_data):
    model, x = model_and_data
    torch.manual_seed(4)
    info = mutual_information(model, x)
    assert 0 <= info["mutual_info"] <= math.log(len(x)) + 1e-9
    # rate_mc is a Monte Carlo estimate of the ledger's rate (closed form for the standard prior)
    rate = held_out_ledger(model, (x,), samples=256).terms["rate"]
    assert info["rate_mc"] == pytest.approx(rate.mean().item(), abs=4 * rate.std().item() / math.sqrt(len(x)) + 0.05)
    assert 0 <= info["active_units"] <= model.config.latent_dim


def _encoder_output(model: VAE, mu: torch.Tensor, logvar: torch.Tensor) -> None:
    """Make the encoder return (mu[n], logvar) for example n of the test data: its last layer
    reads a one-hot code of the example that the other layers pass through."""
    head = model.encoder[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.cat([torch.zeros(mu.shape[1]), logvar]))
    model.encoder_means = mu  # read by the forward hook below
    head.register_forward_hook(lambda module, args, out: out + torch.cat(
        [model.encoder_means[: out.shape[0]], torch.zeros_like(model.encoder_means[: out.shape[0]])], -1))


def test_mutual_information_is_zero_when_every_posterior_is_the_same():
    """e(z|x) = N(m, s^2) for every x: Z carries no information about X, so I(X;Z) = 0 and the
    whole rate is the marginal KL, KL(N(m, s^2) || N(0, I)) in closed form."""
    x = continuous_data(n=400)
    model = VAE(make_config(latent_dim=3), x.shape[1], "continuous")
    m, logvar = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([-1.0, 0.0, 0.5])
    _encoder_output(model, m.expand(len(x), 3), logvar)
    torch.manual_seed(0)
    info = mutual_information(model, x)
    closed_form = 0.5 * (m.pow(2) + logvar.exp() - 1 - logvar).sum().item()
    assert info["mutual_info"] == pytest.approx(0.0, abs=1e-9)
    assert info["marginal_kl"] == pytest.approx(closed_form, abs=0.15)  # Monte Carlo over 400 draws
    assert info["active_units"] == 0


def test_mutual_information_reaches_log_n_when_posteriors_do_not_overlap():
    """Posteriors with means 10 apart and std 0.01: each z names its example, so the estimate
    of I is log N, and the marginal KL is what the rate adds beyond it."""
    x = continuous_data(n=200)
    model = VAE(make_config(latent_dim=1), x.shape[1], "continuous")
    mu = 10.0 * torch.arange(len(x), dtype=torch.float32)[:, None]
    _encoder_output(model, mu, torch.tensor([2 * math.log(0.01)]))
    torch.manual_seed(0)
    info = mutual_information(model, x)
    assert info["mutual_info"] == pytest.approx(math.log(len(x)), abs=1e-6)
    assert info["active_units"] == 1


def test_discrete_distortion_includes_the_dequantization_term():
    x = continuous_data().mul(3).add(8).round().clamp(0, 16)
    torch.manual_seed(0)
    model = VAE(make_config(), x.shape[1], "discrete", levels=17)
    y = model.observe(x)
    assert ((y >= 0) & (y < 1)).all() and torch.equal((y * 17).floor(), x)
    z = torch.zeros(1, len(x), 3)
    out = model.decoder(z)
    density_in_y = log_normal_diag(y, out, (2 * model.likelihood.log_scale).expand_as(out))
    torch.testing.assert_close(model.distortion(y, z), -(density_in_y - x.shape[1] * math.log(17)))


def test_an_amortized_decoder_std_is_the_normal_density_of_the_decoders_own_mean_and_scale():
    """decoder_scale: amortized: the decoder outputs [mean, log std] per dimension (Kingma &
    Welling 2014's Gaussian MLP decoder); the distortion is torch.distributions.Normal's -log p,
    and the same for discrete data after dequantization, plus D log L."""
    x = continuous_data()
    torch.manual_seed(0)
    model = VAE(make_config(decoder_scale="amortized"), x.shape[1], "continuous")
    assert model.decoder[-1].out_features == 2 * x.shape[1] and not hasattr(model.likelihood, "log_scale")
    z = torch.randn(2, len(x), 3)
    mean, log_std = model.decoder(z).chunk(2, dim=-1)
    expected = -torch.distributions.Normal(mean, log_std.exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(model.distortion(x, z), expected)
    levels = 17
    counts = x.mul(3).add(8).round().clamp(0, levels - 1)
    discrete = VAE(make_config(decoder_scale="amortized"), x.shape[1], "discrete", levels=levels)
    y = discrete.observe(counts)
    mean, log_std = discrete.decoder(z).chunk(2, dim=-1)
    expected = -torch.distributions.Normal(mean, log_std.exp()).log_prob(y).sum(-1) + x.shape[1] * math.log(levels)
    torch.testing.assert_close(discrete.distortion(y, z), expected)
    draws = model.sample(20_000)  # x ~ d(x|z) m(z): the decoder's own std in the draws
    assert draws.shape == (20_000, x.shape[1]) and torch.isfinite(draws).all()


@pytest.mark.parametrize("scale", ["diagonal", "isotropic", "amortized"])
@pytest.mark.parametrize("name", ["digits", "checkerboard"])
def test_the_decoder_std_starts_at_the_data_std_of_the_observed_variable(name, scale):
    """build() starts the decoder at the training data's std, per dimension of what it models:
    x itself, or y = (x + u) / L with Var y = (Var x + 1/12) / L^2 for L-level data (never 0, even
    on digits' constant border pixels)."""
    dataset = load_dataset(name)
    std = dataset.x_train.std(0)
    if dataset.kind == "discrete":
        std = ((std**2 + 1 / 12) / dataset.levels**2).sqrt()
        y = (dataset.x_train + torch.rand_like(dataset.x_train)) / dataset.levels
        torch.testing.assert_close(y.std(0), std, atol=2e-3, rtol=0.05)  # the formula: sampled
    expected = {"diagonal": std.log(), "isotropic": std.pow(2).mean().sqrt().log().reshape(1),
                "amortized": std.log()}[scale]
    model = build(make_config(decoder_scale=scale), dataset)
    last = model.decoder[-1]
    start = last.bias[dataset.dim:] if scale == "amortized" else model.likelihood.log_scale
    torch.testing.assert_close(start.detach(), expected)
    if scale == "diagonal":  # an output layer at the data mean is then the diagonal Gaussian fit
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(model.likelihood.observe(dataset.x_train).mean(0))
        h = model.decoder(torch.zeros(1, model.decoder[0].in_features))
        fit = 0.5 * (2 * math.pi * math.e * std**2).log().sum()
        if dataset.kind == "discrete":
            fit = fit + dataset.dim * math.log(dataset.levels)
        observed = model.likelihood.observe(dataset.x_train)
        nll = model.likelihood.nll(observed, h.expand_as(observed)).mean().item()
        assert nll == pytest.approx(fit.item(), rel=0.02)


def test_non_finite_loss_stops_training_with_a_clear_error():
    x = continuous_data()
    x[5, 0] = float("nan")
    model = VAE(make_config(), x.shape[1], "continuous")
    with pytest.raises(TrainingError, match=r"NaN/inf by step \d+ \(seed 0\)"):
        train_for_epochs(model, (x,), (x,), epochs=2, batch_size=64, lr=1e-3)


def test_training_lowers_the_held_out_bound():
    x = continuous_data(n=600)
    torch.manual_seed(0)
    model = VAE(make_config(), x.shape[1], "continuous")
    before = held_out_ledger(model, (x[500:],), samples=16).means()["neg_elbo"]
    seed_everything(0)
    history, selection = train_for_epochs(model, (x[:500],), (x[500:],), epochs=20, batch_size=64, lr=3e-3,
                                          evaluations=4)
    after = held_out_ledger(model, (x[500:],), samples=16).means()["neg_elbo"]
    assert after < before - 1.0
    # 20 passes of 8 batches: 160 steps, evaluated 4 times evenly; the kept step is one of them
    assert [row["step"] for row in history if row["split"] == "val"] == [40, 80, 120, 160]
    assert selection.best_step in (40, 80, 120, 160)
    for row in history:
        assert row["neg_elbo"] == pytest.approx(row["rate"] + row["distortion"])


@pytest.mark.slow
def test_linear_vae_reaches_the_ppca_maximum_likelihood():
    """Data from a probabilistic-PCA model (Tipping & Bishop 1999). Its maximum
    log-likelihood per example is closed form: with eigenvalues l_1 >= ... >= l_D of the
    sample covariance and sigma^2 = mean(l_{q+1..D}),
        max (1/N) log p(X) = -0.5 (D log 2 pi + sum_{i<=q} log l_i + (D - q) log sigma^2 + D).
    A linear VAE with an isotropic Gaussian decoder has pPCA's marginal likelihood, and at
    its optimum the posterior is exact, so the ELBO reaches that maximum (Lucas et al. 2019)."""
    g = torch.Generator().manual_seed(0)
    n, dim, q = 2000, 5, 2
    w_true = torch.randn(dim, q, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0], dtype=torch.float64)
    x64 = torch.randn(n, q, generator=g, dtype=torch.float64) @ w_true.T + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64) + 1.0
    centered = x64 - x64.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centered.T @ centered / n).flip(0)
    sigma2 = eigenvalues[q:].mean()
    max_loglik = -0.5 * (dim * math.log(2 * math.pi) + eigenvalues[:q].log().sum() + (dim - q) * sigma2.log() + dim)

    x = x64.float()
    torch.manual_seed(0)
    model = VAE(make_config(latent_dim=q, hidden=[], decoder_scale="isotropic"), dim, "continuous")
    train_for_epochs(model, (x,), (x,), epochs=3000, batch_size=n, lr=1e-2)
    torch.manual_seed(1)
    elbo = -held_out_ledger(model, (x,), samples=512).means()["neg_elbo"]
    assert elbo <= max_loglik.item() + 0.01  # the ELBO cannot beat the maximum likelihood
    assert elbo == pytest.approx(max_loglik.item(), abs=0.02)


def test_the_kl_warmup_raises_the_rates_weight_from_0_to_beta():
    """loss(progress) minimises distortion + beta min(1, progress / kl_warmup) rate (IWAE: that
    weight on log m(z) - log e(z|x) in every log w_i); model selection always sees the full beta."""
    x = continuous_data()
    for k in (1, 4):
        torch.manual_seed(0)
        model = VAE(make_config(beta=2.0, k=k, kl_warmup=0.5), x.shape[1], "continuous")
        assert [model.rate_weight(p) for p in (0.0, 0.125, 0.5, 1.0)] == [0.0, 0.5, 2.0, 2.0]
        for progress, weight in ((0.0, 0.0), (0.125, 0.5), (0.75, 2.0)):
            torch.manual_seed(1)
            loss, terms = model.loss(x, batch_index=0, num_batches=1, progress=progress)
            torch.manual_seed(1)
            y = model.observe(x)
            mu, logvar = model.encode(y)
            z = model.sample_posterior(mu, logvar, k)
            distortions = model.distortion(y, z)  # (k, B)
            if k == 1:  # the closed-form rate
                expected = distortions[0] + weight * model.rate(mu, logvar, z)
            else:
                log_w = weight * (model.log_prior(z) - log_normal_diag(z, mu, logvar)) - distortions
                expected = -(torch.logsumexp(log_w, 0) - math.log(k))
            torch.testing.assert_close(loss, expected.mean())
            torch.testing.assert_close(terms["rate"], model.rate(mu, logvar, z[:1]))  # the ledger: unweighted
        assert model.own_objective == ("-L_4 (beta 2)" if k > 1 else "distortion + 2 rate")
        torch.manual_seed(2)
        selected = model.own_objective_terms(x, samples=1)["objective"]
        torch.manual_seed(2)
        torch.testing.assert_close(selected, model.objective(x, 2.0)[0])


@pytest.mark.slow
@pytest.mark.parametrize("kl_warmup, collapses", [(0.0, True), (0.2, False)])
def test_without_a_kl_warmup_an_iwae_with_its_own_decoder_std_collapses_on_eight_gaussians(kl_warmup, collapses):
    """The default benchmark's eight_gaussians IWAE (k = 5, a decoder std that is a function of z,
    batch 512, lr 0.003) reached rate 0 by step 120 in all three seeds: the decoder alone is the
    single-Gaussian fit, and IWAE's gradient gives the encoder nothing to start from. A warm-up of
    the rate's weight keeps the latent in use, and the bound falls well below that fit."""
    from klbench.batches import FreshDraws, data_generator
    from klbench.config import TrainConfig
    from klbench.evaluate import gaussian_fit_nll
    from klbench.seeds import OneSeed
    from klbench.train import fit

    dataset = load_dataset("eight_gaussians", n_test=500, n_val=500)
    seed_everything(0)
    model = build(make_config(latent_dim=8, hidden=[128, 128], k=5, decoder_scale="amortized",
                              kl_warmup=kl_warmup), dataset)
    group = OneSeed(model, 0)
    config = TrainConfig(steps=1500, batch_size=512, lr=3e-3, warmup=0.025, evaluations=5)
    fit(group, FreshDraws(group, dataset.sampler, 512, False, [data_generator(0)], torch.device("cpu")),
        (dataset.x_val,), config, progress=False)
    rate = held_out_ledger(model, (dataset.x_test,), samples=4).means()["rate"]
    nll = iwae_bounds(model, dataset.x_test, (64,))[64].mean().item()  # -L_64
    gaussian_fit = gaussian_fit_nll(dataset.x_train, dataset.x_test)
    if collapses:
        assert rate < 0.05 and nll > gaussian_fit - 0.05
    else:
        assert rate > 0.5 and nll < gaussian_fit - 0.3
