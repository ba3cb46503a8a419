"""DDPM (Ho et al. 2020): the discrete-time chain of T steps.

T steps, z_first = z_1, z_last = z_T. beta_t is "linear" (Ho's 1e-4..0.02 for T = 1000,
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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from klbench.kl import kl_normal_normal
from klbench.models.diffusion.process import Diffusion, alpha_sigma, posterior

if TYPE_CHECKING:
    from klbench.models.diffusion import Config

MAX_BETA = 0.999  # no single step may destroy all the signal (the cosine schedule's last step would)
COSINE_OFFSET = 0.008


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
