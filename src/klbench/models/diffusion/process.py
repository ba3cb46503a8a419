"""What DDPM and VDM share: the variance-preserving process written with gamma = -log SNR, the
denoiser, the decoder p(x | z_first), the ledger terms and the ancestral sampler (the
package's docstring, klbench/models/diffusion/__init__.py, gives the math)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klbench.kl import kl_normal_std_normal, log_discretized_normal
from klbench.models.likelihoods import KINDS

if TYPE_CHECKING:
    from klbench.models.diffusion import Config

QUADRATURE_NODES = 64  # Gauss-Hermite nodes of the discrete reconstruction term (reach |eps| ~ 15)


# --- the variance-preserving process, in terms of gamma = -log SNR ----------------------------


def alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma))."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def posterior(y: Tensor, z_t: Tensor, gamma_s: Tensor, gamma_t: Tensor) -> tuple[Tensor, Tensor]:
    """q(z_s | z_t, y) for gamma_s < gamma_t: (mean, logvar), each (..., D).

    mean = alpha_s ((1 - c) z_t / alpha_t + c y), var = sigma_s^2 c, c = -expm1(gamma_s - gamma_t)
    (Ho et al. 2020 eq. 7 with alpha_bar = alpha^2, written with gamma as Kingma et al. 2021 do).
    gammas broadcast against (..., 1).
    """
    alpha_s, _ = alpha_sigma(gamma_s)
    alpha_t, _ = alpha_sigma(gamma_t)
    c = -torch.expm1(gamma_s - gamma_t)
    mean = alpha_s * ((1 - c) * z_t / alpha_t + c * y)
    logvar = F.logsigmoid(gamma_s) + torch.log(c)
    return mean, logvar.expand_as(mean)


def antithetic_times(n: int, shape: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """(n, *shape) times in [0, 1): u_k = (u_0 + k/n) mod 1 with u_0 ~ U[0, 1)^shape.

    Each u_k is uniform on [0, 1), and the n draws of every entry of `shape` fall one in each of
    the strata [k/n, (k+1)/n): an unbiased, low-variance set of times (Kingma et al. 2021).
    """
    u_0 = torch.rand(shape, device=device)
    offsets = torch.arange(n, device=device).reshape(n, *[1] * len(shape)) / n
    return torch.remainder(u_0 + offsets, 1.0)


def sinusoidal_embedding(u: Tensor, size: int) -> Tensor:
    """sin and cos of 1000 u at size/2 frequencies from 1 down to 1/10000 (Vaswani et al. 2017;
    DDPM's timestep embedding): (...,) -> (..., size)."""
    half = size // 2
    frequencies = torch.exp(-math.log(10_000) * torch.arange(half, dtype=u.dtype, device=u.device) / half)
    angles = 1000 * u[..., None] * frequencies
    return torch.cat([angles.sin(), angles.cos()], -1)


# --- the network -------------------------------------------------------------------------------


class Denoiser(nn.Module):
    """MLP on z whose every hidden layer also gets the embedded noise level u in [0, 1]:
    h_l = SiLU(W_l h_{l-1} + U_l e(u)), e = sinusoidal_embedding(u). The output layer starts at
    zero (Kingma et al. 2021 do the same): training starts from the model's analytic base."""

    def __init__(self, dim: int, outputs: int, hidden: list[int], embedding: int):
        super().__init__()
        self.embedding, self.hidden = embedding, list(hidden)
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip([dim, *hidden[:-1]], hidden))
        self.time = nn.Linear(embedding, sum(hidden))
        self.out = nn.Linear(hidden[-1], outputs)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        """z (..., D), u (...,) -> (..., outputs)."""
        offsets = self.time(sinusoidal_embedding(u, self.embedding)).split(self.hidden, -1)
        h = z
        for layer, offset in zip(self.layers, offsets):
            h = F.silu(layer(h) + offset)  # (..., H_l)
        return self.out(h)


# --- the model ---------------------------------------------------------------------------------


class Diffusion(nn.Module):
    """What DDPM and VDM share: model units, denoiser, prior and reconstruction terms, sampler,
    and the loss / ledger interface. A process provides endpoints() -> (gamma_first, gamma_last),
    noise_level(gamma), diffusion_term(y, u, simple), sampling_gammas() and loss_curve(x, points).
    x_train (N, D) sets the denoiser's base (module docstring)."""

    def __init__(self, config: Config, x_train: Tensor, kind: str, levels: int | None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"diffusion models data of kind {KINDS}, not {kind!r}")
        self.config, self.dim, self.kind = config, x_train.shape[1], kind
        self.levels = 2 if kind == "binary" else levels
        outputs = self.dim if kind == "continuous" else self.dim * self.levels
        self.denoiser = Denoiser(self.dim, outputs, config.hidden, config.time_embedding)
        if kind == "continuous":
            self.register_buffer("data_mean", x_train.mean(0))
            self.register_buffer("data_var", x_train.var(0))
        else:
            self.register_buffer("level_values", torch.linspace(-1, 1, self.levels), persistent=False)
            nodes, weights = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)  # weight exp(-eps^2 / 2)
            self.register_buffer("quadrature_eps", torch.tensor(nodes, dtype=torch.float32), persistent=False)
            self.register_buffer("quadrature_weights", torch.tensor(weights / math.sqrt(2 * math.pi),
                                                                    dtype=torch.float32), persistent=False)
            counts = F.one_hot(x_train.long(), self.levels).sum(0).T  # (L, D)
            with torch.no_grad():
                self.denoiser.out.bias.copy_(((counts + 1) / (len(x_train) + self.levels)).log().flatten())

    # --- units -----------------------------------------------------------------------------

    def to_model_units(self, x: Tensor) -> Tensor:
        """y: x itself (continuous) or 2x/(L-1) - 1 in [-1, 1] (binary, discrete)."""
        if self.kind == "continuous":
            return x
        return 2 * x / (self.levels - 1) - 1

    def to_data_units(self, y: Tensor) -> Tensor:
        """x from y: y itself, or the level whose bin holds y (clamped to 0..L-1)."""
        if self.kind == "continuous":
            return y
        return ((y + 1) * (self.levels - 1) / 2).round().clamp(0, self.levels - 1)

    # --- the denoiser ----------------------------------------------------------------------

    def predict_eps(self, z: Tensor, gamma: Tensor) -> Tensor:
        """eps_hat(z, gamma): z (..., D), gamma (...,) -> (..., D). See the module docstring."""
        out = self.denoiser(z, self.noise_level(gamma))
        alpha, sigma = alpha_sigma(gamma[..., None])  # (..., 1)
        if self.kind == "continuous":
            return self.gaussian_gain(alpha, sigma) * (z - alpha * self.data_mean) + alpha * out
        c = self.level_values[:, None]  # (L, 1)
        # log N(z; alpha c_k, sigma^2) up to terms constant in k: SNR (z c_k / alpha - c_k^2 / 2), with
        # the small factors formed first (the (..., L, D) tensor is the sampler's main cost).
        # Levels before dimensions: a softmax over a short last axis is several times slower.
        snr = torch.exp(-gamma)[..., None, None]  # (..., 1, 1)
        logits = out.unflatten(-1, (self.levels, self.dim)) + (snr * c / alpha[..., None]) * z[..., None, :]
        logits = logits - 0.5 * snr * c**2  # (..., L, D)
        y_hat = (torch.softmax(logits, -2) * c).sum(-2)  # (..., D)
        return (z - alpha * y_hat) / sigma

    def gaussian_gain(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """k = sigma / (alpha^2 v + sigma^2): E[eps | z] = k (z - alpha m) for y ~ N(m, diag v)."""
        return sigma / (alpha**2 * self.data_var + sigma**2)

    def noise_errors(self, y: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
        """With z ~ q(z | y) at gamma (...,): ||eps - eps_hat(z)||^2 (what training fits) and the
        estimate of its mean that the bound uses, (...,) each. For discrete data they are the
        same; for continuous data the bound uses the control variate
            ||eps - eps_hat||^2 - ||eps - eps_base||^2 + E_eps ||eps - eps_base||^2,
        eps_base = k (z - alpha m) the analytic base: same mean given y and gamma, and as eps_base
        is linear in eps, E_eps ||eps - eps_base||^2 = sum_j (1 - k_j sigma)^2 + k_j^2 alpha^2 (y_j - m_j)^2
        exactly. Where the network adds little to the base (low noise on a smooth density) the
        chi-square noise of ||eps||^2 cancels: 4-6x less spread in the toy-data ledgers. Both have
        the same gradient in the network's parameters."""
        eps = torch.randn(*gamma.shape, self.dim, device=y.device)
        alpha, sigma = alpha_sigma(gamma[..., None])
        z = alpha * y + sigma * eps
        if self.kind != "continuous":
            sq_err = (eps - self.predict_eps(z, gamma)).pow(2).sum(-1)
            return sq_err, sq_err
        k = self.gaussian_gain(alpha, sigma)
        base_error = eps - k * (z - alpha * self.data_mean)
        sq_err = (base_error - alpha * self.denoiser(z, self.noise_level(gamma))).pow(2).sum(-1)
        base_mean = ((1 - k * sigma) ** 2 + (k * alpha) ** 2 * (y - self.data_mean) ** 2).sum(-1)
        return sq_err, sq_err - base_error.pow(2).sum(-1) + base_mean

    # --- the pieces of P and Q -------------------------------------------------------------

    def reverse_logvar(self, gamma_s: Tensor, gamma_t: Tensor) -> Tensor:
        """log var of p(z_s | z_t): Ho's beta_t = 1 - alpha_t^2/alpha_s^2 for continuous data,
        the posterior's sigma_s^2 c for discrete data (module docstring)."""
        if self.kind == "continuous":
            # log alpha^2 = -softplus(gamma): no cancellation in 1 - alpha_t^2/alpha_s^2
            return torch.log(-torch.expm1(F.softplus(gamma_s) - F.softplus(gamma_t)))
        return F.logsigmoid(gamma_s) + torch.log(-torch.expm1(gamma_s - gamma_t))

    def reverse(self, z_t: Tensor, eps_hat: Tensor, gamma_s: Tensor, gamma_t: Tensor) -> tuple[Tensor, Tensor]:
        """p(z_s | z_t) = N(mean of q(z_s | z_t, y_hat), exp(reverse_logvar)),
        y_hat = (z_t - sigma_t eps_hat) / alpha_t."""
        alpha_t, sigma_t = alpha_sigma(gamma_t)
        mean, _ = posterior((z_t - sigma_t * eps_hat) / alpha_t, z_t, gamma_s, gamma_t)
        return mean, self.reverse_logvar(gamma_s, gamma_t).expand_as(mean)

    def prior(self, y: Tensor) -> Tensor:
        """KL(q(z_last | x) || N(0, I)) = KL(N(alpha y, sigma^2 I) || N(0, I)) per example."""
        gamma_last = self.endpoints()[1]
        alpha, _ = alpha_sigma(gamma_last)
        return kl_normal_std_normal(alpha * y, F.logsigmoid(gamma_last).expand_as(y))

    def reconstruction(self, x: Tensor) -> Tensor:
        """-E log p(x | z_first) per example, with z_first/alpha = y + s eps, s = exp(gamma_first/2).

        continuous: -log N(x; z/alpha, s^2 I) has expectation equal to that Gaussian's entropy,
        0.5 D (log 2 pi e + gamma_first), used exactly. discrete: the mass of bin [y - h, y + h]
        (h = 1/(L-1)) under N(y + s eps, s^2) depends on eps alone, Phi(h/s - eps) - Phi(-h/s - eps),
        or Phi(h/s -+ eps) for the two outer bins, open on one side; so the expectation over eps is
        computed once, by Gauss-Hermite quadrature, and each example pays it per dimension according
        to its bin: exact up to the quadrature (the integrands are smooth), no sampling noise.
        """
        gamma_first = self.endpoints()[0]
        if self.kind == "continuous":
            entropy = torch.distributions.Normal(torch.zeros_like(gamma_first), (0.5 * gamma_first).exp()).entropy()
            return (self.dim * entropy).expand(len(x))
        half_bin = torch.full((2, QUADRATURE_NODES, 1), 1 / (self.levels - 1), device=x.device)
        lower = torch.stack([-half_bin[0], torch.full_like(half_bin[1], -math.inf)])  # interior bin, outer bin
        y_hat = (0.5 * gamma_first).exp() * self.quadrature_eps[:, None]  # (K, 1), the bin centred at 0
        log_mass = log_discretized_normal(lower, half_bin, y_hat.expand_as(half_bin), gamma_first.expand_as(half_bin))
        # expected -log mass per dimension; 0.0 - (not unary minus) keeps an exact 0 from becoming -0.0
        interior, outer = 0.0 - (self.quadrature_weights * log_mass).sum(-1)
        outer_dims = ((x == 0) | (x == self.levels - 1)).sum(-1)
        return outer_dims * outer + (self.dim - outer_dims) * interior

    # --- what the training loop and the evaluation call -------------------------------------

    def terms(self, x: Tensor, u: Tensor, simple: bool = False) -> tuple[dict[str, Tensor], Tensor]:
        """The ledger terms per example with the diffusion term at times u (S, B), and the
        squared noise errors ||eps - eps_hat||^2 at those times (S, B); simple: the times also
        serve L_simple (see diffusion_term)."""
        y = self.to_model_units(x)
        diffusion, sq_err = self.diffusion_term(y, u, simple)
        terms = {"prior": self.prior(y), "diffusion": diffusion.mean(0), "reconstruction": self.reconstruction(x)}
        return terms, sq_err

    def loss(self, x: Tensor, batch_index: int, num_batches: int,
             progress: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        """Training objective (scalar: the bound, or L_simple) and the unweighted per-example
        ledger terms with one antithetic time per example. The batch position is unused."""
        u = antithetic_times(len(x), (), x.device)[None]  # (1, B): stratified across the batch
        simple = self.config.objective == "simple"
        terms, sq_err = self.terms(x, u, simple)
        if simple:
            objective = sq_err.mean() / self.dim
        else:
            objective = sum(terms.values()).mean()
        return objective, {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def ledger_terms(self, x: Tensor, samples: int) -> dict[str, Tensor]:
        """Unweighted terms per example, the diffusion term from `samples` antithetic times each."""
        terms, _ = self.terms(x, antithetic_times(samples, (len(x),), x.device))
        return terms

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """x ~ p(z_last) prod p(z_s | z_t) p(x | z_first), ancestral on sampling_gammas(): (n, D)."""
        gammas = self.sampling_gammas()  # decreasing, from gamma_last to gamma_first
        z = torch.randn(n, self.dim, device=gammas.device)
        for gamma_t, gamma_s in zip(gammas[:-1], gammas[1:]):
            mean, logvar = self.reverse(z, self.predict_eps(z, gamma_t.expand(n)), gamma_s, gamma_t)
            z = mean + (0.5 * logvar).exp() * torch.randn_like(z)
        alpha, _ = alpha_sigma(gammas[-1])
        y = z / alpha + (0.5 * gammas[-1]).exp() * torch.randn_like(z)  # a draw from the decoder's Gaussian
        return self.to_data_units(y)
