"""Bayes by Backprop: the KLs of both priors, the local reparameterization trick, the minibatch
KL weights, the ledger identities, calibration, and real runs through execute_run."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import train_for_epochs
import yaml
from torch.distributions import Normal, kl_divergence

from klbench.calibration import expected_calibration_error, reliability_bins
from klbench.classifier import ClassifierEvalConfig
from klbench.config import load_config, merge_into, resolve_run, run_grid, validate_config
from klbench.data import DATASETS, PROFILES, load_dataset
from klbench.errors import ConfigError
from klbench.models import bbb, get_family
from klbench.models.bbb import BayesLinear, Config, GaussianPrior, MixturePrior, kl_weight
from klbench.settings import build_settings
from klbench.train import held_out_ledger, seed_everything

BBB_BLOCKS = yaml.safe_load("""
families:
  bbb:
    params: {hidden: [16], inference: bbb, prior: gaussian, prior_sigma: 1.0, mixture_pi: 0.5, mixture_sigma1: 1.0,
             mixture_sigma2: 0.0025, local_reparam: false, kl_weighting: uniform, init_rho: -3.0}
models:
  bbb-gauss: {family: bbb}
  bbb-mixture-lrt: {family: bbb, params: {prior: mixture, local_reparam: true, kl_weighting: blundell}}
  map: {family: bbb, params: {inference: map}}
datasets:
  toy_curve: {options: {n_train: 128, n_test: 64}}
""")


@pytest.fixture(autouse=True)
def _one_thread():
    """Networks this small train fastest on one thread (as the pipeline runs them); more threads
    only contend for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(**changes) -> Config:
    values = dict(BBB_BLOCKS["families"]["bbb"]["params"])
    values.update(changes)
    return Config(**values)


def random_layer(n_in=3, n_out=2, seed=0) -> BayesLinear:
    torch.manual_seed(seed)
    layer = BayesLinear(n_in, n_out, init_rho=0.0)
    with torch.no_grad():
        layer.mu.normal_()
        layer.rho.normal_(-1.0, 1.0)
    return layer


# --- priors and their KLs ------------------------------------------------------------------------


def test_gaussian_prior_kl_matches_torch_distributions():
    layer = random_layer(4, 3)
    prior = GaussianPrior(make_config(prior_sigma=0.7))
    sigma = torch.nn.functional.softplus(layer.rho)
    expected = kl_divergence(Normal(layer.mu, sigma), Normal(0.0, 0.7)).sum()
    torch.testing.assert_close(prior.kl(layer, samples=1), expected, rtol=1e-5, atol=1e-5)


def test_gaussian_prior_log_prob_matches_torch_distributions():
    w = torch.randn(5, 8)
    expected = Normal(0.0, 0.3).log_prob(w).sum(-1)
    torch.testing.assert_close(GaussianPrior(make_config(prior_sigma=0.3)).log_prob(w), expected)


def test_mixture_prior_log_prob_is_the_weighted_sum_of_its_components():
    w = torch.randn(4, 6, dtype=torch.float64)
    prior = MixturePrior(make_config(mixture_pi=0.25, mixture_sigma1=1.5, mixture_sigma2=0.01))
    density = 0.25 * Normal(0.0, 1.5).log_prob(w).exp() + 0.75 * Normal(0.0, 0.01).log_prob(w).exp()
    torch.testing.assert_close(prior.log_prob(w), density.log().sum(-1))


def mixture_kl_by_quadrature(mu: torch.Tensor, sigma: torch.Tensor, prior: MixturePrior) -> float:
    """sum_j int q_j(w) (log q_j(w) - log p(w)) dw by the trapezoid rule, float64, over mu_j +- 10 sigma_j."""
    total = 0.0
    t = torch.linspace(-10, 10, 100_001, dtype=torch.float64)
    for m, s in zip(mu.double(), sigma.double()):
        w = m + s * t
        log_q = Normal(m, s).log_prob(w)
        integrand = log_q.exp() * (log_q - prior.log_prob(w[:, None]))
        total += torch.trapezoid(integrand, w).item()
    return total


def test_mixture_prior_monte_carlo_kl_converges_to_the_integrated_value():
    layer = BayesLinear(2, 2, init_rho=0.0)  # 6 parameters, set to cover narrow and wide posteriors
    with torch.no_grad():
        layer.mu.copy_(torch.tensor([0.0, 0.003, 0.5, -1.0, 0.05, 2.0]))
        sigma = torch.tensor([0.001, 0.01, 0.1, 0.5, 1.0, 0.02])
        layer.rho.copy_(sigma.expm1().log())  # softplus^-1
    prior = MixturePrior(make_config(mixture_pi=0.5, mixture_sigma1=1.0, mixture_sigma2=math.exp(-6)))
    exact = mixture_kl_by_quadrature(layer.mu.detach(), torch.nn.functional.softplus(layer.rho).detach(), prior)
    errors = []
    for samples in (1_000, 100_000):
        torch.manual_seed(samples)
        estimate = prior.kl(layer, samples).item()
        w = layer.sample(samples).detach()
        standard_error = (layer.log_q(w) - prior.log_prob(w)).std().item() / math.sqrt(samples)
        assert abs(estimate - exact) < 4 * standard_error, (samples, estimate, exact, standard_error)
        errors.append(standard_error)
    assert errors[1] < errors[0] / 5  # the estimate tightens like 1/sqrt(S)


# --- sampling -----------------------------------------------------------------------------------


def test_local_reparameterization_matches_weight_sampling_in_mean_and_variance():
    layer = random_layer(3, 2)
    a = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    samples = 40_000
    weight_mu, bias_mu = layer.split(layer.mu.detach())
    weight_var, bias_var = layer.split(torch.nn.functional.softplus(layer.rho.detach()).pow(2))
    gamma = a @ weight_mu.T + bias_mu  # the closed-form pre-activation mean and variance, (B, n_out)
    delta = a.pow(2) @ weight_var.T + bias_var
    torch.manual_seed(2)
    with torch.no_grad():
        draws = {mode: layer(a.expand(samples, *a.shape), local_reparam=mode) for mode in (False, True)}
    for b in draws.values():
        torch.testing.assert_close(b.mean(0), gamma, atol=(5 * (delta / samples).sqrt()).max().item(), rtol=0)
        torch.testing.assert_close(b.var(0), delta, rtol=5 * math.sqrt(2 / samples), atol=0)


# --- the objective and the ledger ---------------------------------------------------------------


def test_blundell_weights_sum_to_one_over_an_epoch_and_follow_eq_9():
    for m in (1, 2, 7, 60, 3000):
        total = sum(kl_weight("blundell", i, m, batch_size=32, n_train=32 * m) for i in range(m))
        assert total == pytest.approx(1.0, abs=1e-12)
    expected = [2 ** (5 - i) / (2**5 - 1) for i in range(1, 6)]
    assert [kl_weight("blundell", i, 5, 32, 160) for i in range(5)] == pytest.approx(expected, rel=1e-12)


def test_uniform_weights_sum_to_one_over_an_epoch_with_a_short_last_batch():
    batches = torch.arange(1000).split(128)
    total = sum(kl_weight("uniform", i, len(batches), len(rows), 1000) for i, rows in enumerate(batches))
    assert total == pytest.approx(1.0, abs=1e-12)


@pytest.fixture(scope="module")
def toy():
    return load_dataset("toy_curve", n_train=256, n_test=128)


def test_full_batch_uniform_objective_is_the_ledger_total(toy):
    model = bbb.build(make_config(), toy)
    torch.manual_seed(0)
    objective, terms = model.loss(toy.x_train, toy.y_train, batch_index=0, num_batches=1)
    assert objective.item() == pytest.approx((terms["complexity"] + terms["nll"]).mean().item(), rel=1e-6)
    kl = sum(GaussianPrior(model.config).kl(layer, 1) for layer in model.layers)
    torch.testing.assert_close(terms["complexity"], (kl / len(toy.x_train)).expand(len(toy.x_train)))


def test_ledger_terms_are_unweighted_and_match_an_independent_computation(toy):
    model = bbb.build(make_config(kl_weighting="blundell"), toy)
    torch.manual_seed(5)
    ledger = held_out_ledger(model, (toy.x_test, toy.y_test), samples=8)
    means = ledger.means()
    torch.manual_seed(5)  # the same 8 weight draws, scored by torch.distributions
    with torch.no_grad():
        f = model(toy.x_test, 8)[..., 0]  # (S, N)
        nll = -torch.distributions.Normal(f, model.log_noise.exp()).log_prob(toy.y_test).mean(0)
    torch.testing.assert_close(ledger.terms["nll"], nll, rtol=1e-5, atol=1e-6)
    kl = sum(GaussianPrior(model.config).kl(layer, 1) for layer in model.layers).item()
    assert means["complexity"] == pytest.approx(kl / len(toy.x_train), rel=1e-6)
    assert torch.isfinite(ledger.neg_elbo).all() and means["complexity"] > 0


def test_map_has_zero_complexity_and_trains_with_weight_decay(toy):
    model = bbb.build(make_config(inference="map", prior_sigma=0.5), toy)
    assert all(layer.rho is None for layer in model.layers)
    objective, terms = model.loss(toy.x_train, toy.y_train, batch_index=0, num_batches=1)
    assert (terms["complexity"] == 0).all()
    penalty = model.layer_costs(1).sum() / len(toy.x_train)  # -log p(w) / N_train
    assert objective.item() == pytest.approx(terms["nll"].mean().item() + penalty.item(), rel=1e-6)
    penalty.backward()
    for layer in model.layers:  # d/dw [|w|^2 / (2 sigma^2 N)] = w / (sigma^2 N): weight decay
        torch.testing.assert_close(layer.mu.grad, layer.mu.detach() / (0.5**2 * len(toy.x_train)))
    assert model(toy.x_test, samples=16).shape == (1, len(toy.x_test), 1)  # a point estimate: one draw


@pytest.mark.parametrize("field, value, message", [
    ("prior", "laplace", "prior': 'laplace' is not one of"),
    ("inference", "hmc", "inference': 'hmc' is not one of"),
    ("mixture_pi", 1.0, "mixture_pi': 1.0 is greater than or equal to the maximum of 1"),
    ("prior_sigma", 0.0, "prior_sigma': 0.0 is less than or equal to the minimum of 0"),
    ("kl_weighting", "linear", "kl_weighting': 'linear' is not one of"),
    ("hidden", [8, 0], r"hidden\.1': 0 is less than the minimum of 1"),
    ("local_reparam", "yes", "local_reparam': 'yes' is not of type 'boolean'"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    """The limits live in the Config's fields; build_settings checks them, naming the key."""
    with pytest.raises(ConfigError, match=f"config key 'models.m.params.{message}"):
        build_settings(Config, {field: value}, "models.m.params")


def test_config_rejects_local_reparameterization_of_a_point_estimate():
    with pytest.raises(ConfigError, match="local_reparam must be false for inference 'map'"):
        build_settings(Config, {"inference": "map", "local_reparam": True}, "models.m.params")


# --- calibration ----------------------------------------------------------------------------------


def two_class_probs(confidences: list[float], correct: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (N, 2) predicting class 0 with the given confidence, labels right or wrong."""
    c = torch.tensor(confidences, dtype=torch.float64)
    labels = torch.tensor([0 if ok else 1 for ok in correct])
    return torch.stack([c, 1 - c], dim=1), labels


def test_ece_on_constructed_bins_has_the_known_value():
    # bin near 0.9: 4 predictions, 3 right (acc 0.75); bin near 0.6: 6 predictions, all right (acc 1)
    probs, labels = two_class_probs([0.9] * 4 + [0.6] * 6, [True, True, True, False] + [True] * 6)
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.4 * 0.15 + 0.6 * 0.4, abs=1e-12)
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(0.9 - (0.4 * 0.9 + 0.6 * 0.6)),
                                                                              abs=1e-12)


def test_ece_of_calibrated_predictions_is_zero_and_bins_are_closed_above():
    probs, labels = two_class_probs([0.7] * 10 + [0.9] * 10, [True] * 7 + [False] * 3 + [True] * 9 + [False])
    assert expected_calibration_error(probs, labels, bins=15) == pytest.approx(0.0, abs=1e-12)
    bins = reliability_bins(*two_class_probs([0.5, 1.0, 0.75], [True] * 3), bins=2)
    assert bins.count.tolist() == [1, 2]  # 0.5 falls in (0, 0.5], 0.75 and 1.0 in (0.5, 1]
    assert torch.isnan(reliability_bins(*two_class_probs([0.95], [True]), bins=4).accuracy[:3]).all()


# --- a trained model and whole runs ---------------------------------------------------------------


def test_the_predictive_band_widens_outside_the_training_range(toy, tmp_path):
    seed_everything(0)
    model = bbb.build(make_config(hidden=[32, 32]), toy)
    train_for_epochs(model, (toy.x_train, toy.y_train), (toy.x_test, toy.y_test), epochs=60, batch_size=64, lr=0.01)
    with torch.no_grad():
        sd_in = model(toy.x_test, 64)[..., 0].std(0)
        sd_out = model(toy.x_ood, 64)[..., 0].std(0)
    assert sd_out.mean() > 3 * sd_in.mean(), (sd_out.mean().item(), sd_in.mean().item())
    values = bbb.diagnose(model, toy, None, ClassifierEvalConfig(samples=16, ece_bins=15), tmp_path).values
    assert values["entropy_ood"] > values["entropy_in"] and values["ood_log_lik"] < values["test_log_lik"]
    bbb.run_figure(model, toy, tmp_path, "title")
    assert (tmp_path / "samples.png").stat().st_size > 10_000


def bbb_config(repo, run):
    config = load_config([repo / "config" / "config.yaml"])
    merge_into(config, BBB_BLOCKS)
    config["run"] = run
    return validate_config(config)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow store for the runs below: creating a SQLite store (its migrations) takes seconds."""
    from klbench.tracking import init_store

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    init_store(uri, ["bbb"])
    return uri


@pytest.mark.slow
@pytest.mark.parametrize("dataset, model", [("toy_curve", "bbb-gauss"), ("digits", "bbb-mixture-lrt"),
                                            ("diabetes", "map")])
def test_a_bbb_run_writes_a_ledger_that_sums_and_its_predictive_plot(repo, tmp_path, monkeypatch, tracking_uri,
                                                                     dataset, model):
    from klbench.run import execute_run

    monkeypatch.chdir(tmp_path)
    config = bbb_config(repo, [{"datasets": [dataset], "models": [model]}])
    run = resolve_run(config, dataset, model, 0)
    run = replace(run, train=replace(run.train, steps=16, batch_size=128, lr=0.01),
                  evaluate=replace(run.evaluate, samples=4))
    ledger = execute_run(run, tmp_path / "run", progress=False, tracking_uri=tracking_uri)
    assert json.loads((tmp_path / "run" / "ledger.json").read_text()) == ledger
    terms, diagnostics = ledger["terms"], ledger["diagnostics"]
    assert set(terms) == {"complexity", "nll"}
    assert ledger["derived"]["neg_elbo"] == pytest.approx(terms["complexity"] + terms["nll"], abs=1e-9)
    assert (tmp_path / "run" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isfinite(diagnostics["test_log_lik"]) and "bpd" not in ledger["derived"]
    if model == "map":
        assert terms["complexity"] == 0.0 and "map_penalty_per_layer" in diagnostics
        y_std = load_dataset("diabetes").split["y_std"]
        assert diagnostics["rmse_original"] == pytest.approx(diagnostics["rmse"] * y_std)
    else:
        per_layer = sum(diagnostics["complexity_per_layer"].values())
        assert per_layer == pytest.approx(terms["complexity"], rel=0.05 if "mixture" in model else 1e-6)
    if dataset == "digits":
        assert 0 <= diagnostics["ece"] <= 1 and diagnostics["ece_bins"] == run.evaluate.ece_bins
        assert (tmp_path / "run" / "reliability.csv").exists()


def test_the_grid_schedules_bbb_on_labelled_data_only(repo, monkeypatch):
    family = get_family("bbb")
    assert family.supports("continuous", "real") and family.supports("discrete", "class")
    assert not family.supports("continuous", None)
    monkeypatch.setitem(DATASETS, "unlabelled", DATASETS["checkerboard"])
    monkeypatch.setitem(PROFILES, "unlabelled", ("continuous", None))
    config = bbb_config(repo, [{"datasets": ["toy_curve", "digits", "unlabelled"], "models": ["bbb-gauss", "map"]},
                               {"datasets": ["unlabelled"], "models": ["vae"]}])
    config["seeds"] = [0]
    grid = run_grid(config)
    assert grid == [("toy_curve", "bbb-gauss", 0), ("toy_curve", "map", 0), ("digits", "bbb-gauss", 0),
                    ("digits", "map", 0), ("unlabelled", "vae", 0)]
