"""Calibration of a classifier's predictive probabilities: reliability bins and the expected calibration error.

A prediction's confidence is its largest class probability, conf_n = max_k p(k | x_n), and it
is correct when that class is the label. The confidences are grouped into M equal-width bins
B_m = ((m-1)/M, m/M], m = 1..M (a confidence of exactly 0 counts in the first), and per bin

    acc_m  = (1/|B_m|) sum_{n in B_m} [argmax_k p(k | x_n) = y_n]
    conf_m = (1/|B_m|) sum_{n in B_m} conf_n
    ECE    = sum_m (|B_m| / N) |acc_m - conf_m|          (Naeini et al. 2015; Guo et al. 2017, sec. 2)

ECE is 0 for a perfectly calibrated classifier and at most 1. It depends on M; the bin count
is stored next to every value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of M equal-width confidence bins; accuracy and confidence are NaN
    where a bin is empty (count 0)."""

    edges: Tensor  # (M + 1,): 0, 1/M, ..., 1
    count: Tensor  # (M,) int64: |B_m|
    accuracy: Tensor  # (M,) float64: acc_m
    confidence: Tensor  # (M,) float64: conf_m

    @property
    def ece(self) -> float:
        """sum_m (|B_m| / N) |acc_m - conf_m| over the non-empty bins."""
        filled = self.count > 0
        weights = self.count[filled].double() / self.count.sum()
        return (weights * (self.accuracy[filled] - self.confidence[filled]).abs()).sum().item()


def reliability_bins(probs: Tensor, labels: Tensor, bins: int) -> ReliabilityBins:
    """Reliability statistics of predictive probabilities probs (N, K) for labels (N,) in `bins` bins."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    probs = probs.double()
    confidence, prediction = probs.max(-1)
    correct = (prediction == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # right=False puts a confidence equal to an inner edge m/M into the bin below: bins are ((m-1)/M, m/M].
    index = torch.bucketize(confidence, edges[1:-1])
    count = torch.bincount(index, minlength=bins)
    accuracy = torch.bincount(index, weights=correct, minlength=bins) / count
    mean_confidence = torch.bincount(index, weights=confidence, minlength=bins) / count
    return ReliabilityBins(edges, count, accuracy, mean_confidence)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int) -> float:
    """ECE = sum_m (|B_m| / N) |acc_m - conf_m| over `bins` equal-width confidence bins
    (see the module docstring): probs (N, K), labels (N,)."""
    return reliability_bins(probs, labels, bins).ece
