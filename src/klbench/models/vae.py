"""Variational autoencoder as a KL ledger (Kingma & Welling 2014; IWAE: Burda et al. 2016).

P (what we have) = p(x) e(z|x);  Q (what we want) = m(z) d(x|z).
KL(P || Q) = E_p[-ELBO(x)] - H(p), with the per-example negative ELBO split into

    rate       = KL(e(z|x) || m(z))            nats, summed over latent dims
    distortion = -E_{e(z|x)} log d(x|z)        nats, summed over data dims

Training minimises distortion + beta * rate, the rate's weight rising linearly from 0 to beta
over the first kl_warmup share of the steps (Bowman et al. 2016; Sonderby et al. 2016: a decoder
that can model the data alone otherwise settles at rate 0 before the encoder is any use).
With k > 1 posterior samples per example it minimises either the IWAE objective
-log (1/k) sum_i w_i (objective "iwae") or the k-sample ELBO, the mean of the k single-sample
estimates (objective "elbo": Burda et al.'s "VAE, k" columns); w_i = d(x|z_i) m(z_i)^beta /
e(z_i|x)^beta. The ledger always reports the unweighted terms.

Decoders by data kind:
- binary: Bernoulli with logits from the decoder network.
- continuous: Gaussian with mean from the network and a learned std (per dimension or
  one shared value), so the distortion is a proper negative log-density.
- discrete (integers 0..L-1): uniform dequantization y = (x + u) / L, u ~ U[0,1)^D, and a
  Gaussian decoder on y. Then -log P(x) <= E_u[-log p(y)] + D log L (Theis et al. 2016),
  so the distortion includes the D log L term and the bound is on the discrete data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from klbench.config import EvalConfig
from klbench.kl import kl_normal_std_normal, log_normal_diag
from klbench.models.family import Diagnostics, Family, Figure, Rank, samples_run_figure
from klbench.models.likelihoods import KINDS, LOGVAR_MAX, LOGVAR_MIN, DataLikelihood, mlp
from klbench.settings import setting

if TYPE_CHECKING:
    from klbench.data import Dataset
    from klbench.ledger import Ledger

# Examples per IWAE batch are chosen so that k * batch stays under this many decoder rows:
# larger batches only add memory traffic (k = 1024 on 2000 examples would be ~1 GB per layer).
IWAE_ROWS = 65_536
ACTIVE_UNIT_THRESHOLD = 0.01


@dataclass(frozen=True)
class Config:
    """Hyperparameters of one VAE variant."""

    latent_dim: int = setting(8, "Dimension of z.", minimum=1)
    hidden: list[int] = setting([128, 128], "Hidden widths of the encoder MLP; the decoder mirrors them ([] = linear).",
                                items={"minimum": 1})
    beta: float = setting(1.0, "Weight of the rate in training (the ledger is unweighted).", exclusiveMinimum=0)
    kl_warmup: float = setting(0.0, "Share of the training steps over which the rate's weight rises linearly from 0 "
                               "to beta (0: no warm-up). Against posterior collapse: a decoder that fits the data "
                               "alone (a Gaussian with its own std on 2-D data) otherwise keeps rate 0.",
                               minimum=0, maximum=1)
    k: int = setting(1, "Posterior samples per example in training (1 = ELBO; > 1: see objective).", minimum=1)
    objective: Literal["iwae", "elbo"] = setting(
        "iwae", "With k > 1: iwae = -log (1/k) sum_i w_i (importance weighted); elbo = the mean of k single-sample "
        "ELBOs (Burda et al. 2016's VAE with k samples).")
    activation: Literal["silu", "tanh"] = setting("silu", "Activation between the MLP layers (Burda et al. 2016: tanh).")
    prior: Literal["standard", "mog"] = setting("standard", "m(z): N(0, I), or a learned mixture of Gaussians.")
    prior_components: int = setting(10, "Mixture components of the mog prior.", minimum=1)
    decoder_scale: Literal["diagonal", "isotropic", "amortized"] = setting(
        "diagonal", "Learned std of the Gaussian decoder (continuous and discrete data): per dimension, shared, or "
        "amortized (a function of z: the decoder outputs mean and log std, as Kingma & Welling 2014's).")


@dataclass(frozen=True)
class Evaluate(EvalConfig):
    """The VAE's evaluation: the IWAE bound at several k on the first held-out examples."""

    iwae_k: tuple[int, ...] = setting((1, 64, 1024), "Importance-sample counts k of the IWAE bound; each must "
                                      "divide the largest.", minItems=1, items={"minimum": 1, "maximum": 5000})
    iwae_examples: int = setting(1000, "Held-out examples of the IWAE bound and the gaps (the first n of the "
                                 "test split).", minimum=1)

    def __post_init__(self) -> None:
        largest = max(self.iwae_k)
        if any(largest % k for k in self.iwae_k):
            raise ValueError(f"every iwae_k must divide the largest ({largest}), got {list(self.iwae_k)}")
        object.__setattr__(self, "iwae_k", tuple(sorted(self.iwae_k)))


class VAE(nn.Module):
    def __init__(self, config: Config, dim: int, kind: str, levels: int | None = None):
        super().__init__()
        self.config, self.dim, self.kind, self.levels = config, dim, kind, levels
        latent = config.latent_dim
        self.encoder = mlp([dim, *config.hidden, 2 * latent], config.activation)
        self.likelihood = DataLikelihood(dim, kind, levels, config.decoder_scale)
        self.decoder = mlp([latent, *reversed(config.hidden), self.likelihood.out_features], config.activation)
        if config.prior == "mog":
            components = config.prior_components
            self.prior_means = nn.Parameter(torch.randn(components, latent))
            self.prior_logvars = nn.Parameter(torch.zeros(components, latent))
            self.prior_logits = nn.Parameter(torch.zeros(components))

    # --- the pieces of P and Q -------------------------------------------------------

    def observe(self, x: Tensor) -> Tensor:
        """The variable the decoder models: x itself, or dequantized y = (x + u) / L."""
        return self.likelihood.observe(x)

    def encode(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """e(z|x) = N(mu, diag(exp(logvar))): (B, L), (B, L)."""
        mu, logvar = self.encoder(y).chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def distortion(self, y: Tensor, z: Tensor) -> Tensor:
        """-log d(x|z) in nats, summed over data dims: z (..., B, L) -> (..., B)."""
        return self.likelihood.nll(y, self.decoder(z))  # decoder: (..., B, D)

    def log_prior(self, z: Tensor) -> Tensor:
        """log m(z), summed over latent dims: (..., B, L) -> (..., B)."""
        if self.config.prior == "standard":
            return log_normal_diag(z, torch.zeros_like(z), torch.zeros_like(z))
        log_weights = torch.log_softmax(self.prior_logits, 0)  # (K,)
        per_component = log_normal_diag(z.unsqueeze(-2), self.prior_means, self.prior_logvars)  # (..., B, K)
        return torch.logsumexp(per_component + log_weights, -1)

    def sample_posterior(self, mu: Tensor, logvar: Tensor, n: int) -> Tensor:
        """n reparameterized draws z ~ e(z|x): (n, B, L)."""
        eps = torch.randn((n, *mu.shape), dtype=mu.dtype, device=mu.device)
        return mu + eps * (0.5 * logvar).exp()

    def rate(self, mu: Tensor, logvar: Tensor, z: Tensor) -> Tensor:
        """KL(e(z|x) || m(z)) per example: closed form for N(0, I), else the mean of
        log e(z|x) - log m(z) over the draws z (n, B, L) (unbiased, can be < 0 by noise)."""
        if self.config.prior == "standard":
            return kl_normal_std_normal(mu, logvar)
        return (log_normal_diag(z, mu, logvar) - self.log_prior(z)).mean(0)

    # --- what the training loop and the evaluation call -------------------------------

    def objective(self, x: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The training objective per example (B,): distortion + beta rate for one draw (k = 1);
        with k draws the mean of their k-sample ELBO terms (objective elbo) or IWAE's
        -log (1/k) sum_i w_i with beta-weighted log w_i (objective iwae); and the unweighted
        per-example ledger terms of the first draw. beta is the rate's weight: the config's, or
        less during the KL warm-up."""
        y = self.observe(x)
        mu, logvar = self.encode(y)
        z = self.sample_posterior(mu, logvar, self.config.k)  # (k, B, L)
        rate = self.rate(mu, logvar, z[:1])
        if self.config.k == 1:
            # decoding (B, L) rather than (1, B, L) spares every Linear a reshape, forward and backward
            distortion = self.distortion(y, z[0])  # (B,)
            objective = distortion + beta * rate
        elif self.config.objective == "elbo":  # the k-sample ELBO: every draw's distortion, averaged
            distortion = self.distortion(y, z).mean(0)
            objective = distortion + beta * self.rate(mu, logvar, z)
        else:
            distortions = self.distortion(y, z)  # (k, B)
            distortion = distortions[0]
            log_w = beta * (self.log_prior(z) - log_normal_diag(z, mu, logvar)) - distortions  # (k, B)
            objective = -(torch.logsumexp(log_w, 0) - math.log(self.config.k))
        return objective, {"rate": rate, "distortion": distortion}

    def loss(self, x: Tensor, batch_index: int, num_batches: int,
             progress: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        """Training objective (scalar, the mean of `objective`) and the unweighted per-example
        ledger terms of this batch. The VAE weights every batch alike: the batch position is unused;
        progress (step / steps) sets the rate's weight during the warm-up."""
        objective, terms = self.objective(x, self.rate_weight(progress))
        return objective.mean(), {name: value.detach() for name, value in terms.items()}

    def rate_weight(self, progress: float) -> float:
        """beta min(1, progress / kl_warmup): the rate's weight in training at this point of it."""
        warmup = self.config.kl_warmup
        return self.config.beta * (min(1.0, progress / warmup) if warmup > 0 else 1.0)

    @property
    def own_objective(self) -> str | None:
        """What training minimises where it is not the ELBO the ledger sums to (models/family.py):
        IWAE's -L_k (k > 1, objective iwae), or distortion + beta rate (beta != 1)."""
        beta = self.config.beta
        if self.config.k > 1 and self.config.objective == "iwae":
            return f"-L_{self.config.k}" + (f" (beta {beta:g})" if beta != 1 else "")
        return None if beta == 1 else f"distortion + {beta:g} rate"

    @torch.no_grad()
    def own_objective_terms(self, x: Tensor, samples: int) -> dict[str, Tensor]:
        """The training objective per example, averaged over `samples` independent draws."""
        return {"objective": torch.stack([self.objective(x, self.config.beta)[0] for _ in range(samples)]).mean(0)}

    @torch.no_grad()
    def ledger_terms(self, x: Tensor, samples: int) -> dict[str, Tensor]:
        """Unweighted rate and distortion per example, averaged over `samples` draws of z."""
        y = self.observe(x)
        mu, logvar = self.encode(y)
        z = self.sample_posterior(mu, logvar, samples)
        return {"rate": self.rate(mu, logvar, z), "distortion": self.distortion(y, z).mean(0)}

    @torch.no_grad()
    def log_importance_weights(self, x: Tensor, k: int) -> Tensor:
        """log w_i = log d(x|z_i) + log m(z_i) - log e(z_i|x), z_i ~ e(z|x): (k, B), float64."""
        y = self.observe(x)
        mu, logvar = self.encode(y)
        z = self.sample_posterior(mu, logvar, k)
        log_w = self.log_prior(z) - log_normal_diag(z, mu, logvar) - self.distortion(y, z)
        return log_w.double()

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """x ~ m(z) d(x|z) in data units, (n, D): full samples for continuous data (the
        decoder noise is part of the density), decoder means for images (the usual display)."""
        if self.config.prior == "standard":
            z = torch.randn(n, self.config.latent_dim)
        else:
            component = torch.distributions.Categorical(logits=self.prior_logits).sample((n,))
            std = (0.5 * self.prior_logvars[component]).exp()
            z = self.prior_means[component] + std * torch.randn_like(std)
        return self.likelihood.sample(self.decoder(z))


def build(config: Config, dataset: Dataset) -> VAE:
    model = VAE(config, dataset.dim, dataset.kind, dataset.levels)
    model.likelihood.start_at_data_scale(model.decoder[-1], dataset.x_train)
    return model


# --- diagnostics -------------------------------------------------------------------------


@torch.no_grad()
def iwae_bounds(model: VAE, x: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
    """-L_k per example for each k: the IWAE bound on -log q(x) (Burda et al. 2016, eq. 8).

    L_k = E[log (1/k) sum_{i<=k} w_i]. One draw of K = max(ks) weights per example is cut
    into K/k disjoint groups of k, and L_k is the mean over groups (float64 logsumexp).
    The groups for a small k partition those of a larger k, so by Jensen's inequality the
    estimates obey -L_1 >= -L_k >= -L_K for every example, not only in expectation.
    """
    largest = max(ks)
    batch = max(1, IWAE_ROWS // largest)
    log_w = torch.cat([model.log_importance_weights(x[i : i + batch], largest) for i in range(0, len(x), batch)], 1)
    out = {}
    for k in ks:
        groups = log_w.reshape(largest // k, k, -1)  # (K/k, k, N)
        out[k] = -(torch.logsumexp(groups, 1) - math.log(k)).mean(0)
    return out


@torch.no_grad()
def mutual_information(model: VAE, x: Tensor) -> dict[str, float]:
    """Rate split into mutual information and marginal KL (Hoffman & Johnson 2016):

        rate = E_x KL(e(z|x) || m(z)) = I(X;Z) + KL(e(z) || m(z)),
        I = E[log e(z|x) - log e(z)],  marginal KL = E[log e(z) - log m(z)],

    with the aggregate posterior e(z) = (1/N) sum_n e(z|x_n) over the whole held-out set
    and one z ~ e(z|x_n) per example; rate_mc = E[log e(z|x) - log m(z)] on the same draws
    is the Monte Carlo rate they split. The estimate of I cannot exceed log N.
    """
    mu, logvar = model.encode(model.observe(x))
    mu, logvar = mu.double(), logvar.double()
    z = model.sample_posterior(mu, logvar, 1)[0]  # (N, L)
    log_e_own = log_normal_diag(z, mu, logvar)  # (N,)
    n = len(x)
    # log e(z_i) = logsumexp_n log e(z_i | x_n) - log N, in row blocks to bound memory (N x N x L)
    log_e_agg = torch.cat(
        [torch.logsumexp(log_normal_diag(z[i : i + 256, None], mu, logvar), 1) for i in range(0, n, 256)]
    ) - math.log(n)
    log_m = model.log_prior(z.float()).double()
    return {
        "mutual_info": (log_e_own - log_e_agg).mean().item(),
        "marginal_kl": (log_e_agg - log_m).mean().item(),
        "rate_mc": (log_e_own - log_m).mean().item(),
        "mutual_info_max": math.log(n),
        "active_units": int((mu.var(0) > ACTIVE_UNIT_THRESHOLD).sum().item()),
    }


def diagnose(model: VAE, dataset: Dataset, ledger: Ledger, config: Evaluate, out_dir: Path) -> Diagnostics:
    """IWAE bounds at every k, I(X;Z) and marginal KL, active units, and the
    H - D <= I <= R bounds (Alemi et al. 2018) where H is known; nll_bound is the
    per-example -L_K at the largest k."""
    x_iwae = dataset.x_test[: config.iwae_examples]
    bounds = iwae_bounds(model, x_iwae, config.iwae_k)
    diagnostics: dict[str, Any] = {"iwae_nll": {str(k): v.double().mean().item() for k, v in bounds.items()}}
    diagnostics["iwae_examples"] = len(x_iwae)
    diagnostics.update(mutual_information(model, dataset.x_test))
    means = ledger.means()
    if dataset.entropy is not None:
        h_minus_d = dataset.entropy - means["distortion"]
        diagnostics["bounds"] = {
            "h_minus_d": h_minus_d,
            "i": diagnostics["mutual_info"],
            "r": means["rate"],
            "h_minus_d_le_i": h_minus_d <= diagnostics["mutual_info"],
            "i_le_r": diagnostics["mutual_info"] <= means["rate"],
        }
    return Diagnostics(diagnostics, nll_bound=bounds[max(config.iwae_k)])


FAMILY = Family(
    name="vae",
    terms=("rate", "distortion"),
    data_kinds=KINDS,
    targets=None,
    ranks=(Rank("density", "neg_elbo"),),
    config=Config,
    evaluate=Evaluate,
    build=build,
    diagnose=diagnose,
    run_figure=samples_run_figure,
    figures=(
        Figure("rate_distortion", "plane", {
            "x": "rate", "y": "distortion", "sweep": "beta", "entropy_line": True, "mutual_info": True,
            "x_label": "rate R = KL(e(z|x) ‖ m(z))", "y_label": "distortion D = −E log d(x|z)",
            "title": "Rate-distortion plane of the VAE variants (test set)"}),
        Figure("iwae_vs_k", "bound_vs_k", {"column": "iwae_nll"}),
    ),
    headline=("mutual_info", "marginal_kl", "active_units", "on_support", "modes_covered"),
)
