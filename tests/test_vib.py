"""Deep variational information bottleneck: the closed-form rate against torch and Monte Carlo,
the distortion against an explicit loop over draws, the unweighted ledger, Jensen's inequality
for the predictive, the typed settings, the input coordinates, and a short real training run on
digits through the family's diagnostics and run figure."""

import math
from dataclasses import replace

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.nn import functional as F

from klbench.classifier import RELIABILITY_FILE, ClassifierEvalConfig, reliability_run_figure
from klbench.data import load_dataset
from klbench.data.dataset import Dataset
from klbench.errors import ConfigError
from klbench.ledger import Ledger
from klbench.models.vib import FAMILY, VIB, Config, build, diagnose
from klbench.settings import build_settings

WHERE = "models.vib.params"


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def small_model(dataset: Dataset, seed: int = 0, **changes) -> VIB:
    """An untrained bottleneck whose encoder head is scaled up, so that mu and log sigma^2 vary
    well away from 0 and the rate is not close to zero (a check near 0 would prove little)."""
    torch.manual_seed(seed)
    model = build(replace(Config(latent_dim=4, hidden=[32]), **changes), dataset)
    with torch.no_grad():
        model.encoder[-1].weight.mul_(10.0)
    return model


def batch(dataset: Dataset, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.x_test[:n], dataset.y_test[:n]


def synthetic(kind: str, y_train=None, y_test=None, n: int = 200, dim: int = 3) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    if kind == "continuous":
        scale, shift = torch.tensor([3.0, 0.5, 10.0]), torch.tensor([5.0, -2.0, 0.0])
        x = torch.randn(2 * n, dim, generator=generator) * scale + shift
    else:
        x = (torch.rand(2 * n, dim, generator=generator) > 0.5).float()
    if y_train is None:
        labels = torch.randint(0, 3, (2 * n,), generator=generator)
        y_train, y_test = labels[:n], labels[n:]
    return Dataset(name=f"synthetic_{kind}", kind=kind, x_train=x[:n], x_test=x[n:], shape=(dim,), split={},
                   data_hash="0", y_train=y_train, y_test=y_test)


# --- rate ----------------------------------------------------------------------------------------


def test_rate_is_zero_and_known_for_fixed_encoder_outputs(digits):
    """With the encoder head's weights zeroed, e(z|x) is the same for every x: mu = 0, log
    sigma^2 = 0 gives rate 0 exactly; mu = 1, sigma^2 = 4 gives 0.5 (1 + 4 - 1 - log 4) per dim."""
    model = small_model(digits)
    x, y = batch(digits)
    head, latent = model.encoder[-1], model.config.latent_dim
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    assert torch.equal(model.ledger_terms(x, y, 1)["rate"], torch.zeros(len(x)))
    with torch.no_grad():
        head.bias.copy_(torch.cat([torch.ones(latent), torch.full((latent,), math.log(4.0))]))
    expected = latent * 0.5 * (4.0 - math.log(4.0))
    torch.testing.assert_close(model.ledger_terms(x, y, 1)["rate"], torch.full((len(x),), expected))


def test_rate_matches_torch_kl_divergence_and_monte_carlo(digits):
    model = small_model(digits)
    x, y = batch(digits)
    rate = model.ledger_terms(x, y, 1)["rate"]
    _, train_terms = model.loss(x, y, 0, 1)
    mu, logvar = (t.detach().double() for t in model.encode(x))
    assert rate.mean() > 1.0  # far enough from 0 to test anything
    e, m = Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))

    closed_form = kl_divergence(e, m).sum(-1)  # (B,)
    torch.testing.assert_close(rate.double(), closed_form, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(train_terms["rate"], rate)

    # KL = E_e[log e(z|x) - log m(z)]: 20,000 draws per example, within 5 standard errors
    torch.manual_seed(1)
    z = e.sample((20_000,))  # (S, B, L)
    log_ratio = e.log_prob(z).sum(-1) - m.log_prob(z).sum(-1)  # (S, B)
    estimate, standard_error = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(len(z))
    assert torch.all((estimate - rate.double()).abs() < 5 * standard_error), (estimate - rate.double()) / standard_error


# --- distortion and the objective ----------------------------------------------------------------


def explicit_distortion(model: VIB, x, y, eps) -> torch.Tensor:
    """-(1/S) sum_s log softmax(g(z_s))[y], z_s = mu + sigma * eps_s, one draw at a time."""
    mu, logvar = model.encode(x)
    per_draw = []
    for eps_s in eps:  # (B, L)
        z = mu + torch.exp(0.5 * logvar) * eps_s
        per_draw.append(F.cross_entropy(model.classifier(z), y, reduction="none"))
    return torch.stack(per_draw).mean(0).detach()


def test_distortion_is_the_cross_entropy_averaged_over_draws(digits):
    model = small_model(digits, train_samples=3)
    x, y = batch(digits)
    samples, latent = 5, model.config.latent_dim

    torch.manual_seed(2)
    terms = model.ledger_terms(x, y, samples)
    torch.manual_seed(2)
    eps = torch.randn(samples, len(x), latent)
    torch.testing.assert_close(terms["distortion"], explicit_distortion(model, x, y, eps))
    one_draw = explicit_distortion(model, x, y, eps[:1])
    assert not torch.allclose(terms["distortion"], one_draw)  # the S draws are averaged, not one

    # training draws train_samples of them; the objective is mean(distortion + beta * rate)
    torch.manual_seed(3)
    objective, train_terms = model.loss(x, y, 0, 1)
    torch.manual_seed(3)
    eps = torch.randn(3, len(x), latent)
    torch.testing.assert_close(train_terms["distortion"], explicit_distortion(model, x, y, eps))
    expected = (train_terms["distortion"] + model.config.beta * train_terms["rate"]).mean()
    torch.testing.assert_close(objective.detach(), expected)
    assert objective.requires_grad and not any(t.requires_grad for t in train_terms.values())
    assert set(train_terms) == set(terms) == set(FAMILY.terms)
    assert all(t.shape == (len(x),) for t in (*terms.values(), *train_terms.values()))


def test_beta_weights_the_objective_but_not_the_ledger(digits):
    low = small_model(digits, beta=1e-3)
    high = build(replace(low.config, beta=0.5), digits)
    high.load_state_dict(low.state_dict())
    x, y = batch(digits)
    results = []
    for model in (low, high):
        torch.manual_seed(4)
        results.append(model.loss(x, y, 0, 1))
    (objective_low, terms_low), (objective_high, terms_high) = results
    for name in FAMILY.terms:
        assert torch.equal(terms_low[name], terms_high[name])
    torch.testing.assert_close(objective_high - objective_low, (0.5 - 1e-3) * terms_low["rate"].mean())
    assert objective_high > objective_low + 0.1


def test_selection_and_convergence_judge_distortion_plus_beta_rate(digits):
    """A VIB trains on distortion + beta rate, so its checkpoint is chosen on that: with the same
    draws, own_objective_terms is exactly the ledger's distortion + beta rate, and the loop keeps
    the evaluation where it is least, which the unweighted rate + distortion does not pick."""
    from klbench.config import TrainConfig
    from klbench.train import fit_model

    model = small_model(digits, beta=1e-3)
    assert model.own_objective == "distortion + 0.001 rate"
    assert build(Config(beta=1.0), digits).own_objective is None  # the ledger's sum is what it trains
    x, y = batch(digits)
    torch.manual_seed(2)
    objective = model.own_objective_terms(x, y, samples=3)["objective"]
    torch.manual_seed(2)
    terms = model.ledger_terms(x, y, samples=3)
    torch.testing.assert_close(objective, terms["distortion"] + 1e-3 * terms["rate"], rtol=0, atol=0)

    train, val = (digits.x_train[:1000], digits.y_train[:1000]), (digits.x_train[1000:1300], digits.y_train[1000:1300])
    config = TrainConfig(steps=300, batch_size=100, lr=3e-3, warmup=0, schedule="constant", evaluations=10,
                         validation_samples=2)
    torch.manual_seed(0)
    history, selection = fit_model(small_model(digits, beta=1e-3), train, val, config)
    curve = [row for row in history if row["split"] == "val"]
    assert selection.selected_on == "distortion + 0.001 rate"
    assert selection.best_step == min(curve, key=lambda row: row["objective"])["step"]
    # the rate grows as the classifier learns: the least rate + distortion is another checkpoint
    assert selection.best_step != min(curve, key=lambda row: row["neg_elbo"])["step"]


# --- the predictive distribution -----------------------------------------------------------------


def test_predictive_log_lik_is_jensen_bounded_by_distortion(digits):
    model = small_model(digits)
    x, y = batch(digits)
    for samples in (1, 8):
        torch.manual_seed(5)
        log_predictive = model.log_predictive(x, samples)
        torch.manual_seed(5)
        terms = model.ledger_terms(x, y, samples)
        assert log_predictive.shape == (len(x), 10) and log_predictive.dtype == torch.float64
        normalizer = log_predictive.logsumexp(-1)  # log sum_k p(k|x) = 0, up to float32 log-softmax rounding
        torch.testing.assert_close(normalizer, torch.zeros_like(normalizer), rtol=0, atol=1e-6)
        neg_log_lik = -log_predictive.gather(-1, y[:, None]).squeeze(-1)
        distortion = terms["distortion"].double()
        if samples == 1:  # one draw: log of a mean of one is the mean of its log
            torch.testing.assert_close(neg_log_lik, distortion, rtol=1e-5, atol=1e-5)
        else:
            assert torch.all(neg_log_lik <= distortion + 1e-6)
            assert torch.any(neg_log_lik < distortion - 1e-3)  # strict where the draws disagree
    assert torch.all(terms["rate"] >= 0)


# --- settings, inputs and the declaration --------------------------------------------------------


def test_config_defaults_and_limits():
    assert build_settings(Config, {}, WHERE) == Config(latent_dim=32, hidden=[256, 256], classifier_hidden=[],
                                                       beta=1e-3, train_samples=1)
    for values, key in (({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta"), ({"latent_dim": 0}, "latent_dim"),
                        ({"hidden": [64, 0]}, "hidden"), ({"classifier_hidden": [0]}, "classifier_hidden"),
                        ({"train_samples": 0}, "train_samples"), ({"latent_dim": 2.5}, "latent_dim"),
                        ({"bta": 1.0}, "bta")):
        with pytest.raises(ConfigError, match=f"{WHERE}.*{key}"):
            build_settings(Config, values, WHERE)
    assert build_settings(Config, {"beta": 1e-6, "latent_dim": 1}, WHERE).beta == 1e-6


def test_build_inputs_and_shapes(digits):
    # digits: discrete 0..16, divided by L - 1 = 16; ten classes
    model = build(Config(latent_dim=3, hidden=[8], classifier_hidden=[5]), digits)
    torch.testing.assert_close(model.standardize(digits.x_train), digits.x_train / 16)
    assert model.encoder[-1].out_features == 6 and model.classifier[-1].out_features == 10
    assert model.classifier[0].out_features == 5  # classifier_hidden makes an MLP
    assert not any("input_" in name for name in model.state_dict())  # rebuilt by build, not saved

    continuous = build(Config(latent_dim=2, hidden=[8]), synthetic("continuous"))
    h = continuous.standardize(synthetic("continuous").x_train)
    torch.testing.assert_close(h.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.std(0), torch.ones(3))
    assert continuous.classifier[-1].out_features == 3 and len(continuous.classifier) == 1  # linear by default

    binary = synthetic("binary")
    binary_model = build(Config(latent_dim=2, hidden=[8]), binary)
    torch.testing.assert_close(binary_model.standardize(binary.x_test), binary.x_test)

    for y_train, y_test in ((None, None), (torch.zeros(200), torch.zeros(200))):  # no targets; real targets
        dataset = replace(synthetic("continuous"), y_train=y_train, y_test=y_test)
        with pytest.raises(ValueError, match="class targets"):
            build(Config(), dataset)


def test_family_declaration():
    assert FAMILY.name == "vib" and FAMILY.config is Config and FAMILY.evaluate is ClassifierEvalConfig
    assert FAMILY.supports("discrete", "class") and FAMILY.supports("binary", "class")
    assert not FAMILY.supports("continuous", "real") and not FAMILY.supports("continuous", None)
    assert [r.metric for r in FAMILY.ranks_for("class")] == ["test_log_lik"] and not FAMILY.density
    assert FAMILY.figures[0].options["sweep"] == "beta"


# --- a real run ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_trained_bottleneck_classifies_digits(digits, tmp_path):
    torch.manual_seed(0)
    model = build(Config(latent_dim=8, hidden=[64]), digits)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    steps, size, n = 300, 128, len(digits.x_train)
    for step in range(steps):
        rows = torch.randint(0, n, (size,), generator=generator)
        objective, _ = model.loss(digits.x_train[rows], digits.y_train[rows], 0, 1)
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()

    ledger = Ledger(model.ledger_terms(digits.x_test, digits.y_test, 16))
    means = ledger.means()
    assert all(math.isfinite(v) for v in means.values()) and means["rate"] > 0
    diagnostics = diagnose(model, digits, ledger, ClassifierEvalConfig(samples=16), tmp_path)
    values = diagnostics.values
    assert values["accuracy"] > 0.85, values
    assert -values["test_log_lik"] <= means["distortion"] + 0.05  # Jensen, up to the draws' noise
    assert 1 <= values["active_units"] <= 8
    assert 0 <= values["ece"] <= 1 and values["entropy_ood"] > values["entropy_in"]
    assert (tmp_path / RELIABILITY_FILE).is_file()
    reliability_run_figure(model, digits, tmp_path, "digits: " + model.describe())
    assert (tmp_path / "samples.png").stat().st_size > 0
    print(f"accuracy {values['accuracy']:.3f}, test_log_lik {values['test_log_lik']:.3f}, "
          f"rate {means['rate']:.2f}, distortion {means['distortion']:.3f}, active {values['active_units']}")
