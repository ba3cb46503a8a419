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

The package: process.py holds what both share (the process in terms of gamma, the denoiser,
the decoder, the ledger terms, the sampler), ddpm.py the discrete-time chain and its schedules,
vdm.py the continuous-time process and its fixed or learned schedule; this module their Config,
evaluation and FAMILY declaration.

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

import torch

from klbench.config import EvalConfig
from klbench.models.diffusion.ddpm import DDPM, cosine_betas, linear_betas
from klbench.models.diffusion.process import Diffusion, antithetic_times, posterior
from klbench.models.diffusion.vdm import VDM, LearnedGamma
from klbench.models.family import Diagnostics, Family, Figure, Rank, samples_run_figure
from klbench.models.likelihoods import KINDS
from klbench.plots import loss_curve_figure
from klbench.settings import setting

if TYPE_CHECKING:
    from klbench.data import Dataset
    from klbench.ledger import Ledger

__all__ = ["DDPM", "VDM", "Config", "Diffusion", "LearnedGamma", "antithetic_times", "cosine_betas", "linear_betas",
           "posterior", "FAMILY"]

SCHEDULES = {"ddpm": ("linear", "cosine"), "vdm": ("fixed", "learned")}


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
    headline=("on_support", "modes_covered"),
)

