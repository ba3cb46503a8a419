"""Diffusion models as a KL ledger: DDPM (Ho et al. 2020) and VDM (Kingma et al. 2021).

P (what we have) = p(x) q(z_first..z_last | x);  Q (what we want) = p(z_last) prod p(z_s | z_t) p(x | z_first).
Both processes are variance preserving and are written with gamma = -log SNR:

    q(z_t | x) = N(alpha_t y, sigma_t^2 I),  alpha_t^2 = sigmoid(-gamma_t),  sigma_t^2 = sigmoid(gamma_t),

y being the data in model units (below). Per example, in nats, summed over dimensions, unweighted:

    prior          = KL(q(z_last | x) || N(0, I))                                    closed form
    diffusion      = DDPM: sum_{t=2..T} KL(q(z_{t-1} | z_t, x) || p(z_{t-1} | z_t))   (Ho et al. eq. 5)
                     VDM:  0.5 E_{t~U(0,1)} gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2  (Kingma et al.'s
                           continuous-time loss, the T -> infinity limit of the sum)
    reconstruction = -E_{q(z_first | x)} log p(x | z_first)

DDPM: T steps, z_first = z_1, z_last = z_T. beta_t is "linear" (Ho's 1e-4..0.02 for T = 1000,
scaled by 1000/T so any T spans the same noise range; Nichol & Dhariwal 2021) or "cosine"
(alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + 0.008)/1.008 * pi/2), Nichol & Dhariwal eq. 17),
each beta_t clipped at 0.999; alpha_bar_t = prod_{s<=t} (1 - beta_s), gamma_t = log((1 - alpha_bar_t)/alpha_bar_t).
With c = 1 - SNR_t/SNR_s = -expm1(gamma_s - gamma_t) the forward posterior (Ho eq. 6-7) is

    q(z_s | z_t, x) = N(alpha_s ((1 - c) z_t / alpha_t + c y), sigma_s^2 c I)

and p(z_s | z_t) has the same mean with y replaced by y_hat = (z_t - sigma_t eps_hat) / alpha_t.
Its variance is Ho's sigma_t^2 = beta_t = 1 - alpha_t^2/alpha_s^2 for continuous data and
beta_tilde_t = sigma_s^2 c (the posterior's) for discrete data: at small t, beta_t is the exact
reverse variance where the density is locally flat, beta_tilde_t where x is determined by z_t.
The other choice costs a fixed amount in the first few steps however large T is: beta_tilde_t on
Gaussian data, 0.46 nats per dimension at T = 1000, tending to 0.5 * 0.5772 (Euler's constant).
The diffusion sum is estimated without bias by importance sampling: t is drawn with
p(t) = (gamma_t - gamma_{t-1}) / (gamma_T - gamma_1), uniform in log-SNR, and KL_t / p(t) averaged
over the draws. Where the data density is locally flat, KL_t ~ 0.5 D (gamma_t - gamma_{t-1}), so
this ratio is nearly constant; uniform t, whose (T - 1) KL_t grows like T/t at small t, has about
4x the standard deviation on Gaussian data. L_simple's own draws stay uniform in t (Ho's weighting), and its ledger
terms use them with p(t) = 1/(T - 1).

VDM: continuous time t in [0, 1], gamma(t) = gamma_0 + (gamma_1 - gamma_0) shape(t) with shape
increasing from 0 to 1; "fixed": shape(t) = t and (gamma_0, gamma_1) = (gamma_min, gamma_max);
"learned": learned endpoints and a monotone network shape (see LearnedGamma). The continuous-time
loss depends on the schedule only through its endpoints (Kingma et al.), so, as they do, the
shape is fitted to minimise the variance of the estimator: the gradient reaching it is that of
the squared diffusion term, d/d eta E[L^2] = E[2 L dL/d eta], while the endpoints and the network
get the gradient of the bound.

Times are antithetic (Kingma et al.'s low-discrepancy sampler): u_k = (u_0 + k/n) mod 1, one u_0
per set of n draws, so every draw is U[0, 1) and the n draws cover [0, 1) evenly; in training the
n draws are spread over the batch, in the ledger over the `samples` draws of each example.

Decoder p(x | z_first) (both processes): mean z/alpha = y + exp(gamma_first/2) eps and variance
sigma^2/alpha^2 = exp(gamma_first), without a network (as in VDM): at the first noise level
(exp(gamma_first/2) ~ 0.01 data units for DDPM-linear, 0.0013 for VDM) the optimal denoiser is the
identity to within the noise for a continuous density, and a discrete bin is >= 6 such widths.

Units (what the ledger's numbers mean):
- continuous data are modelled as they are (the datasets are on a unit scale: toy 2-D within
  +-2.5, mnist1d standardized), so no rescaling and no log-det term: the decoder is the Gaussian
  N(x; z/alpha, exp(gamma_first) I), reconstruction = its entropy 0.5 D (log 2 pi e + gamma_first),
  and neg_elbo bounds the differential entropy: kl_total = neg_elbo - H >= 0 in nats per example.
- binary and discrete data (integers 0..L-1, binary L = 2) map to y = 2x/(L-1) - 1 in [-1, 1] and
  the decoder is a discretized Gaussian (Ho et al. eq. 13): P(x) = mass of N(z/alpha, exp(gamma_first))
  on the bin [y - 1/(L-1), y + 1/(L-1)], the outer bins extended to +-inf. It is a probability of
  the integer data, so neg_elbo bounds -log P(x) in nats (no dequantization, no log L term) and
  bpd = neg_elbo / (D ln 2).

Denoiser eps_hat(z, gamma) = an analytic base + an MLP (a sinusoidal embedding of the noise level
added to every hidden layer; output layer initialised to zero). The MLP sees the noise level as
t/T in DDPM (Ho et al.; neighbouring steps stay neighbours even across the cosine schedule's
last, coarse step) and as (gamma - gamma_min)/(gamma_max - gamma_min) in VDM (Kingma et al.; a
function of the SNR, as the loss's invariance to the schedule requires). The base is the exact
denoiser for the training data's per-dimension statistics, so training starts from it and the
network learns the rest:
- continuous: eps_hat = sigma (z - alpha m) / (alpha^2 v + sigma^2) + alpha MLP: the base is the
  posterior mean E[eps | z] for y ~ N(m, diag v) with the training mean m and variance v. It is
  right at both ends (0 for a locally flat density at low noise; at high noise any density's
  E[eps | z] differs from it by O(alpha^2), hence the network's factor alpha), and a coarse DDPM
  step multiplies an error by SNR_s/SNR_t - 1 (about 1000 in the cosine schedule's last step).
- binary/discrete: the MLP gives logits over the L levels c_k of every dimension, added to
  log N(z; alpha c_k, sigma^2); y_hat = sum_k softmax_k c_k, eps_hat = (z - alpha y_hat) / sigma.
  The logits' bias starts at the training data's level log-frequencies (Laplace-smoothed), so the
  base is the exact denoiser for independent dimensions with those marginals. At low noise it is
  exact whatever the network does, where a plain eps-MLP would have to output (z - alpha x) / sigma
  to within a fraction of the noise.

Training objective: "vlb" = prior + diffusion + reconstruction (the ledger's own sum), or "simple"
= E ||eps - eps_hat||^2 / D at the sampled times (Ho's L_simple; VDM-fixed: the same up to a
constant factor). Samples: ancestral sampling with p(z_s | z_t) on `sample_steps` steps (DDPM:
the chain T -> 1 respaced to that many steps, Nichol & Dhariwal sec. 4; exact for >= T - 1).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klbench.config import EvalConfig
from klbench.kl import kl_normal_normal, kl_normal_std_normal, log_discretized_normal
from klbench.models.family import Diagnostics, Family, Figure, Rank, samples_run_figure
from klbench.models.likelihoods import KINDS
from klbench.plots import loss_curve_figure
from klbench.settings import setting

if TYPE_CHECKING:
    from klbench.data import Dataset
    from klbench.ledger import Ledger

SCHEDULES = {"ddpm": ("linear", "cosine"), "vdm": ("fixed", "learned")}
MAX_BETA = 0.999  # no single step may destroy all the signal (the cosine schedule's last step would)
COSINE_OFFSET = 0.008
SCHEDULE_UNITS = 64  # sigmoid units of the learned monotone schedule
QUADRATURE_NODES = 64  # Gauss-Hermite nodes of the discrete reconstruction term (reach |eps| ~ 15)


@dataclass(frozen=True)
class Config:
    """Hyperparameters of one diffusion variant."""

    process: Literal["ddpm", "vdm"] = setting(
        "ddpm", "ddpm: discrete time, T steps (Ho et al. 2020); vdm: continuous time (Kingma et al. 2021).")
    schedule: Literal["linear", "cosine", "fixed", "learned"] = setting(
        "linear", "Noise schedule. ddpm: linear (beta 1e-4..0.02 scaled by 1000/T) or cosine (Nichol & Dhariwal "
        "2021); vdm: fixed (gamma linear in t) or learned (endpoints and a monotone network; needs objective vlb).")
    timesteps: int = setting(1000, "T, the number of steps of ddpm (vdm is continuous-time and ignores it).",
                             minimum=2)
    objective: Literal["simple", "vlb"] = setting(
        "simple", "Training objective: simple = Ho's L_simple, mean ||eps - eps_hat||^2; vlb = the ledger's own "
        "sum (the bound). The ledger is the full bound either way.")
    hidden: list[int] = setting([128, 128, 128], "Hidden widths of the denoiser MLP (SiLU; the noise-level "
                                "embedding is added to every hidden layer).", minItems=1, items={"minimum": 1})
    time_embedding: int = setting(32, "Size of the sinusoidal embedding of the noise level (t/T for ddpm, "
                                  "normalized gamma for vdm).", minimum=2, multipleOf=2)
    gamma_min: float = setting(-13.3, "vdm: gamma = -log SNR at t = 0 (least noise; the learned schedule's "
                               "initial value).")
    gamma_max: float = setting(5.0, "vdm: gamma = -log SNR at t = 1 (most noise; the learned schedule's initial "
                               "value). Also bounds the log-SNR grid of the loss curve.")
    sample_steps: int = setting(50, "Denoising steps of the ancestral sampler behind samples.png (ddpm: the chain "
                                "T -> 1 respaced to this many steps, exact for >= T - 1).", minimum=1)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES[self.process]:
            raise ValueError(f"schedule of process {self.process!r} must be one of {SCHEDULES[self.process]}, "
                             f"got {self.schedule!r}")
        if self.schedule == "learned" and self.objective != "vlb":
            raise ValueError("objective must be 'vlb' with schedule 'learned' "
                             "(L_simple does not depend on the schedule)")
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"gamma_min must be < gamma_max, got {self.gamma_min} and {self.gamma_max}")


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


def inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


# --- noise schedules ---------------------------------------------------------------------------


def linear_betas(timesteps: int) -> Tensor:
    """beta_1..beta_T evenly spaced from 1e-4 to 0.02 times 1000/T (float64, (T,))."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=MAX_BETA)


def cosine_betas(timesteps: int) -> Tensor:
    """beta_t = 1 - alpha_bar(t)/alpha_bar(t-1) of the cosine alpha_bar, clipped (float64, (T,))."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)


BETAS = {"linear": linear_betas, "cosine": cosine_betas}


class FixedGamma(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t (Kingma et al. 2021's fixed linear schedule)."""

    def __init__(self, gamma_min: float, gamma_max: float):
        super().__init__()
        self.register_buffer("ends", torch.tensor([gamma_min, gamma_max]), persistent=False)

    def endpoints(self) -> tuple[Tensor, Tensor]:
        return self.ends[0], self.ends[1]

    def shape(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(shape(t), shape'(t)) = (t, 1)."""
        return t, torch.ones_like(t)


class LearnedGamma(nn.Module):
    """gamma(t) = gamma_0 + (gamma_1 - gamma_0) shape(t), increasing in t by construction.

    Endpoints: gamma_0 and gamma_1 = gamma_0 + softplus(rho), learned, starting at (gamma_min, gamma_max).
    Shape: shape(t) = (f(t) - f(0)) / (f(1) - f(0)) with f(t) = a t + sum_k c_k sigmoid(w_k (t - b_k))
    and a, c_k, w_k = softplus(raw) > 0, so f' > 0 (a small form of the monotone network of
    Kingma et al. 2021, appendix H). It starts near the fixed linear schedule.
    """

    def __init__(self, gamma_min: float, gamma_max: float, units: int = SCHEDULE_UNITS):
        super().__init__()
        self.gamma_0 = nn.Parameter(torch.tensor(gamma_min))
        self.raw_span = nn.Parameter(torch.tensor(inverse_softplus(gamma_max - gamma_min)))
        self.raw_slope = nn.Parameter(torch.tensor(inverse_softplus(1.0)))
        self.raw_heights = nn.Parameter(torch.full((units,), -5.0))
        self.raw_rates = nn.Parameter(torch.full((units,), inverse_softplus(10.0)))
        self.centers = nn.Parameter(torch.linspace(0, 1, units))

    def endpoints(self) -> tuple[Tensor, Tensor]:
        return self.gamma_0, self.gamma_0 + F.softplus(self.raw_span)

    def _f(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """f(t) and f'(t), (...,) each."""
        slope, heights, rates = F.softplus(self.raw_slope), F.softplus(self.raw_heights), F.softplus(self.raw_rates)
        s = torch.sigmoid(rates * (t[..., None] - self.centers))  # (..., K)
        return slope * t + (heights * s).sum(-1), slope + (heights * rates * s * (1 - s)).sum(-1)

    def shape(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(shape(t), shape'(t)), (...,) each."""
        f, df = self._f(t)
        ends, _ = self._f(torch.tensor([0.0, 1.0], device=t.device))
        span = ends[1] - ends[0]
        return (f - ends[0]) / span, df / span


VDM_SCHEDULES = {"fixed": FixedGamma, "learned": LearnedGamma}


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

    def loss(self, x: Tensor, batch_index: int, num_batches: int) -> tuple[Tensor, dict[str, Tensor]]:
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


class DDPM(Diffusion):
    """Discrete time: T steps of a fixed beta schedule (module docstring)."""

    def __init__(self, config: Config, x_train: Tensor, kind: str, levels: int | None):
        log_alpha_bar = torch.cumsum(torch.log1p(-BETAS[config.schedule](config.timesteps)), 0)
        gamma = torch.log(-torch.expm1(log_alpha_bar)) - log_alpha_bar  # (T,) for t = 1..T, in float64
        super().__init__(config, x_train, kind, levels)
        # indexed by t; t = 0 (no noise, gamma = -inf) is never used
        self.register_buffer("gamma", torch.cat([gamma.new_tensor([-math.inf]), gamma]).float(), persistent=False)
        step_prob = (gamma[1:] - gamma[:-1]) / (gamma[-1] - gamma[0])  # p(t) for t = 2..T, uniform in log-SNR
        self.register_buffer("step_prob", step_prob.float(), persistent=False)
        self.register_buffer("step_cdf", torch.cumsum(step_prob, 0).float(), persistent=False)

    def endpoints(self) -> tuple[Tensor, Tensor]:
        return self.gamma[1], self.gamma[-1]

    def noise_level(self, gamma: Tensor) -> Tensor:
        """t/T, with t found in the gamma table (every gamma a DDPM evaluates is one of its entries)."""
        return torch.searchsorted(self.gamma, gamma.contiguous()).float() / self.config.timesteps

    def kl_step(self, sq_err: Tensor, t: Tensor) -> Tensor:
        """KL(q(z_{t-1} | z_t, x) || p(z_{t-1} | z_t)) per example, nats, from ||eps - eps_hat||^2 (...,)
        at steps t >= 2 (...,). The means differ by alpha_s c (sigma_t/alpha_t) (eps_hat - eps), so
        (Ho et al. eq. 12, any reverse variance sigma_p^2)

            KL = KL(N(0, sigma_q^2 I) || N(0, sigma_p^2 I))
                 + 0.5 (alpha_s c sigma_t / alpha_t)^2 / sigma_p^2 ||eps - eps_hat||^2.
        """
        gamma_s, gamma_t = self.gamma[t - 1][..., None], self.gamma[t][..., None]  # (..., 1)
        zeros = torch.zeros(*t.shape, self.dim, device=t.device)
        _, logvar_q = posterior(zeros, zeros, gamma_s, gamma_t)
        logvar_p = self.reverse_logvar(gamma_s, gamma_t).expand_as(logvar_q)
        variance_term = kl_normal_normal(zeros, logvar_q, zeros, logvar_p)
        (alpha_s, _), (alpha_t, sigma_t) = alpha_sigma(gamma_s), alpha_sigma(gamma_t)
        mean_gain = alpha_s * -torch.expm1(gamma_s - gamma_t) * sigma_t / alpha_t
        return variance_term + 0.5 * (mean_gain.pow(2) / logvar_p[..., 0:1].exp())[..., 0] * sq_err

    def step_loss(self, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """KL_t at steps t >= 2 (...,) with z_t ~ q(z_t | x) (the bound's estimate), and ||eps - eps_hat||^2."""
        sq_err, sq_err_bound = self.noise_errors(y, self.gamma[t])
        return self.kl_step(sq_err_bound, t), sq_err

    def draw_steps(self, u: Tensor, simple: bool) -> tuple[Tensor, Tensor]:
        """Steps t = F^-1(u) in 2..T and their probabilities p(t), F the CDF of p: uniform in
        log-SNR, or uniform in t where the draws also serve L_simple. u (...,) -> (...,) twice."""
        steps = self.config.timesteps - 1
        if simple:
            index = (u * steps).long().clamp(max=steps - 1)
            return 2 + index, torch.full_like(u, 1 / steps)
        index = torch.searchsorted(self.step_cdf, u.contiguous(), right=True).clamp(max=steps - 1)
        return 2 + index, self.step_prob[index]

    def diffusion_term(self, y: Tensor, u: Tensor, simple: bool) -> tuple[Tensor, Tensor]:
        """KL_t / p(t) at the steps drawn from u (S, B): unbiased for sum_{t=2..T} KL_t.
        Also returns ||eps - eps_hat||^2, (S, B) each."""
        t, prob = self.draw_steps(u, simple)
        kl, sq_err = self.step_loss(y, t)
        return kl / prob, sq_err

    def sampling_gammas(self) -> Tensor:
        steps = min(self.config.sample_steps, self.config.timesteps - 1)
        t = torch.linspace(self.config.timesteps, 1, steps + 1).round().long().unique().flip(0)
        return self.gamma[t.to(self.gamma.device)]

    @torch.no_grad()
    def loss_curve(self, x: Tensor, points: int) -> dict[str, Tensor]:
        """KL_t, nats per example, at `points` steps t evenly spaced over 2..T (one draw per example)."""
        y = self.to_model_units(x)
        t = torch.linspace(2, self.config.timesteps, points).round().long().unique().to(x.device)
        loss = torch.stack([self.step_loss(y, step.expand(len(x)))[0].mean() for step in t])
        return {"t": t, "log_snr": -self.gamma[t], "loss": loss}


class VDM(Diffusion):
    """Continuous time with a fixed or learned gamma(t) (module docstring)."""

    def __init__(self, config: Config, x_train: Tensor, kind: str, levels: int | None):
        super().__init__(config, x_train, kind, levels)
        self.schedule = VDM_SCHEDULES[config.schedule](config.gamma_min, config.gamma_max)

    def endpoints(self) -> tuple[Tensor, Tensor]:
        return self.schedule.endpoints()

    def noise_level(self, gamma: Tensor) -> Tensor:
        return (gamma - self.config.gamma_min) / (self.config.gamma_max - self.config.gamma_min)

    def gamma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """gamma(t) and gamma'(t), (...,) each."""
        return self.gamma_of_shape(*self.schedule.shape(t))

    def gamma_of_shape(self, shape: Tensor, slope: Tensor) -> tuple[Tensor, Tensor]:
        gamma_0, gamma_1 = self.endpoints()
        return gamma_0 + (gamma_1 - gamma_0) * shape, (gamma_1 - gamma_0) * slope

    def diffusion_term(self, y: Tensor, u: Tensor, simple: bool) -> tuple[Tensor, Tensor]:
        """0.5 gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2 at t = u (S, B): unbiased for the
        continuous-time loss. Also returns ||eps - eps_hat||^2. t is
        uniform also for L_simple (`simple` changes nothing)."""
        shape, slope = self.schedule.shape(u)
        gamma_t, dgamma_t = self.gamma_of_shape(shape, slope)
        sq_err, sq_err_bound = self.noise_errors(y, gamma_t)
        diffusion = 0.5 * dgamma_t * sq_err_bound
        if shape.requires_grad:
            # The schedule's shape gets d E[L^2] instead of d E[L] (zero in expectation): per example,
            # the gradient of the mean bound reaching it is scaled by 2 L (module docstring).
            factor = 2 * diffusion.detach()
            shape.register_hook(lambda grad: grad * factor)
            slope.register_hook(lambda grad: grad * factor)
        return diffusion, sq_err

    def sampling_gammas(self) -> Tensor:
        device = self.denoiser.out.weight.device
        return self.gamma(torch.linspace(1, 0, self.config.sample_steps + 1, device=device))[0]

    @torch.no_grad()
    def loss_curve(self, x: Tensor, points: int) -> dict[str, Tensor]:
        """0.5 E||eps - eps_hat||^2 at `points` log-SNRs evenly spaced over [-gamma_max, -gamma_min]
        (the config's, so the grid is the same for every run): the diffusion loss per unit of
        log-SNR, in nats per example, whatever the schedule (one draw per example)."""
        y = self.to_model_units(x)
        log_snr = torch.linspace(-self.config.gamma_max, -self.config.gamma_min, points, device=x.device)
        loss = torch.stack([0.5 * self.noise_errors(y, -value.expand(len(x)))[1].mean() for value in log_snr])
        return {"log_snr": log_snr, "loss": loss}


PROCESSES = {"ddpm": DDPM, "vdm": VDM}


def build(config: Config, dataset: Dataset) -> Diffusion:
    return PROCESSES[config.process](config, dataset.x_train, dataset.kind, dataset.levels)


# --- diagnostics -------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluate(EvalConfig):
    """The diffusion family's evaluation: its loss curve along the noise schedule."""

    curve_points: int = setting(32, "Points of the fixed grid of the loss curve (per timestep / per log-SNR).",
                                minimum=2)


# Held-out examples of the diffusion loss curve: one network pass of this many rows per grid point.
CURVE_EXAMPLES = 500
# grid variable of a diffusion loss curve -> (x label, y label) of its figure
CURVE_AXES = {
    "t": ("timestep $t$", "KL$(q(z_{t-1}|z_t,x)\\,\\|\\,p(z_{t-1}|z_t))$\n(nats per example)"),
    "log_snr": ("log-SNR $\\lambda = -\\gamma$",
                "$\\frac{1}{2}\\,E\\,\\|\\epsilon - \\hat\\epsilon\\|^2$\n(nats per example per unit log-SNR)"),
}


@torch.no_grad()
def diagnose(model: Diffusion, dataset: Dataset, ledger: Ledger, config: Evaluate, out_dir: Path) -> Diagnostics:
    """The diffusion loss on a fixed grid of config.curve_points, on the first CURVE_EXAMPLES
    held-out examples (one noise draw each): DDPM's KL_t per timestep t (the ledger's diffusion
    term is their sum over t = 2..T), VDM's 0.5 E||eps - eps_hat||^2 per unit log-SNR over the
    config's [-gamma_max, -gamma_min] (the term is its integral over the schedule's range).
    Writes loss_curve.csv (grid variable(s), then loss in nats) and loss_curve.png.

    values: the schedule's log-SNR range (log_snr_max at the first noise level, log_snr_min at
    the last), and diffusion_se, the standard error of the ledger's diffusion term over the
    held-out examples, an upper bound on its Monte Carlo error (the spread between examples
    counts in it too).
    """
    x = dataset.x_test[:CURVE_EXAMPLES]
    columns = {name: values.numpy() for name, values in model.loss_curve(x, config.curve_points).items()}
    grid = next(iter(columns))
    with (out_dir / "loss_curve.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(columns))
        writer.writerows(zip(*(values.tolist() for values in columns.values())))
    diffusion = ledger.terms["diffusion"].double()
    gamma_first, gamma_last = (value.item() for value in model.endpoints())
    process = f"{model.config.process}-{model.config.schedule}"
    summary = (f"{len(x)} held-out examples, one draw each; "
               f"ledger diffusion term {diffusion.mean().item():.3f} nats per example")
    loss_curve_figure(columns[grid], columns["loss"], *CURVE_AXES[grid], summary,
                      f"{dataset.name}: {process} diffusion loss", out_dir / "loss_curve.png")
    values = {"log_snr_max": -gamma_first, "log_snr_min": -gamma_last,
              "diffusion_se": (diffusion.std() / math.sqrt(len(diffusion))).item(), "curve_examples": len(x)}
    return Diagnostics(values, curves={f"loss_per_{grid}": columns["loss"].tolist()})


FAMILY = Family(
    name="diffusion",
    terms=("prior", "diffusion", "reconstruction"),
    data_kinds=KINDS,
    targets=None,
    ranks=(Rank("density", "neg_elbo"),),
    config=Config,
    evaluate=Evaluate,
    build=build,
    diagnose=diagnose,
    run_figure=samples_run_figure,
    figures=(Figure("diffusion_curves", "curves", {
        "file": "loss_curve.csv",
        # the grid variable of a loss_curve.csv, preferred first: DDPM's KL_t per step and VDM's loss
        # per unit log-SNR are different quantities and must not share an axis
        "grids": {"t": ["timestep t", "KL_t (nats per example, per step)"],
                  "log_snr": ["log-SNR  λ = log(α²/σ²)", "nats per example per unit log-SNR"]},
        "title": "Diffusion loss along the noise schedule (test set)",
        "caption": ("Per-example diffusion loss along each model's noise grid (line: mean over seeds, band: seed "
                    "range): where a curve is high is where the model pays most of its diffusion-term nats. DDPM "
                    "panels show KL_t per timestep t, VDM panels the loss per unit log-SNR; their areas, not "
                    "their heights, compare.")}),),
)

