"""Variational autoencoder as a KL ledger (Kingma & Welling 2014; IWAE: Burda et al. 2016).

P (what we have) = p(x) e(z|x);  Q (what we want) = m(z) d(x|z).
KL(P || Q) = E_p[-ELBO(x)] - H(p), with the per-example negative ELBO split into

    rate       = KL(e(z|x) || m(z))            nats, summed over latent dims
    distortion = -E_{e(z|x)} log d(x|z)        nats, summed over data dims

Training minimises distortion + beta * rate (or, with k > 1 importance samples, the
IWAE objective -log (1/k) sum_i w_i); the ledger always reports the unweighted terms.

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
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from klbench.kl import kl_normal_std_normal, log_normal_diag

if TYPE_CHECKING:
    from klbench.data import Dataset

FAMILY = "vae"
TERMS = ("rate", "distortion")
DATA_KINDS = ("continuous", "binary", "discrete")
SUPERVISED = False

# Keep exp(logvar) finite in float32 early in training; no trained model comes near these.
LOGVAR_MIN, LOGVAR_MAX = -14.0, 10.0


@dataclass(frozen=True)
class Config:
    latent_dim: int
    hidden: list[int]
    beta: float
    k: int
    prior: str
    prior_components: int
    decoder_scale: str

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.prior not in ("standard", "mog"):
            raise ValueError(f"prior must be 'standard' or 'mog', got {self.prior!r}")
        if self.prior_components < 1:
            raise ValueError(f"prior_components must be >= 1, got {self.prior_components}")
        if self.decoder_scale not in ("diagonal", "isotropic"):
            raise ValueError(f"decoder_scale must be 'diagonal' or 'isotropic', got {self.decoder_scale!r}")


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(self, config: Config, dim: int, kind: str, levels: int | None = None):
        super().__init__()
        if kind not in DATA_KINDS:
            raise ValueError(f"the VAE models data of kind {DATA_KINDS}, not {kind!r}")
        self.config, self.dim, self.kind, self.levels = config, dim, kind, levels
        latent = config.latent_dim
        self.encoder = mlp([dim, *config.hidden, 2 * latent])
        self.decoder = mlp([latent, *reversed(config.hidden), dim])
        if kind != "binary":
            self.log_scale = nn.Parameter(torch.zeros(dim if config.decoder_scale == "diagonal" else 1))
        if config.prior == "mog":
            components = config.prior_components
            self.prior_means = nn.Parameter(torch.randn(components, latent))
            self.prior_logvars = nn.Parameter(torch.zeros(components, latent))
            self.prior_logits = nn.Parameter(torch.zeros(components))

    # --- the pieces of P and Q -------------------------------------------------------

    def observe(self, x: Tensor) -> Tensor:
        """The variable the decoder models: x itself, or dequantized y = (x + u) / L."""
        if self.kind == "discrete":
            return (x + torch.rand_like(x)) / self.levels
        return x

    def encode(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """e(z|x) = N(mu, diag(exp(logvar))): (B, L), (B, L)."""
        mu, logvar = self.encoder(y).chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def distortion(self, y: Tensor, z: Tensor) -> Tensor:
        """-log d(x|z) in nats, summed over data dims: z (..., B, L) -> (..., B).

        Computed as a negative log-likelihood directly (a BCE sum for binary data) rather
        than as the negation of log d(x|z): the training step runs no extra negations."""
        out = self.decoder(z)  # (..., B, D)
        if self.kind == "binary":
            return nn.functional.binary_cross_entropy_with_logits(out, y.expand_as(out), reduction="none").sum(-1)
        logvar = (2 * self.log_scale).clamp(LOGVAR_MIN, LOGVAR_MAX).expand_as(out)
        neg_log_density = -log_normal_diag(y, out, logvar)
        if self.kind == "discrete":
            # change of variables from y in [0,1)^D back to integer units: p(x + u) = p(y) / L^D
            neg_log_density = neg_log_density + self.dim * math.log(self.levels)
        return neg_log_density

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

    def loss(self, x: Tensor, batch_index: int, num_batches: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Training objective (scalar, weighted by beta / importance-weighted for k > 1)
        and the unweighted per-example ledger terms of this batch. The VAE weights every
        batch alike, so the batch position is unused."""
        y = self.observe(x)
        mu, logvar = self.encode(y)
        z = self.sample_posterior(mu, logvar, self.config.k)  # (k, B, L)
        rate = self.rate(mu, logvar, z[:1])
        if self.config.k == 1:
            # decoding (B, L) rather than (1, B, L) spares every Linear a reshape, forward and backward
            distortion = self.distortion(y, z[0])  # (B,)
            objective = distortion + self.config.beta * rate
        else:
            distortions = self.distortion(y, z)  # (k, B)
            distortion = distortions[0]
            log_w = self.config.beta * (self.log_prior(z) - log_normal_diag(z, mu, logvar)) - distortions  # (k, B)
            objective = -(torch.logsumexp(log_w, 0) - math.log(self.config.k))
        return objective.mean(), {"rate": rate.detach(), "distortion": distortion.detach()}

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
        out = self.decoder(z)
        if self.kind == "binary":
            return torch.sigmoid(out)
        if self.kind == "discrete":
            return (out * self.levels).clamp(0, self.levels - 1)
        return out + self.log_scale.exp() * torch.randn_like(out)


def build(config: Config, dataset: Dataset) -> VAE:
    return VAE(config, dataset.dim, dataset.kind, dataset.levels)
