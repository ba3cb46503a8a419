"""d(x | h): a decoder's distribution of the data given its network's output h, for every data kind.

Shared by the families that decode x (the VAE, the semi-supervised VAE):
- binary: Bernoulli with logits h.
- continuous: Gaussian with mean h and a learned std: per dimension or one shared value, or
  amortized, a function of the decoder's input (h = [mean, log std], as the Gaussian MLP
  decoder of Kingma & Welling 2014), so the distortion is a proper negative log-density.
- discrete (integers 0..L-1): uniform dequantization y = (x + u) / L, u ~ U[0,1)^D, and a
  Gaussian on y. Then -log P(x) <= E_u[-log p(y)] + D log L (Theis et al. 2016), so the
  negative log-likelihood includes the D log L term and bounds -log P of the discrete data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from klbench.kl import log_normal_diag

KINDS = ("continuous", "binary", "discrete")
SCALES = ("diagonal", "isotropic", "amortized")
# Keep exp(logvar) finite in float32 early in training; no trained model comes near these.
LOGVAR_MIN, LOGVAR_MAX = -14.0, 10.0


ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh}


def mlp(sizes: list[int], activation: str = "silu") -> nn.Sequential:
    """Linear layers with an activation (SiLU, or tanh as in Burda et al. 2016) between them
    (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class DataLikelihood(nn.Module):
    """-log d(x | h) and draws from it, for data of one kind with D dimensions (module docstring)."""

    def __init__(self, dim: int, kind: str, levels: int | None, scale: str = "diagonal"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"data kind must be one of {KINDS}, got {kind!r}")
        self.dim, self.kind, self.levels = dim, kind, levels
        self.amortized = scale == "amortized" and kind != "binary"
        if kind != "binary" and not self.amortized:
            self.log_scale = nn.Parameter(torch.zeros(dim if scale == "diagonal" else 1))

    @property
    def out_features(self) -> int:
        """Width of h, the decoder network's output: D, or 2D with an amortized std."""
        return 2 * self.dim if self.amortized else self.dim

    def _mean_log_scale(self, out: Tensor) -> tuple[Tensor, Tensor]:
        if self.amortized:
            mean, log_scale = out.chunk(2, dim=-1)
            return mean, log_scale
        return out, self.log_scale.expand_as(out)

    @torch.no_grad()
    def start_at_data_scale(self, last: nn.Linear, x_train: Tensor) -> None:
        """Start the decoder's std at the training data's, per dimension of the observed variable.

        Adam moves a parameter by about lr per step, so a log std that starts at 0 on data of
        std 0.1 needs some 2.3 / lr steps to get there, and until then the distortion is too weak
        against the rate. The VAE and M2 start here (m2.build: M2 then needs its labels to weigh
        more). `last` is the decoder's output layer (for an amortized std, the bias of its log-std
        half is set)."""
        if self.kind == "binary":
            return
        std = x_train.std(0)
        if self.kind == "discrete":
            # y = (x + u) / L: Var y = (Var x + 1/12) / L^2, never 0 (a constant pixel keeps u's)
            std = ((std**2 + 1 / 12) / self.levels**2).sqrt()
        log_std = std.clamp_min(math.exp(LOGVAR_MIN / 2)).log()
        if self.amortized:
            last.bias[self.dim:] = log_std
        elif self.log_scale.numel() == 1:
            self.log_scale.fill_(log_std.exp().pow(2).mean().sqrt().log())
        else:
            self.log_scale.copy_(log_std)

    def observe(self, x: Tensor) -> Tensor:
        """The variable the decoder models: x itself, or dequantized y = (x + u) / L."""
        if self.kind == "discrete":
            return (x + torch.rand_like(x)) / self.levels
        return x

    def nll(self, y: Tensor, out: Tensor) -> Tensor:
        """-log d(y | h = out) in nats, summed over data dims: out (..., B, D) -> (..., B).

        Computed as a negative log-likelihood directly (a BCE sum for binary data) rather
        than as the negation of log d: the training step runs no extra negations."""
        if self.kind == "binary":
            return nn.functional.binary_cross_entropy_with_logits(out, y.expand_as(out), reduction="none").sum(-1)
        mean, log_scale = self._mean_log_scale(out)
        neg_log_density = -log_normal_diag(y, mean, (2 * log_scale).clamp(LOGVAR_MIN, LOGVAR_MAX))
        if self.kind == "discrete":
            # change of variables from y in [0,1)^D back to integer units: p(x + u) = p(y) / L^D
            neg_log_density = neg_log_density + self.dim * math.log(self.levels)
        return neg_log_density

    def sample(self, out: Tensor) -> Tensor:
        """x ~ d(x | h) in data units: full draws for continuous data (the decoder noise is part
        of the density), means for images (the usual display)."""
        if self.kind == "binary":
            return torch.sigmoid(out)
        mean, log_scale = self._mean_log_scale(out)
        if self.kind == "discrete":
            return (mean * self.levels).clamp(0, self.levels - 1)
        std = (0.5 * (2 * log_scale).clamp(LOGVAR_MIN, LOGVAR_MAX)).exp()
        return mean + std * torch.randn_like(mean)
