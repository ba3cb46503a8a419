"""Held-out evaluation: the final ledger, its derived quantities and family diagnostics."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from klbench.config import EvalConfig
from klbench.ledger import Ledger, derived_quantities
from klbench.train import held_out_ledger

if TYPE_CHECKING:
    from klbench.data import Dataset

# Examples per IWAE batch are chosen so that k * batch stays under this many decoder rows:
# larger batches only add memory traffic (k = 1024 on 2000 examples would be ~1 GB per layer).
IWAE_ROWS = 65_536
ACTIVE_UNIT_THRESHOLD = 0.01


@torch.no_grad()
def iwae_bounds(model: nn.Module, x: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
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
def mutual_information(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Rate split into mutual information and marginal KL (Hoffman & Johnson 2016):

        rate = E_x KL(e(z|x) || m(z)) = I(X;Z) + KL(e(z) || m(z)),
        I = E[log e(z|x) - log e(z)],  marginal KL = E[log e(z) - log m(z)],

    with the aggregate posterior e(z) = (1/N) sum_n e(z|x_n) over the whole held-out set
    and one z ~ e(z|x_n) per example. Both use the same draws, so I + marginal KL equals
    the Monte Carlo rate `rate_mc` exactly. The estimate of I cannot exceed log N.
    """
    from klbench.kl import log_normal_diag

    y = model.observe(x)
    mu, logvar = model.encode(y)
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


@dataclass
class Diagnostics:
    """What a family's evaluation adds to its ledger.

    values: numbers (nested dicts allowed) for ledger.json's "diagnostics" and MLflow.
    nll_bound: a per-example bound on -log q(x) tighter than the ELBO, for the first
        n <= N held-out examples (gives inference_gap / model_gap), or None.
    curves: name -> values on a fixed grid (e.g. the loss per log-SNR), logged to MLflow
        with step = grid index; the family also writes them as CSV into the run directory.
    """

    values: dict[str, Any]
    nll_bound: Tensor | None = None
    curves: dict[str, list[float]] = field(default_factory=dict)


def vae_diagnostics(model: nn.Module, dataset: Dataset, ledger: Ledger, config: EvalConfig, out_dir: Path) -> Diagnostics:
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


# family name -> diagnostics(model, dataset, ledger, config, out_dir), where out_dir is the
# run's staging folder for any files (CSV, figures) the family adds to the run directory.
DIAGNOSTICS: dict[str, Callable[[nn.Module, Dataset, Ledger, EvalConfig, Path], Diagnostics]] = {
    "vae": vae_diagnostics,
}


def split_tensors(family: ModuleType, dataset: Dataset, split: str) -> tuple[Tensor, ...]:
    """The batch tensors of one split: (x,) or, for a supervised family, (x, y)."""
    x = getattr(dataset, f"x_{split}")
    return (x, getattr(dataset, f"y_{split}")) if family.SUPERVISED else (x,)


@dataclass
class Evaluation:
    ledger: dict[str, Any]  # {"terms", "derived", "diagnostics"} for ledger.json
    curves: dict[str, list[float]]


def evaluate(model: nn.Module, family: ModuleType, dataset: Dataset, config: EvalConfig, out_dir: Path) -> Evaluation:
    """Final held-out ledger (with config.samples draws per example) + derived + diagnostics."""
    model.eval()
    ledger = held_out_ledger(model, split_tensors(family, dataset, "test"), samples=config.samples)
    diagnostics = DIAGNOSTICS[family.FAMILY](model, dataset, ledger, config, out_dir)
    entropy: float | Tensor | None = dataset.entropy
    if dataset.log_density is not None and not family.SUPERVISED:
        entropy = -dataset.log_density(dataset.x_test).to(ledger.neg_elbo.dtype)
    # bits per dimension are a unit of density models of x; a classifier's nll is of y
    per_dim = dataset.image_like and not family.SUPERVISED
    derived = derived_quantities(ledger.neg_elbo, dataset.dim, per_dim, entropy, diagnostics.nll_bound)
    if dataset.entropy is not None:
        derived["data_entropy_true"] = dataset.entropy
    means = ledger.means()
    return Evaluation(
        {"terms": {name: means[name] for name in ledger.terms}, "derived": derived, "diagnostics": diagnostics.values},
        diagnostics.curves,
    )
