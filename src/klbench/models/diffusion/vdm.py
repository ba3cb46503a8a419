"""VDM (Kingma et al. 2021): the continuous-time process and its fixed or learned schedule.

Continuous time t in [0, 1], gamma(t) = gamma_0 + (gamma_1 - gamma_0) shape(t) with shape
increasing from 0 to 1; "fixed": shape(t) = t and (gamma_0, gamma_1) = (gamma_min, gamma_max);
"learned": learned endpoints and a monotone network shape (see LearnedGamma). The continuous-time
loss depends on the schedule only through its endpoints (Kingma et al.), so, as they do, the
shape is fitted to minimise the variance of the estimator: the gradient reaching it is that of
the squared diffusion term, d/d eta E[L^2] = E[2 L dL/d eta], while the endpoints and the network
get the gradient of the bound.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klbench.models.diffusion.process import Diffusion

if TYPE_CHECKING:
    from klbench.models.diffusion import Config

SCHEDULE_UNITS = 64  # sigmoid units of the learned monotone schedule


def inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


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


class VDM(Diffusion):
    """Continuous time with a fixed or learned gamma(t) (module docstring)."""

    def __init__(self, config: Config, x_train: Tensor, kind: str, levels: int | None):
        super().__init__(config, x_train, kind, levels)
        self.schedule = VDM_SCHEDULES[config.schedule](config.gamma_min, config.gamma_max)
        # the learned schedule's gradient hooks (diffusion_term) do not run under torch.func.vmap
        self.stackable = config.schedule == "fixed"

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
