"""The semi-supervised VAE M2 (models/m2.py): its ledger against explicit sums and known
answers, its labelled subset, its config limits, and one short real training run."""

import math
from dataclasses import replace

import pytest
import torch

from klbench.data import load_dataset
from klbench.errors import ConfigError
from klbench.models import m2
from klbench.models.family import samples_run_figure
from klbench.settings import build_settings

SMALL = m2.Config(latent_dim=3, hidden=[16], classifier_hidden=[12], labels=20)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small_model(dataset, config=SMALL, seed=0, double=True):
    torch.manual_seed(seed)
    model = m2.build(config, dataset)
    return model.double() if double else model


def per_class_neg_elbo(model, x_obs, eps):
    """-L(x, k) for every class by an explicit loop over k with labelled_terms: (K, B) each term."""
    rows = [model.labelled_terms(x_obs, torch.full((len(x_obs),), k), eps[k]) for k in range(model.classes)]
    return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}


def test_unlabelled_terms_are_the_explicit_sum_over_classes(digits):
    """-U(x) = sum_k q(k|x) (-L(x, k)) - H(q(y|x)) with the same noise, term by term (eq. 7)."""
    model = small_model(digits)
    torch.manual_seed(1)
    x = digits.x_train[:40].double()
    x_obs = model.likelihood.observe(x)
    eps = torch.randn(model.classes, len(x), SMALL.latent_dim, dtype=torch.float64)
    log_q = model.log_predictive(x)
    q = log_q.exp()
    terms = model.unlabelled_terms(x_obs, eps, log_q)
    per_class = per_class_neg_elbo(model, x_obs, eps)
    neg_l = sum(per_class.values())  # (K, B)
    entropy = -(q * log_q).sum(-1)
    expected = sum(q[:, k] * neg_l[k] for k in range(model.classes)) - entropy
    torch.testing.assert_close(sum(terms.values()), expected, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(terms["rate"], (q.T * per_class["rate"]).sum(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms["distortion"], (q.T * per_class["distortion"]).sum(0), rtol=1e-10, atol=1e-9)
    kl_to_uniform = (q * (log_q + math.log(model.classes))).sum(-1)
    torch.testing.assert_close(terms["label_rate"], kl_to_uniform, rtol=1e-10, atol=1e-10)
    # several draws per class: the distortion is the mean of the per-draw distortions
    eps_s = torch.randn(model.classes, 3, len(x), SMALL.latent_dim, dtype=torch.float64)
    averaged = model.unlabelled_terms(x_obs, eps_s, log_q)
    one_each = [model.unlabelled_terms(x_obs, eps_s[:, s], log_q) for s in range(3)]
    torch.testing.assert_close(averaged["distortion"], sum(t["distortion"] for t in one_each) / 3)
    torch.testing.assert_close(averaged["rate"], one_each[0]["rate"])


def test_exact_posterior_over_y_makes_the_bound_a_logsumexp(digits):
    """-U(x) >= -logsumexp_k L(x, k) for any q(y|x), with equality at q = softmax_k L(x, k)."""
    # pure: random per-class terms
    generator = torch.Generator().manual_seed(0)
    K, B = 10, 50
    rate = torch.rand(K, B, generator=generator, dtype=torch.float64) * 5
    distortion = torch.rand(K, B, generator=generator, dtype=torch.float64) * 50
    neg_l = rate + distortion + math.log(K)
    bound = -torch.logsumexp(-neg_l, 0)
    for _ in range(5):
        log_q = torch.log_softmax(3 * torch.randn(B, K, generator=generator, dtype=torch.float64), -1)
        assert (sum(m2.combine_classes(log_q, rate, distortion).values()) >= bound - 1e-12).all()
    posterior = torch.log_softmax(-neg_l.T, -1)
    torch.testing.assert_close(sum(m2.combine_classes(posterior, rate, distortion).values()), bound,
                               rtol=0, atol=1e-5)
    # the model's own per-class terms, its own q(y|x) and the exact posterior
    model = small_model(digits)
    torch.manual_seed(2)
    x = digits.x_test[:30].double()
    x_obs = model.likelihood.observe(x)
    eps = torch.randn(model.classes, len(x), SMALL.latent_dim, dtype=torch.float64)
    neg_l = sum(per_class_neg_elbo(model, x_obs, eps).values())  # (K, B)
    bound = -torch.logsumexp(-neg_l, 0)
    own = sum(model.unlabelled_terms(x_obs, eps, model.log_predictive(x)).values())
    assert (own >= bound - 1e-9).all()
    assert (own - bound).max() > 1e-3  # an untrained q(y|x) is not the posterior
    exact = sum(model.unlabelled_terms(x_obs, eps, torch.log_softmax(-neg_l.T, -1)).values())
    torch.testing.assert_close(exact, bound, rtol=0, atol=1e-5)


def test_labelled_terms(digits):
    """label_rate = log K, rate = KL of the encoder's Normal to N(0, I) (torch.distributions),
    distortion = the dequantized Gaussian NLL at z = mu + sigma eps, plus D log L."""
    model = small_model(digits)
    torch.manual_seed(3)
    x, y = digits.x_train[:25].double(), digits.y_train[:25]
    x_obs = model.likelihood.observe(x)
    eps = torch.randn(len(x), SMALL.latent_dim, dtype=torch.float64)
    terms = model.labelled_terms(x_obs, y, eps)
    torch.testing.assert_close(terms["label_rate"], torch.full((25,), math.log(10), dtype=torch.float64))
    onehot = torch.nn.functional.one_hot(y, 10).double()
    mu, logvar = model.encode(x_obs, onehot)
    q_z = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    expected_rate = torch.distributions.kl_divergence(q_z, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(terms["rate"], expected_rate)
    out = model.decoder(torch.cat([mu + eps * (0.5 * logvar).exp(), onehot], -1))
    decoder = torch.distributions.Normal(out, model.likelihood.log_scale.exp())
    expected_distortion = -decoder.log_prob(x_obs).sum(-1) + digits.dim * math.log(digits.levels)
    torch.testing.assert_close(terms["distortion"], expected_distortion)


def test_binary_distortion_is_bernoulli(digits):
    """On binary data the distortion is -log Bernoulli(x; sigmoid(decoder)) summed over pixels."""
    x = (digits.x_train[:20] > 8).float()
    data = replace(digits, kind="binary", levels=None, x_train=(digits.x_train > 8).float(),
                   x_test=(digits.x_test > 8).float())
    model = small_model(data)
    eps = torch.randn(20, SMALL.latent_dim, dtype=torch.float64)
    y = data.y_train[:20]
    terms = model.labelled_terms(x.double(), y, eps)
    onehot = torch.nn.functional.one_hot(y, 10).double()
    mu, logvar = model.encode(x.double(), onehot)
    out = model.decoder(torch.cat([mu + eps * (0.5 * logvar).exp(), onehot], -1))
    expected = -torch.distributions.Bernoulli(logits=out).log_prob(x.double()).sum(-1)
    torch.testing.assert_close(terms["distortion"], expected)


def test_inputs_label_a_balanced_fixed_subset(digits):
    for labels in (100, 25):
        config = replace(SMALL, labels=labels)
        chosen = []
        for seed in (0, 123):
            torch.manual_seed(seed)
            x, y = m2.inputs(digits, "train", config)
            assert x is digits.x_train and len(y) == len(digits.y_train)
            kept = y != -1
            assert kept.sum() == labels
            assert torch.equal(y[kept], digits.y_train[kept])  # labels kept are the true ones
            counts = torch.bincount(y[kept], minlength=10)
            assert counts.tolist() == [labels // 10 + (k < labels % 10) for k in range(10)]
            chosen.append(kept)
        assert torch.equal(chosen[0], chosen[1])  # the global seed changes nothing
    other = m2.inputs(digits, "train", replace(SMALL, labels=100, label_seed=1))[1] != -1
    assert not torch.equal(other, chosen[0]) and other.sum() == 100
    assert digits.y_train.min() >= 0  # the dataset's own labels are untouched
    x, y = m2.inputs(digits, "test", SMALL)
    assert torch.equal(y, digits.y_test) and (y >= 0).all()
    with pytest.raises(ValueError, match="labels"):
        m2.inputs(digits, "train", replace(SMALL, labels=len(digits.y_train) + 1))
    with pytest.raises(ValueError, match="class"):  # 10 * 137 + 1 needs 138 of class 8, which has 136
        m2.inputs(digits, "train", replace(SMALL, labels=1371))
    with pytest.raises(ValueError):
        m2.build(replace(SMALL, labels=1371), digits)


def test_build_needs_class_targets():
    with pytest.raises(ValueError, match="class"):
        m2.build(SMALL, load_dataset("toy_curve"))


def test_classification_term_changes_the_objective_not_the_ledger(digits):
    x, y = m2.inputs(digits, "train", SMALL)
    # a batch with labelled and unlabelled rows
    rows = torch.cat([torch.nonzero(y != -1).flatten()[:6], torch.nonzero(y == -1).flatten()[:26]])
    x, y = x[rows].double(), y[rows]
    results = {}
    for alpha in (0.1, 2.0):
        model = small_model(digits, replace(SMALL, alpha=alpha))
        torch.manual_seed(5)
        results[alpha] = model.loss(x, y, 0, 1)
    (objective_a, terms_a), (objective_b, terms_b) = results[0.1], results[2.0]
    for name in ("rate", "label_rate", "distortion"):
        torch.testing.assert_close(terms_a[name], terms_b[name], rtol=0, atol=0)
    log_q = model.log_predictive(x)
    cross_entropy = -log_q[y != -1].gather(-1, y[y != -1, None]).sum() / len(x)
    weight = len(digits.x_train) / SMALL.labels
    neg_elbo = sum(terms_a.values()).mean()
    torch.testing.assert_close(objective_a, neg_elbo + 0.1 * weight * cross_entropy)
    torch.testing.assert_close(objective_b - objective_a, (2.0 - 0.1) * weight * cross_entropy)
    # the ledger rows are the labelled terms for labelled rows and the unlabelled ones for the rest
    assert torch.allclose(terms_a["label_rate"][:6], torch.tensor(math.log(10), dtype=torch.float64))
    assert (terms_a["label_rate"][6:] < math.log(10)).all()


def test_terms_finite_and_kls_nonnegative(digits):
    model = small_model(digits, double=False)
    x, y = m2.inputs(digits, "train", SMALL)
    _, train_terms = model.loss(x[:200], y[:200], 0, 1)
    ledger = model.ledger_terms(digits.x_test, digits.y_test, 4)
    for terms in (train_terms, ledger):
        assert set(terms) == set(m2.FAMILY.terms)
        for value in terms.values():
            assert value.shape == (len(next(iter(terms.values()))),) and torch.isfinite(value).all()
        assert (terms["rate"] >= 0).all() and (terms["label_rate"] >= -1e-6).all()
    # ledger_terms ignores y: every held-out example counts as unlabelled
    torch.manual_seed(7)
    a = model.ledger_terms(digits.x_test[:50], digits.y_test[:50], 2)
    torch.manual_seed(7)
    b = model.ledger_terms(digits.x_test[:50], torch.full((50,), -1), 2)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert (a["label_rate"] < math.log(10)).all()
    # predictive and samples
    log_q = model.log_predictive(digits.x_test)
    assert log_q.shape == (len(digits.x_test), 10)
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(len(digits.x_test)))
    assert torch.equal(log_q, model.log_predictive(digits.x_test))  # deterministic
    samples = model.sample(13)
    assert samples.shape == (13, digits.dim) and samples.min() >= 0 and samples.max() <= digits.levels - 1


def test_ledger_in_chunks_is_the_same_ledger(digits, monkeypatch):
    """Chunking the held-out examples changes only which noise each draws: on binary data (no
    dequantization) the closed-form rate and the label_rate are the same to the last bit."""
    data = replace(digits, kind="binary", levels=None, x_train=(digits.x_train > 8).float(),
                   x_test=(digits.x_test > 8).float())
    model = small_model(data, double=False)
    whole = model.ledger_terms(data.x_test[:50], data.y_test[:50], 3)
    monkeypatch.setattr(m2, "LEDGER_ROWS", 7 * 10 * 3)  # chunks of 7 examples
    chunked = model.ledger_terms(data.x_test[:50], data.y_test[:50], 3)
    for name in ("rate", "label_rate"):
        torch.testing.assert_close(chunked[name], whole[name])
    assert chunked["distortion"].shape == (50,)
    assert (chunked["distortion"] - whole["distortion"]).abs().max() < 0.05 * whole["distortion"].abs().max()


@pytest.mark.parametrize("key, value", [
    ("latent_dim", 0), ("hidden", [16, 0]), ("classifier_hidden", [0]), ("labels", 0), ("label_seed", -1),
    ("alpha", 0.0), ("decoder_scale", "full"), ("latent", 4),
])
def test_config_limits_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        build_settings(m2.Config, {key: value}, "models.m2.params")


def test_config_defaults():
    config = build_settings(m2.Config, {}, "models.m2.params")
    assert config == m2.Config()
    assert (config.latent_dim, config.hidden, config.classifier_hidden, config.labels, config.label_seed,
            config.alpha, config.decoder_scale) == (16, [256, 256], [256], 100, 0, 0.1, "diagonal")
    assert build_settings(m2.Config, {"classifier_hidden": []}, "models.m2.params").classifier_hidden == []


@pytest.mark.slow
def test_training_on_digits_with_100_labels(digits, tmp_path):
    # alpha as the benchmark sets it for a decoder that starts at the data's std (m2.build)
    config = m2.Config(latent_dim=8, hidden=[128], classifier_hidden=[128], labels=100, alpha=1.0)
    torch.manual_seed(0)
    model = m2.build(config, digits)

    def held_out_bound():
        torch.manual_seed(123)
        return sum(model.ledger_terms(*m2.FAMILY.inputs(digits, "test", config), 4).values()).mean().item()

    initial = held_out_bound()
    x, y = m2.FAMILY.inputs(digits, "train", config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = 0
    while steps < 400:
        batches = torch.randperm(len(x)).split(128)
        for i, rows in enumerate(batches):
            objective, terms = model.loss(x[rows], y[rows], i, len(batches))
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            steps += 1
    final = held_out_bound()
    values = m2.diagnose(model, digits, None, m2.FAMILY.evaluate(), tmp_path).values
    print(f"M2 digits: -U(x) {initial:.1f} -> {final:.1f} nats, accuracy {values['accuracy']:.3f}, "
          f"test_log_lik {values['test_log_lik']:.3f}, ece {values['ece']:.3f}")
    assert final < initial - 20
    # a density model of the 17 grey levels: better than the uniform one (a decoder whose std
    # started at 1 stayed above it, at rate 0)
    assert final < digits.dim * math.log(17) - 20
    assert values["accuracy"] > 0.6
    assert values["labels"] == 100
    assert set(m2.FAMILY.headline) <= set(values)
    assert (tmp_path / "reliability.csv").exists()
    samples_run_figure(model, digits, tmp_path, "t")
    assert (tmp_path / "samples.png").exists() and (tmp_path / "samples.npz").exists()
