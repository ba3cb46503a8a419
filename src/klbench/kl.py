"""KL divergences: closed forms for the pairs klbench uses, and a Monte Carlo estimator.

Every function returns nats, summed over the event dimensions (the last axis), one value
per example: shape (B,) for inputs of shape (B, D). The closed forms are written on raw
tensors (no Distribution objects) because they sit on the training hot path; the tests
check each one against `torch.distributions.kl_divergence` and against Monte Carlo.
Where no closed form exists (a mixture prior, say), models call `monte_carlo_kl`.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor


def kl_normal_std_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)).

    KL = 0.5 * sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)
    (Kingma & Welling 2014, appendix B).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def kl_normal_normal(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, diag(var_q)) || N(mu_p, diag(var_p))), both diagonal.

    KL = 0.5 * sum_j (log var_p - log var_q + (var_q + (mu_q - mu_p)^2) / var_p - 1)
    """
    logdet_term = logvar_p - logvar_q
    trace_term = (logvar_q - logvar_p).exp()
    mahalanobis_term = (mu_q - mu_p).pow(2) / logvar_p.exp()
    return 0.5 * (logdet_term + trace_term + mahalanobis_term - 1.0).sum(-1)


def kl_bernoulli(logits_q: Tensor, logits_p: Tensor) -> Tensor:
    """KL(Bern(q) || Bern(p)) summed over independent dimensions, with q, p given as logits.

    KL = sum_j q_j (log q_j - log p_j) + (1 - q_j) (log(1 - q_j) - log(1 - p_j)),
    written with logsigmoid so that saturated logits stay finite.
    """
    q = torch.sigmoid(logits_q)
    log_q, log_not_q = torch.nn.functional.logsigmoid(logits_q), torch.nn.functional.logsigmoid(-logits_q)
    log_p, log_not_p = torch.nn.functional.logsigmoid(logits_p), torch.nn.functional.logsigmoid(-logits_p)
    return (q * (log_q - log_p) + (1.0 - q) * (log_not_q - log_not_p)).sum(-1)


def kl_categorical(logits_q: Tensor, logits_p: Tensor) -> Tensor:
    """KL(Cat(q) || Cat(p)) over the last axis (the categories): sum_k q_k (log q_k - log p_k)."""
    log_q = torch.log_softmax(logits_q, -1)
    log_p = torch.log_softmax(logits_p, -1)
    # 0 * log 0 = 0: categories with q_k = 0 contribute nothing even where p_k = 0.
    return torch.where(log_q.exp() > 0, log_q.exp() * (log_q - log_p), torch.zeros_like(log_q)).sum(-1)


def log_normal_diag(x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mu, diag(exp(logvar))), summed over the last axis."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mu).pow(2) / logvar.exp()).sum(-1)


def log_discretized_normal(lower: Tensor, upper: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log P(lower < v < upper) for v ~ N(mu, diag(exp(logvar))), summed over the last axis.

    The bin masses of a discretized Gaussian decoder (Ho et al. 2020, eq. 13). lower may be -inf
    and upper +inf (the outer bins), never both; the edges carry no gradient. With a, b the
    standardized edges, log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))),
    for bins above the mean computed as the mirror bin (-b, -a) below it: log_ndtr is exact far in
    the lower tail, where 1 - Phi would round to 0. No clamping, so the result is a true log mass.
    """
    open_below, open_above = torch.isinf(lower), torch.isinf(upper)
    # finite stand-ins for infinite edges keep the arithmetic (and its gradient) finite; masked below
    lower, upper = torch.where(open_below, upper - 1, lower), torch.where(open_above, lower + 1, upper)
    inv_std = (-0.5 * logvar).exp()
    a, b = (lower - mu) * inv_std, (upper - mu) * inv_std
    mirror = open_above | (~open_below & (a + b > 0))  # after mirroring only the lower edge can be open
    lo, hi = torch.where(mirror, -b, a), torch.where(mirror, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo).masked_fill(open_below | open_above, -math.inf)
    return (log_hi + torch.log(-torch.expm1(log_lo - log_hi))).sum(-1)


def monte_carlo_kl(
    sample_q: Callable[[int], Tensor],
    log_q: Callable[[Tensor], Tensor],
    log_p: Callable[[Tensor], Tensor],
    num_samples: int,
) -> Tensor:
    """Unbiased estimate of KL(q || p) = E_q[log q(z) - log p(z)] from `num_samples` draws.

    `sample_q(S)` returns S reparameterized draws (S, B, D); `log_q` / `log_p` map them to
    log densities (S, B). Returns (B,): the mean over draws. It can be negative by noise.
    """
    z = sample_q(num_samples)
    return (log_q(z) - log_p(z)).mean(0)
