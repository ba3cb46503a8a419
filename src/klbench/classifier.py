"""What every classifier reports on held-out data, from its predictive distribution p(y | x).

Families that predict class labels (a Bayesian network, an information bottleneck, a
semi-supervised VAE's q(y|x)) hand over their log predictive probabilities; this module turns
them into the same diagnostics and the same run figure for all of them:

- test_log_lik = mean_n log p(y_n | x_n), nats (higher is better);
- accuracy of argmax_k p(k | x), and the expected calibration error over `ece_bins` bins
  (calibration.py), its bins written to reliability.csv, and from that file the run figure:
  a reliability diagram (`reliability_run_figure`);
- the predictive entropy -sum_k p_k log p_k on the test inputs (entropy_in) and on the same
  inputs with their values shuffled by one fixed permutation of the dimensions (entropy_ood:
  pixel values kept, digit gone), with entropy_max = log K.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from klbench.calibration import reliability_bins
from klbench.config import EvalConfig
from klbench.plots import reliability_figure
from klbench.settings import setting

# One fixed permutation of the input dimensions makes the out-of-distribution inputs.
OOD_SHUFFLE_SEED = 0


def shuffled_inputs(x: Tensor) -> Tensor:
    """x (N, D) with its D dimensions permuted by one fixed permutation."""
    permutation = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(OOD_SHUFFLE_SEED))
    return x[:, permutation]


RELIABILITY_FILE = "reliability.csv"
RELIABILITY_COLUMNS = ["bin_lower", "bin_upper", "count", "accuracy", "confidence"]


def classifier_diagnostics(log_predict: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, ece_bins: int,
                           out_dir: Path) -> dict[str, Any]:
    """Held-out diagnostics of a classifier whose log predictive probabilities are
    log_predict(x) (N, K) (module docstring). Writes reliability.csv into out_dir."""
    log_probs = log_predict(x).double()  # (N, K)
    probs = log_probs.exp()
    probs_ood = log_predict(shuffled_inputs(x)).double().exp()
    bins = reliability_bins(probs, y, ece_bins)
    with (out_dir / RELIABILITY_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(RELIABILITY_COLUMNS)
        for row in zip(bins.edges[:-1].tolist(), bins.edges[1:].tolist(), bins.count.tolist(),
                       bins.accuracy.tolist(), bins.confidence.tolist()):
            writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return {
        "test_log_lik": log_probs.gather(-1, y[:, None]).mean().item(),
        "accuracy": (probs.argmax(-1) == y).double().mean().item(),
        "ece": bins.ece,
        "ece_bins": ece_bins,
        "entropy_in": torch.special.entr(probs).sum(-1).mean().item(),
        "entropy_ood": torch.special.entr(probs_ood).sum(-1).mean().item(),
        "entropy_max": math.log(probs.shape[-1]),
    }


def reliability_run_figure(model: Any, dataset: Any, out_dir: Path, title: str) -> None:
    """The run figure of a classifier: the reliability diagram of the bins that
    classifier_diagnostics wrote to out_dir/reliability.csv, as samples.png."""
    import numpy as np

    with (out_dir / RELIABILITY_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    column = lambda name: np.array([float(r[name]) if r[name] != "" else np.nan for r in rows])  # noqa: E731
    edges = np.append(column("bin_lower"), column("bin_upper")[-1])
    count, accuracy, confidence = column("count"), column("accuracy"), column("confidence")
    filled = count > 0
    ece = float((count[filled] / count.sum() * np.abs(accuracy[filled] - confidence[filled])).sum())
    reliability_figure(edges, count, accuracy, confidence, ece, title, out_dir / "samples.png")


@dataclass(frozen=True)
class ClassifierEvalConfig(EvalConfig):
    """Evaluation settings of a family that predicts class labels."""

    ece_bins: int = setting(15, "Equal-width confidence bins of the expected calibration error.", minimum=1)
