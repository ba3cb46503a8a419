"""Deep variational information bottleneck as a KL ledger (Alemi et al. 2017, "Deep Variational
Information Bottleneck", ICLR).

P (what we have) = p(x, y) e(z|x);  Q (what we want) = m(z) c(y|z).
Per example (x, y), the bound with e(z|x) as the variational posterior of Q's label model,

    log E_{m(z)} c(y|z) >= E_{e(z|x)} log c(y|z) - KL(e(z|x) || m(z)),

makes the negative ELBO, which splits into

    rate       = KL(e(z|x) || m(z))            nats, summed over the latent dims: the ledger's `rate`
    distortion = -E_{e(z|x)} log c(y|z)        nats, the classifier's cross-entropy: the ledger's `distortion`

Averaged over p(x, y) they bound the two informations of the bottleneck (Alemi et al. sec. 3):
E_p[rate] >= I(X; Z) (m(z) stands in for the marginal e(z) = E_p e(z|x)) and
H(Y) - E_p[distortion] <= I(Z; Y) (c(y|z) stands in for the true p(y|z)).

Distributions:
- encoder e(z|x) = N(z; mu(x), diag sigma^2(x)), mu and log sigma^2 from one MLP (hidden widths
  `hidden`, SiLU), log sigma^2 clamped to [LOGVAR_MIN, LOGVAR_MAX] so it stays finite in float32;
- prior m(z) = N(0, I), fixed: rate = 0.5 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2) in closed
  form (kl.kl_normal_std_normal);
- decoder (classifier) c(y|z) = softmax(g(z))_y, g linear (classifier_hidden = []) or an MLP;
- z = mu + sigma * eps, eps ~ N(0, I) (the reparameterization of sec. 3), S draws per example:
  distortion = -(1/S) sum_s log c(y | z_s), unbiased for the expectation.

Training minimises mean_batch [distortion + beta * rate] with train_samples draws of z per example
(the paper's J_IB of sec. 3, its (1/N) sum_n over a minibatch; beta ~ 1e-3 in its MNIST runs). The
ledger always reports the unweighted rate and distortion, so runs with different beta compare.

Prediction (diagnostics, classifier.py): p(y|x) = E_{e(z|x)} c(y|z) ~ (1/S) sum_s c(y|z_s), computed
as log-mean-exp in float64. By Jensen, -log of it <= distortion for the same draws.

Inputs: continuous x is standardized with the training split's mean and standard deviation;
discrete x (integers 0..L-1) is divided by L - 1, to [0, 1]; binary x is used as is. This is a
fixed change of coordinates of what the encoder sees; the ledger is about y and z, so no term
changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from klbench.classifier import ClassifierEvalConfig, classifier_diagnostics, reliability_run_figure
from klbench.kl import kl_normal_std_normal
from klbench.models.family import Diagnostics, Family, Figure, Rank
from klbench.models.inputs import input_scaling
from klbench.models.likelihoods import LOGVAR_MAX, LOGVAR_MIN, mlp
from klbench.settings import setting

if TYPE_CHECKING:
    from klbench.data import Dataset
    from klbench.ledger import Ledger

# A latent dimension is active if its encoder mean varies over the test set by more than this
# (Burda et al. 2016, sec. 5.2, as for the VAE).
ACTIVE_UNIT_VARIANCE = 0.01


@dataclass(frozen=True)
class Config:
    """Hyperparameters of one variant: the `families.vib` block of the config, each with its meaning and limits."""

    latent_dim: int = setting(32, "Dimensions of the bottleneck z.", minimum=1)
    hidden: list[int] = setting([256, 256], "Hidden widths of the encoder MLP e(z|x).", items={"minimum": 1})
    classifier_hidden: list[int] = setting(
        [], "Hidden widths of the classifier c(y|z); [] is a linear softmax classifier.", items={"minimum": 1})
    beta: float = setting(1e-3, "Weight of the rate in the training objective distortion + beta * rate.",
                          exclusiveMinimum=0)
    train_samples: int = setting(1, "Draws of z per example in each training step.", minimum=1)


class VIB(nn.Module):
    """Stochastic encoder e(z|x), prior m(z) = N(0, I) and classifier c(y|z) (module docstring)."""

    def __init__(self, config: Config, n_classes: int, input_shift: Tensor, input_scale: Tensor):
        super().__init__()
        self.config, self.n_classes = config, n_classes
        # fixed by the training data, so rebuilt by build() and not stored in model.pt
        self.register_buffer("input_shift", input_shift, persistent=False)
        self.register_buffer("input_scale", input_scale, persistent=False)
        self.encoder = mlp([len(input_shift), *config.hidden, 2 * config.latent_dim])
        self.classifier = mlp([config.latent_dim, *config.classifier_hidden, n_classes])

    def standardize(self, x: Tensor) -> Tensor:
        """What the encoder sees: x in the coordinates of the module docstring, (B, D) -> (B, D)."""
        return (x - self.input_shift) * self.input_scale

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """mu(x) and log sigma^2(x) of e(z|x): x (B, D) -> (B, L), (B, L)."""
        mu, logvar = self.encoder(self.standardize(x)).chunk(2, dim=-1)  # (B, 2L) -> 2 x (B, L)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def sample_z(self, mu: Tensor, logvar: Tensor, samples: int) -> Tensor:
        """S reparameterized draws z_s = mu + sigma * eps_s, eps_s ~ N(0, I): (B, L) -> (S, B, L)."""
        eps = torch.randn((samples, *mu.shape), dtype=mu.dtype, device=mu.device)  # (S, B, L)
        return mu + (0.5 * logvar).exp() * eps

    def log_classify(self, z: Tensor) -> Tensor:
        """log c(y|z) for every class: z (..., L) -> (..., K)."""
        return self.classifier(z).log_softmax(-1)

    def terms(self, x: Tensor, y: Tensor, samples: int) -> dict[str, Tensor]:
        """Unweighted rate and distortion per example, (B,) each, with S = `samples` draws of z."""
        mu, logvar = self.encode(x)
        rate = kl_normal_std_normal(mu, logvar)  # (B,)
        log_c = self.log_classify(self.sample_z(mu, logvar, samples))  # (S, B, K)
        labels = y.expand(samples, -1).unsqueeze(-1)  # (S, B, 1)
        distortion = -log_c.gather(-1, labels).squeeze(-1).mean(0)  # (S, B) -> (B,)
        return {"rate": rate, "distortion": distortion}

    def weighted(self, terms: dict[str, Tensor]) -> Tensor:
        """distortion + beta * rate per example: what training minimises, (B,)."""
        return terms["distortion"] + self.config.beta * terms["rate"]

    def loss(self, x: Tensor, y: Tensor, batch_index: int, num_batches: int,
             progress: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        """mean_batch [distortion + beta * rate] with train_samples draws of z, and the
        unweighted ledger terms of this batch (detached). Every batch carries its own rate,
        so batch_index and num_batches are unused."""
        terms = self.terms(x, y, self.config.train_samples)
        objective = self.weighted(terms).mean()
        return objective, {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def ledger_terms(self, x: Tensor, y: Tensor, samples: int) -> dict[str, Tensor]:
        """Unweighted rate (exact) and distortion averaged over S = `samples` draws of z, (B,) each."""
        return self.terms(x, y, samples)

    @property
    def own_objective(self) -> str | None:
        """What training minimises (models/family.py): distortion + beta rate, beta != 1. Chosen on
        the ledger's rate + distortion, a beta = 0.001 run would keep the checkpoint of least
        rate, not the one that classifies best."""
        return None if self.config.beta == 1 else f"distortion + {self.config.beta:g} rate"

    @torch.no_grad()
    def own_objective_terms(self, x: Tensor, y: Tensor, samples: int) -> dict[str, Tensor]:
        """distortion + beta rate per example, the distortion averaged over `samples` draws of z."""
        return {"objective": self.weighted(self.terms(x, y, samples))}

    @torch.no_grad()
    def log_predictive(self, x: Tensor, samples: int) -> Tensor:
        """log p(y|x) ~ log (1/S) sum_s c(y|z_s), z_s ~ e(z|x), for every class: x (N, D) -> (N, K),
        float64, on x's device (the model may sit on another)."""
        mu, logvar = self.encode(x.to(self.input_shift.device))
        log_c = self.log_classify(self.sample_z(mu, logvar, samples)).double()  # (S, N, K)
        return (torch.logsumexp(log_c, dim=0) - math.log(samples)).to(x.device)  # (N, K)

    def describe(self) -> str:
        """A short label of the variant for figure titles, e.g. 'VIB, L = 32, beta = 0.001'."""
        return f"VIB, L = {self.config.latent_dim}, beta = {self.config.beta:g}"


def build(config: Config, dataset: Dataset) -> VIB:
    """A bottleneck classifier with one logit per class of the training labels."""
    if dataset.target != "class":
        raise ValueError(f"VIB needs class targets; dataset {dataset.name} has {dataset.target}")
    n_classes = int(dataset.y_train.max()) + 1
    shift, scale = input_scaling(dataset)
    return VIB(config, n_classes, shift, scale)


@torch.no_grad()
def diagnose(model: VIB, dataset: Dataset, ledger: Ledger, config: ClassifierEvalConfig,
             out_dir: Path) -> Diagnostics:
    """The shared classifier diagnostics (classifier.py: test_log_lik, accuracy, ece, predictive
    entropies; writes reliability.csv) of p(y|x) with S = config.samples draws of z, and
    active_units: the latent dims whose encoder mean mu_j(x) has variance > 0.01 over the test set."""
    values: dict[str, Any] = classifier_diagnostics(lambda x: model.log_predictive(x, config.samples),
                                                    dataset.x_test, dataset.y_test, config.ece_bins, out_dir)
    mu, _ = model.encode(dataset.x_test.to(model.input_shift.device))  # (N, L)
    values["active_units"] = int((mu.var(0) > ACTIVE_UNIT_VARIANCE).sum().item())
    return Diagnostics(values)


FAMILY = Family(
    name="vib",
    terms=("rate", "distortion"),
    data_kinds=("continuous", "binary", "discrete"),
    targets=("class",),
    ranks=(Rank("classification", "test_log_lik", higher_is_better=True),),
    config=Config,
    build=build,
    diagnose=diagnose,
    run_figure=reliability_run_figure,
    evaluate=ClassifierEvalConfig,
    figures=(Figure("information_plane", "plane", {
        "x": "rate", "y": "distortion", "annotate": "accuracy", "sweep": "beta",
        "x_label": "rate R = KL(e(z|x) ‖ m(z))", "y_label": "distortion D = −E log c(y|z)",
        "title": "Information plane of the bottleneck classifiers (test set)"}),),
    headline=("test_log_lik", "accuracy", "ece"),
)
