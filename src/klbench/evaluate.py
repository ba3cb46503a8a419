"""Held-out evaluation: the final ledger, its derived quantities and the family's diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from klbench.ledger import derived_quantities
from klbench.train import held_out_ledger

if TYPE_CHECKING:
    from klbench.config import EvalConfig
    from klbench.data import Dataset
    from klbench.models.family import Family


@dataclass
class Evaluation:
    ledger: dict[str, Any]  # {"terms", "derived", "diagnostics"} for ledger.json
    curves: dict[str, list[float]]


def evaluate(model: nn.Module, family: Family, dataset: Dataset, config: EvalConfig, out_dir: Path,
             model_config: Any) -> Evaluation:
    """Final held-out ledger (with config.samples draws per example) + derived + diagnostics.
    out_dir is the folder for the files the family's diagnostics add to the run directory."""
    model.eval()
    ledger = held_out_ledger(model, family.inputs(dataset, "test", model_config), samples=config.samples)
    diagnostics = family.diagnose(model, dataset, ledger, config, out_dir)
    entropy: float | Tensor | None = None
    if family.density:  # the data entropy is of x: it bounds a density model's neg_elbo, not a classifier's
        entropy = dataset.entropy
        if dataset.log_density is not None:
            entropy = -dataset.log_density(dataset.x_test).to(ledger.neg_elbo.dtype)
    # bits per dimension are a unit of density models of x; a classifier's nll is of y
    per_dim = dataset.image_like and family.density
    derived = derived_quantities(ledger.neg_elbo, dataset.dim, per_dim, entropy, diagnostics.nll_bound)
    if dataset.entropy is not None:
        derived["data_entropy_true"] = dataset.entropy
    if family.density and dataset.kind == "continuous":
        derived["gaussian_fit_nll"] = gaussian_fit_nll(dataset.x_train, dataset.x_test)
    means = ledger.means()
    return Evaluation(
        {"terms": {name: means[name] for name in ledger.terms}, "derived": derived, "diagnostics": diagnostics.values},
        diagnostics.curves,
    )


def gaussian_fit_nll(x_train: Tensor, x_test: Tensor) -> float:
    """The reference a density model must beat: -mean log N(x_test; mu, Sigma), nats per example,
    with mu and Sigma the maximum-likelihood fit (mean, biased covariance) to x_train."""
    x_train, x_test = x_train.double(), x_test.double()
    mu = x_train.mean(0)
    sigma = torch.atleast_2d(torch.cov(x_train.T, correction=0))
    fit = torch.distributions.MultivariateNormal(mu, covariance_matrix=sigma)
    return -fit.log_prob(x_test).mean().item()
