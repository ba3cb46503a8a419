"""Bayes by Backprop as a KL ledger (Blundell et al. 2015, "Weight Uncertainty in Neural Networks").

P (what we have) = p(x, y) q(w);  Q (what we want) = p(w) prod_n p(y_n | x_n, w).
Per training example, the negative ELBO of the N_train examples splits into

    complexity = KL(q(w) || p(w)) / N_train      nats per example (the network's KL, shared by N_train examples)
    nll        = -E_{q(w)} log p(y | x, w)       nats per example

Posterior: mean-field Gaussian q(w) = prod_j N(w_j; mu_j, sigma_j^2) over every weight and
bias, sigma_j = softplus(rho_j) = log(1 + exp(rho_j)) (sec. 3.2), positive for any rho.
Priors (fixed, not learned):
- gaussian: p(w) = prod_j N(w_j; 0, prior_sigma^2); the KL in closed form (kl.kl_normal_normal).
- mixture: p(w) = prod_j [pi N(w_j; 0, sigma1^2) + (1 - pi) N(w_j; 0, sigma2^2)] (eq. 7); no
  closed form, so KL = E_q[log q(w) - log p(w)] by Monte Carlo (kl.monte_carlo_kl): unbiased,
  and it can come out < 0 by noise.
Sampling the network f(x, w):
- weight sampling: w = mu + sigma * eps, eps ~ N(0, I), one draw shared by the minibatch (sec. 3.2).
- local reparameterization (Kingma, Salimans & Welling 2015, sec. 2.3): for a layer b = a W^T + c
  with inputs a (B, in), each pre-activation is Gaussian, b ~ N(gamma, delta) with
  gamma = a mu_W^T + mu_c and delta = a^2 (sigma_W^2)^T + sigma_c^2, so b = gamma + sqrt(delta) * eps
  with eps drawn per example and unit. Per example this is exactly the distribution of f(x, w)
  under q (layers have independent weights); gradients have lower variance.
Likelihoods:
- real targets: p(y | x, w) = N(y; f(x, w), s^2), one learned noise scale s = exp(log_noise)
  (homoscedastic). s is a point estimate (type-II maximum likelihood): no prior, not in the KL.
- class labels: Categorical(softmax f(x, w)).
Inputs: continuous x is standardized with the training split's mean and standard deviation
(a fixed change of coordinates; the likelihood is of y, so no term changes); discrete x
(integers 0..L-1) is divided by L - 1, to [0, 1]; binary x is used as is.

Training objective. With an epoch of M minibatches B_1..B_M, Blundell's minibatch cost (eq. 8) is
    F_i = pi_i KL(q || p) - sum_{n in B_i} E_q log p(y_n | x_n, w),   sum_i pi_i = 1,
so sum_i F_i = KL - sum_n E_q log p(y_n | x_n, w) = N_train * (complexity + mean nll) is the
whole negative ELBO every epoch. A step minimises F_i / |B_i| = pi_i KL / |B_i| + mean_{B_i} nll
(per example, so learning rates compare with the other families), with one weight draw and
the KL estimated as the prior requires. kl_weighting:
- uniform:  pi_i = |B_i| / N_train, i.e. the step objective is KL / N_train + mean nll.
- blundell: pi_i = 2^(M-i) / (2^M - 1), i = 1..M (eq. 9): the first minibatches of an epoch
  carry most of the KL, the last almost none.
The ledger always reports the unweighted complexity KL / N_train.

inference "map" is the deterministic baseline of the same architecture, prior and likelihood:
a point estimate w = mu (no rho) trained on the same objective with -log p(w) in place of the
KL, i.e. maximum a posteriori. For the gaussian prior that is weight decay: the per-example
objective adds |w|^2 / (2 prior_sigma^2 N_train). A point mass has infinite KL to any density,
so MAP has no finite ELBO: its ledger complexity is 0 and its neg_elbo is the plug-in
nll -log p(y | x, w_MAP), not a bound on anything. Compare MAP and BBB on the test
log-likelihood, accuracy/RMSE and calibration, not on neg_elbo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from klbench.classifier import ClassifierEvalConfig, classifier_diagnostics, reliability_run_figure
from klbench.kl import kl_normal_normal, log_normal_diag, monte_carlo_kl
from klbench.models.family import Diagnostics, Family, Rank
from klbench.models.inputs import input_scaling
from klbench.plots import predicted_vs_true_figure, predictive_band_figure
from klbench.settings import setting

if TYPE_CHECKING:
    from klbench.data import Dataset
    from klbench.ledger import Ledger

# The predictive band: a grid over x and enough whole-network draws for a smooth mean and sd.
BAND_GRID_POINTS, BAND_SAMPLES = 300, 200


@dataclass(frozen=True)
class Config:
    """Hyperparameters of one variant."""

    hidden: list[int] = setting([32, 32], "Hidden widths of the MLP, ReLU between layers ([] = linear model).",
                                items={"minimum": 1})
    inference: Literal["bbb", "map"] = setting(
        "bbb", "bbb: mean-field Gaussian q(w) by Bayes by Backprop; map: a point estimate under the same prior "
        "and likelihood (deterministic baseline; ledger complexity 0, neg_elbo = plug-in nll).")
    prior: Literal["gaussian", "mixture"] = setting(
        "gaussian", "p(w): N(0, prior_sigma^2) with closed-form KL, or the scale mixture "
        "pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2) with Monte Carlo KL.")
    prior_sigma: float = setting(1.0, "Standard deviation of the gaussian prior.", exclusiveMinimum=0)
    mixture_pi: float = setting(0.5, "Weight pi of the sigma1 component of the mixture prior.",
                                exclusiveMinimum=0, exclusiveMaximum=1)
    mixture_sigma1: float = setting(1.0, "Standard deviation of the first (wide) mixture component.",
                                    exclusiveMinimum=0)
    mixture_sigma2: float = setting(0.0025, "Standard deviation of the second (narrow) mixture component.",
                                    exclusiveMinimum=0)
    local_reparam: bool = setting(False, "Sample pre-activations per example (local reparameterization trick) "
                                  "instead of one weight draw per minibatch; bbb only.")
    kl_weighting: Literal["uniform", "blundell"] = setting(
        "uniform", "Share pi_i of the KL that minibatch i of M carries in training: uniform |B_i| / N_train, or "
        "blundell 2^(M-i) / (2^M - 1). The ledger is unweighted.")
    init_rho: float = setting(-3.0, "Initial rho of every weight and bias; sigma = softplus(rho) (-3 gives 0.049). "
                              "Unused by map.")

    def __post_init__(self) -> None:
        if self.local_reparam and self.inference == "map":
            raise ValueError("local_reparam must be false for inference 'map' (a point estimate samples nothing)")


def kl_weight(scheme: str, batch_index: int, num_batches: int, batch_size: int, n_train: int) -> float:
    """pi_i: the share of the epoch's KL that minibatch i = batch_index + 1 of M = num_batches
    carries; sum_i pi_i = 1 over an epoch whose minibatches partition the training set.

    uniform: pi_i = |B_i| / N_train. blundell: pi_i = 2^(M-i) / (2^M - 1) (Blundell et al. eq. 9),
    computed as 2^-i / (1 - 2^-M), which cannot overflow for large M.
    """
    if scheme == "uniform":
        return batch_size / n_train
    return 2.0 ** -(batch_index + 1) / (1.0 - 2.0**-num_batches)


# --- priors p(w), over a layer's flat parameter vector -------------------------------------------


class GaussianPrior:
    """p(w) = prod_j N(w_j; 0, prior_sigma^2); KL(q || p) in closed form."""

    def __init__(self, config: Config):
        self.logvar = torch.tensor(2 * math.log(config.prior_sigma))

    def log_prob(self, w: Tensor) -> Tensor:
        """log p(w), summed over the last axis: (..., P) -> (...)."""
        return log_normal_diag(w, torch.zeros(()), self.logvar)

    def kl(self, layer: BayesLinear, samples: int) -> Tensor:
        """KL(q(w) || p(w)) of one layer, nats (scalar); exact, so `samples` is unused."""
        return kl_normal_normal(layer.mu, layer.logvar(), torch.zeros(()), self.logvar)


class MixturePrior:
    """p(w) = prod_j [pi N(w_j; 0, sigma1^2) + (1 - pi) N(w_j; 0, sigma2^2)] (Blundell et al. eq. 7)."""

    def __init__(self, config: Config):
        self.log_pi = math.log(config.mixture_pi), math.log1p(-config.mixture_pi)
        sigmas = config.mixture_sigma1, config.mixture_sigma2
        self.logvars = tuple(torch.tensor(2 * math.log(sigma)) for sigma in sigmas)

    def log_prob(self, w: Tensor) -> Tensor:
        """log p(w), summed over the last axis: (..., P) -> (...)."""
        per_weight = w.unsqueeze(-1)  # (..., P, 1): one independent mixture per weight
        first, second = (log_normal_diag(per_weight, torch.zeros(()), logvar) + log_pi
                         for logvar, log_pi in zip(self.logvars, self.log_pi))  # (..., P) each
        return torch.logaddexp(first, second).sum(-1)

    def kl(self, layer: BayesLinear, samples: int) -> Tensor:
        """KL(q(w) || p(w)) of one layer, nats (scalar): the mean of log q(w) - log p(w) over
        `samples` fresh draws w ~ q."""
        return monte_carlo_kl(layer.sample, layer.log_q, self.log_prob, samples)


PRIORS = {"gaussian": GaussianPrior, "mixture": MixturePrior}


# --- layers and network --------------------------------------------------------------------------


class BayesLinear(nn.Module):
    """A fully connected layer b = a W^T + c with q(W, c) = N(mu, diag(sigma^2)), sigma = softplus(rho).

    mu and rho are flat (P,) vectors, P = n_out * n_in + n_out: the weights row-major, then the
    biases, so a layer's posterior is one diagonal Gaussian. mu starts at PyTorch's nn.Linear
    initialization, rho at init_rho; with init_rho None (MAP) the layer is a point estimate w = mu.
    """

    def __init__(self, n_in: int, n_out: int, init_rho: float | None):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        init = nn.Linear(n_in, n_out)
        self.mu = nn.Parameter(torch.cat([init.weight.detach().flatten(), init.bias.detach()]))
        self.register_parameter("rho", None if init_rho is None else nn.Parameter(torch.full_like(self.mu, init_rho)))

    def logvar(self) -> Tensor:
        """log sigma^2 with sigma = softplus(rho), (P,)."""
        return 2 * F.softplus(self.rho).log()

    def split(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Flat parameters (..., P) -> weights (..., n_out, n_in) and biases (..., n_out)."""
        weight, bias = w.split([self.n_out * self.n_in, self.n_out], dim=-1)
        return weight.unflatten(-1, (self.n_out, self.n_in)), bias

    def sample(self, n: int) -> Tensor:
        """n reparameterized draws w = mu + sigma * eps: (n, P)."""
        eps = torch.randn((n, *self.mu.shape), dtype=self.mu.dtype, device=self.mu.device)
        return self.mu + F.softplus(self.rho) * eps

    def log_q(self, w: Tensor) -> Tensor:
        """log q(w), summed over the P parameters: (n, P) -> (n,)."""
        return log_normal_diag(w, self.mu, self.logvar())

    def forward(self, a: Tensor, local_reparam: bool) -> Tensor:
        """Pre-activations for inputs a (S, B, n_in), one posterior draw per leading index s: (S, B, n_out)."""
        if self.rho is None:
            return F.linear(a, *self.split(self.mu))
        if local_reparam:
            gamma = F.linear(a, *self.split(self.mu))  # (S, B, n_out)
            delta = F.linear(a.pow(2), *self.split(F.softplus(self.rho).pow(2)))
            return gamma + delta.sqrt() * torch.randn_like(gamma)
        weight, bias = self.split(self.sample(a.shape[0]))  # (S, n_out, n_in), (S, n_out)
        return torch.baddbmm(bias.unsqueeze(1), a, weight.transpose(1, 2))


class BayesMLP(nn.Module):
    """An MLP of BayesLinear layers with ReLU between them, and its likelihood p(y | x, w)."""

    def __init__(self, config: Config, n_out: int, n_train: int, regression: bool, input_shift: Tensor,
                 input_scale: Tensor):
        super().__init__()
        self.config, self.n_train, self.regression = config, n_train, regression
        # fixed by the training data, so rebuilt by build() and not stored in model.pt
        self.register_buffer("input_shift", input_shift, persistent=False)
        self.register_buffer("input_scale", input_scale, persistent=False)
        n_in = len(input_shift)
        init_rho = config.init_rho if config.inference == "bbb" else None
        sizes = [n_in, *config.hidden, n_out]
        self.layers = nn.ModuleList(BayesLinear(a, b, init_rho) for a, b in zip(sizes[:-1], sizes[1:]))
        self.prior = PRIORS[config.prior](config)
        self.register_parameter("log_noise", nn.Parameter(torch.zeros(())) if regression else None)

    @property
    def bayesian(self) -> bool:
        return self.config.inference == "bbb"

    def forward(self, x: Tensor, samples: int, local_reparam: bool | None = None) -> Tensor:
        """f(x, w_s) for `samples` posterior draws w_s: x (B, D) -> (S, B, n_out).
        A point estimate (MAP) has one value, so S = 1 there whatever `samples` is.
        local_reparam overrides the configured sampling: False draws whole weight matrices, so
        that each s is one function of x (smooth curves over a grid); the per-example
        distribution is the same either way."""
        h = (x - self.input_shift) * self.input_scale
        h = h.expand(samples if self.bayesian else 1, *x.shape)  # (S, B, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.config.local_reparam if local_reparam is None else local_reparam)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h

    def log_likelihood(self, out: Tensor, y: Tensor) -> Tensor:
        """log p(y | x, w_s) in nats for network outputs out (S, B, n_out) and targets y (B,): (S, B)."""
        if self.regression:
            return log_normal_diag(y.unsqueeze(-1), out, 2 * self.log_noise)
        labels = y.expand(out.shape[0], -1).unsqueeze(-1)  # (S, B, 1)
        return out.log_softmax(-1).gather(-1, labels).squeeze(-1)

    def layer_costs(self, samples: int) -> Tensor:
        """The complexity cost of each layer, nats, (L,): KL(q(w_l) || p(w_l)) for bbb;
        -log p(mu_l), the MAP penalty (not a KL), for map."""
        if self.bayesian:
            return torch.stack([self.prior.kl(layer, samples) for layer in self.layers])
        return torch.stack([-self.prior.log_prob(layer.mu) for layer in self.layers])

    def complexity(self, costs: Tensor, batch: int) -> Tensor:
        """The ledger's complexity for each of `batch` examples: sum of KLs / N_train (bbb), 0 (map)."""
        value = costs.sum() / self.n_train if self.bayesian else costs.new_zeros(())
        return value.detach().expand(batch)

    def loss(self, x: Tensor, y: Tensor, batch_index: int, num_batches: int,
             progress: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        """pi_i * cost / |B_i| + mean nll with one weight draw (see the module docstring),
        and the unweighted per-example ledger terms of this batch."""
        nll = -self.log_likelihood(self(x, 1), y)[0]  # (B,)
        costs = self.layer_costs(1)
        pi = kl_weight(self.config.kl_weighting, batch_index, num_batches, len(x), self.n_train)
        objective = pi * costs.sum() / len(x) + nll.mean()
        return objective, {"complexity": self.complexity(costs, len(x)), "nll": nll.detach()}

    @torch.no_grad()
    def ledger_terms(self, x: Tensor, y: Tensor, samples: int) -> dict[str, Tensor]:
        """Unweighted complexity (KL / N_train, repeated per example) and
        nll = -(1/S) sum_s log p(y | x, w_s) over S = `samples` weight draws."""
        nll = -self.log_likelihood(self(x, samples), y).mean(0)
        return {"complexity": self.complexity(self.layer_costs(samples), len(x)), "nll": nll}

    def describe(self) -> str:
        """A short label of the variant for figure titles, e.g. 'bbb, mixture prior, local reparam.'."""
        parts = [self.config.inference, f"{self.config.prior} prior"]
        if self.config.local_reparam:
            parts.append("local reparam.")
        return ", ".join(parts)


def build(config: Config, dataset: Dataset) -> BayesMLP:
    """A regression network (one output, Gaussian likelihood) for real targets, a classifier
    (one logit per class) for class labels."""
    if dataset.target not in ("real", "class"):
        raise ValueError(f"BBB needs real or class targets; dataset {dataset.name} has {dataset.target}")
    regression = dataset.target == "real"
    n_out = 1 if regression else int(dataset.y_train.max()) + 1
    shift, scale = input_scaling(dataset)
    return BayesMLP(config, n_out, len(dataset.x_train), regression, shift, scale)


# --- diagnostics ---------------------------------------------------------------------------------

def predictive_log_lik(log_lik: Tensor) -> Tensor:
    """log p(y | x) = log (1/S) sum_s p(y | x, w_s) per example, from log_lik (S, N): (N,), float64."""
    log_lik = log_lik.double()
    return torch.logsumexp(log_lik, 0) - math.log(log_lik.shape[0])


def _regression_moments(f: Tensor, noise_var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From draws f(x, w_s) (S, N): the predictive mean, the variance from the weights alone,
    and the total variance Var_s f + s^2 (law of total variance), each (N,)."""
    var_weights = f.var(0, correction=0)
    return f.mean(0), var_weights, var_weights + noise_var


def _gaussian_entropy(var: Tensor) -> float:
    """Mean of 0.5 log(2 pi e var) over examples: the entropy of the moment-matched Gaussian,
    an upper bound on the entropy of the predictive mixture with that variance."""
    return (0.5 * torch.log(2 * math.pi * math.e * var)).mean().item()


def _regression_diagnostics(model: BayesMLP, dataset: Dataset, out: Tensor, config: ClassifierEvalConfig
                            ) -> dict[str, Any]:
    noise_var = (2 * model.log_noise).exp()
    mean, _, var = _regression_moments(out[..., 0], noise_var)
    values = {"rmse": (mean - dataset.y_test).pow(2).mean().sqrt().item(), "noise_scale": noise_var.sqrt().item(),
              "entropy_in": _gaussian_entropy(var)}
    if dataset.x_ood is not None:
        out_ood = model(dataset.x_ood, config.samples)
        values["entropy_ood"] = _gaussian_entropy(_regression_moments(out_ood[..., 0], noise_var)[2])
        if dataset.y_ood is not None:
            values["ood_log_lik"] = predictive_log_lik(model.log_likelihood(out_ood, dataset.y_ood)).mean().item()
    if "y_std" in dataset.split:  # standardized targets: also in the data's own units, y_std * y + y_mean
        values["rmse_original"] = values["rmse"] * dataset.split["y_std"]
        test_log_lik = predictive_log_lik(model.log_likelihood(out, dataset.y_test)).mean().item()
        values["test_log_lik_original"] = test_log_lik - math.log(dataset.split["y_std"])
    return values


@torch.no_grad()
def run_figure(model: BayesMLP, dataset: Dataset, out_dir: Path, title: str) -> None:
    """samples.png: the reliability diagram of a classifier; for regression the predictive band
    over x for 1-D inputs (training range shaded), else predicted vs true test targets with +-2 sd
    error bars (in original units where the targets were standardized)."""
    if not model.regression:
        return reliability_run_figure(model, dataset, out_dir, title)
    title = f"{dataset.name}: {model.describe()}"
    path = out_dir / "samples.png"
    noise_var = (2 * model.log_noise).exp()
    if dataset.dim == 1:
        inputs = torch.cat([x for x in (dataset.x_train, dataset.x_ood) if x is not None])
        grid = torch.linspace(inputs.min().item(), inputs.max().item(), BAND_GRID_POINTS)
        f = model(grid[:, None], BAND_SAMPLES, local_reparam=False)[..., 0]  # (S, G)
        grid_mean, grid_var_weights, grid_var = _regression_moments(f, noise_var)
        train = (dataset.x_train[:, 0].numpy(), dataset.y_train.numpy())
        ood = (dataset.x_ood[:, 0].numpy(), dataset.y_ood.numpy()) if dataset.y_ood is not None else None
        train_range = (dataset.x_train.min().item(), dataset.x_train.max().item())
        predictive_band_figure(grid.numpy(), grid_mean.numpy(), grid_var_weights.sqrt().numpy(),
                               grid_var.sqrt().numpy(), train, ood, train_range, title, path)
        return
    mean, _, var = _regression_moments(model(dataset.x_test, BAND_SAMPLES)[..., 0], noise_var)
    y_mean, y_std = dataset.split.get("y_mean", 0.0), dataset.split.get("y_std", 1.0)
    unit = "original units" if "y_std" in dataset.split else "data units"
    predicted_vs_true_figure((dataset.y_test * y_std + y_mean).numpy(), (mean * y_std + y_mean).numpy(),
                             (var.sqrt() * y_std).numpy(), unit, title, path)


@torch.no_grad()
def diagnose(model: BayesMLP, dataset: Dataset, ledger: Ledger, config: ClassifierEvalConfig,
             out_dir: Path) -> Diagnostics:
    """Held-out predictive quality of a Bayesian network (or its MAP baseline) with S =
    config.samples weight draws (one for MAP).

    - test_log_lik: mean over test examples of log (1/S) sum_s p(y | x, w_s), nats (higher is
      better): the log-density of the predictive distribution itself. By Jensen's inequality the
      nll term, -(1/S) sum_s log p(y | x, w_s), is >= -test_log_lik.
    - complexity_per_layer (bbb): KL(q(w_l) || p(w_l)) / N_train per layer, summing to the
      complexity term (up to Monte Carlo noise for the mixture prior). map_penalty_per_layer
      (map): -log p(w_l) / N_train, the penalty MAP trained with (not a KL; its ledger complexity is 0).
    - classification: klbench.classifier's diagnostics (accuracy, ece, predictive entropy in and
      out of distribution; reliability.csv) of pbar = (1/S) sum_s softmax f(x, w_s).
    - regression: rmse of the predictive mean, the noise scale s, and the entropy of the
      moment-matched predictive Gaussian (variance Var_s f(x, w_s) + s^2) on the test inputs
      (entropy_in) and on the dataset's out-of-distribution inputs where it has them
      (entropy_ood, and ood_log_lik on their targets); where the targets were standardized,
      rmse_original and test_log_lik_original in the data's own units.
    """
    out = model(dataset.x_test, config.samples)  # (S, N, K)
    per_layer = (model.layer_costs(config.samples) / model.n_train).tolist()
    values: dict[str, Any] = {
        "test_log_lik": predictive_log_lik(model.log_likelihood(out, dataset.y_test)).mean().item(),
        "weight_samples": out.shape[0],
        "complexity_per_layer" if model.bayesian else "map_penalty_per_layer":
            {f"layer{i + 1}": value for i, value in enumerate(per_layer)},
    }
    if model.regression:
        values.update(_regression_diagnostics(model, dataset, out, config))
    else:
        log_predict = lambda x: predictive_log_lik(model(x, config.samples).log_softmax(-1))  # noqa: E731
        values.update(classifier_diagnostics(log_predict, dataset.x_test, dataset.y_test, config.ece_bins, out_dir))
    return Diagnostics(values)


FAMILY = Family(
    name="bbb",
    terms=("complexity", "nll"),
    data_kinds=("continuous", "binary", "discrete"),
    targets=("real", "class"),
    ranks=(Rank("regression", "test_log_lik", higher_is_better=True),
           Rank("classification", "test_log_lik", higher_is_better=True)),
    config=Config,
    evaluate=ClassifierEvalConfig,
    build=build,
    diagnose=diagnose,
    run_figure=run_figure,
    headline=("test_log_lik", "accuracy", "ece", "rmse", "rmse_original", "test_log_lik_original", "entropy_in",
              "entropy_ood"),
    infinite_data=False,  # the complexity is KL / N_train
)
