"""Held-out evaluation: the final ledger, its derived quantities and family diagnostics."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from klbench.calibration import reliability_bins
from klbench.config import EvalConfig
from klbench.ledger import Ledger, derived_quantities
from klbench.plots import loss_curve_figure, predicted_vs_true_figure, predictive_band_figure, reliability_figure
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


# --- BBB ---------------------------------------------------------------------------------------

# One fixed permutation of pixel positions makes the out-of-distribution images of a classifier.
OOD_SHUFFLE_SEED = 0
# The predictive band: a grid over x and enough whole-network draws for a smooth mean and sd.
BAND_GRID_POINTS, BAND_SAMPLES = 300, 200


def predictive_log_lik(log_lik: Tensor) -> Tensor:
    """log p(y | x) = log (1/S) sum_s p(y | x, w_s) per example, from log_lik (S, N): (N,), float64."""
    log_lik = log_lik.double()
    return torch.logsumexp(log_lik, 0) - math.log(log_lik.shape[0])


def _classification_diagnostics(model: nn.Module, dataset: Dataset, out: Tensor, config: EvalConfig, title: str,
                                 out_dir: Path) -> dict[str, Any]:
    probs = out.softmax(-1).mean(0)  # (N, K): the predictive distribution, averaged over weight draws
    bins = reliability_bins(probs, dataset.y_test, config.ece_bins)
    permutation = torch.randperm(dataset.dim, generator=torch.Generator().manual_seed(OOD_SHUFFLE_SEED))
    probs_ood = model(dataset.x_test[:, permutation], config.samples).softmax(-1).mean(0)
    with (out_dir / "reliability.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["bin_lower", "bin_upper", "count", "accuracy", "confidence"])
        for row in zip(bins.edges[:-1].tolist(), bins.edges[1:].tolist(), bins.count.tolist(),
                       bins.accuracy.tolist(), bins.confidence.tolist()):
            writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    reliability_figure(bins.edges.numpy(), bins.count.numpy(), bins.accuracy.numpy(), bins.confidence.numpy(),
                       bins.ece, title, out_dir / "samples.png")
    return {
        "accuracy": (probs.argmax(-1) == dataset.y_test).double().mean().item(),
        "ece": bins.ece,
        "ece_bins": config.ece_bins,
        "entropy_in": torch.special.entr(probs).sum(-1).mean().item(),
        "entropy_ood": torch.special.entr(probs_ood).sum(-1).mean().item(),
        "entropy_max": math.log(probs.shape[-1]),
    }


def _regression_moments(f: Tensor, noise_var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From draws f(x, w_s) (S, N): the predictive mean, the variance from the weights alone,
    and the total variance Var_s f + s^2 (law of total variance), each (N,)."""
    var_weights = f.var(0, correction=0)
    return f.mean(0), var_weights, var_weights + noise_var


def _gaussian_entropy(var: Tensor) -> float:
    """Mean of 0.5 log(2 pi e var) over examples: the entropy of the moment-matched Gaussian,
    an upper bound on the entropy of the predictive mixture with that variance."""
    return (0.5 * torch.log(2 * math.pi * math.e * var)).mean().item()


def _regression_diagnostics(model: nn.Module, dataset: Dataset, out: Tensor, config: EvalConfig, title: str,
                            out_dir: Path) -> dict[str, Any]:
    noise_var = (2 * model.log_noise).exp()
    mean, _, var = _regression_moments(out[..., 0], noise_var)
    values = {"rmse": (mean - dataset.y_test).pow(2).mean().sqrt().item(), "noise_scale": noise_var.sqrt().item(),
              "entropy_in": _gaussian_entropy(var)}
    if dataset.x_ood is not None:
        out_ood = model(dataset.x_ood, config.samples)
        values["entropy_ood"] = _gaussian_entropy(_regression_moments(out_ood[..., 0], noise_var)[2])
        if dataset.y_ood is not None:
            values["ood_log_lik"] = predictive_log_lik(model.log_likelihood(out_ood, dataset.y_ood)).mean().item()
    if "y_std" in dataset.split:  # standardized targets: also in the data's own units, y_std * y + y_mean
        values["rmse_original"] = values["rmse"] * dataset.split["y_std"]
        test_log_lik = predictive_log_lik(model.log_likelihood(out, dataset.y_test)).mean().item()
        values["test_log_lik_original"] = test_log_lik - math.log(dataset.split["y_std"])
    _regression_figure(model, dataset, mean, var, noise_var, title, out_dir / "samples.png")
    return values


def _regression_figure(model: nn.Module, dataset: Dataset, mean: Tensor, var: Tensor, noise_var: Tensor,
                       title: str, path: Path) -> None:
    """The predictive band over x for 1-D inputs, else predicted vs true test targets
    (in original units where the targets were standardized)."""
    if dataset.dim == 1:
        inputs = torch.cat([x for x in (dataset.x_train, dataset.x_ood) if x is not None])
        grid = torch.linspace(inputs.min().item(), inputs.max().item(), BAND_GRID_POINTS)
        f = model(grid[:, None], BAND_SAMPLES, local_reparam=False)[..., 0]  # (S, G)
        grid_mean, grid_var_weights, grid_var = _regression_moments(f, noise_var)
        train = (dataset.x_train[:, 0].numpy(), dataset.y_train.numpy())
        ood = (dataset.x_ood[:, 0].numpy(), dataset.y_ood.numpy()) if dataset.y_ood is not None else None
        train_range = (dataset.x_train.min().item(), dataset.x_train.max().item())
        predictive_band_figure(grid.numpy(), grid_mean.numpy(), grid_var_weights.sqrt().numpy(),
                               grid_var.sqrt().numpy(), train, ood, train_range, title, path)
        return
    y_mean, y_std = dataset.split.get("y_mean", 0.0), dataset.split.get("y_std", 1.0)
    unit = "original units" if "y_std" in dataset.split else "data units"
    predicted_vs_true_figure((dataset.y_test * y_std + y_mean).numpy(), (mean * y_std + y_mean).numpy(),
                             (var.sqrt() * y_std).numpy(), unit, title, path)


@torch.no_grad()
def bbb_diagnostics(model: nn.Module, dataset: Dataset, ledger: Ledger, config: EvalConfig,
                    out_dir: Path) -> Diagnostics:
    """Held-out predictive quality of a Bayesian network (or its MAP baseline) with S =
    config.samples weight draws (one for MAP), and its predictive plot as samples.png.

    - test_log_lik: mean over test examples of log (1/S) sum_s p(y | x, w_s), nats (higher is
      better): the log-density of the predictive distribution itself. By Jensen's inequality the
      nll term, -(1/S) sum_s log p(y | x, w_s), is >= -test_log_lik.
    - complexity_per_layer (bbb): KL(q(w_l) || p(w_l)) / N_train per layer, summing to the
      complexity term (up to Monte Carlo noise for the mixture prior). map_penalty_per_layer
      (map): -log p(w_l) / N_train, the penalty MAP trained with (not a KL; its ledger complexity is 0).
    - classification: accuracy and ece (ece_bins equal-width confidence bins, calibration.py) of
      the predictive distribution pbar = (1/S) sum_s softmax f(x, w_s); the predictive entropy
      -sum_k pbar_k log pbar_k on the test images (entropy_in) and on the same images with their
      pixels shuffled by one fixed permutation (entropy_ood: pixel values kept, digit gone), with
      entropy_max = log K. Writes reliability.csv; samples.png is the reliability diagram.
    - regression: rmse of the predictive mean, the noise scale s, and the entropy of the
      moment-matched predictive Gaussian (variance Var_s f(x, w_s) + s^2) on the test inputs
      (entropy_in) and on the dataset's out-of-distribution inputs where it has them
      (entropy_ood, and ood_log_lik on their targets); where the targets were standardized,
      rmse_original and test_log_lik_original in the data's own units. samples.png is the
      predictive band over x for 1-D inputs (training range shaded), else predicted vs true
      with +-2 sd error bars.
    """
    out = model(dataset.x_test, config.samples)  # (S, N, K)
    per_layer = (model.layer_costs(config.samples) / model.n_train).tolist()
    values: dict[str, Any] = {
        "test_log_lik": predictive_log_lik(model.log_likelihood(out, dataset.y_test)).mean().item(),
        "weight_samples": out.shape[0],
        "complexity_per_layer" if model.bayesian else "map_penalty_per_layer":
            {f"layer{i + 1}": value for i, value in enumerate(per_layer)},
    }
    title = f"{dataset.name}: {model.describe()}"
    task = _regression_diagnostics if model.regression else _classification_diagnostics
    values.update(task(model, dataset, out, config, title, out_dir))
    return Diagnostics(values)


# Held-out examples of the diffusion loss curve: one network pass of this many rows per grid point.
CURVE_EXAMPLES = 500
# grid variable of a diffusion loss curve -> (x label, y label) of its figure
CURVE_AXES = {
    "t": ("timestep $t$", "KL$(q(z_{t-1}|z_t,x)\\,\\|\\,p(z_{t-1}|z_t))$\n(nats per example)"),
    "log_snr": ("log-SNR $\\lambda = -\\gamma$",
                "$\\frac{1}{2}\\,E\\,\\|\\epsilon - \\hat\\epsilon\\|^2$\n(nats per example per unit log-SNR)"),
}


@torch.no_grad()
def diffusion_diagnostics(model: nn.Module, dataset: Dataset, ledger: Ledger, config: EvalConfig,
                          out_dir: Path) -> Diagnostics:
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


# family name -> diagnostics(model, dataset, ledger, config, out_dir), where out_dir is the
# run's staging folder for any files (CSV, figures) the family adds to the run directory.
DIAGNOSTICS: dict[str, Callable[[nn.Module, Dataset, Ledger, EvalConfig, Path], Diagnostics]] = {
    "vae": vae_diagnostics,
    "bbb": bbb_diagnostics,
    "diffusion": diffusion_diagnostics,
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
