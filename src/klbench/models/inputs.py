"""How a predictive model sees x: a fixed change of coordinates set by the training split.

Continuous x is standardized with the training split's mean and standard deviation, discrete x
(integers 0..L-1) divided by L - 1 to [0, 1], binary x used as is. The likelihood of such a
model is of y, so no ledger term changes with these coordinates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from klbench.data import Dataset


def input_scaling(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """(shift, scale), each (D,): the model sees (x - shift) * scale."""
    shift, scale = torch.zeros(dataset.dim), torch.ones(dataset.dim)
    if dataset.kind == "continuous":
        shift, scale = dataset.x_train.mean(0), 1 / dataset.x_train.std(0).clamp_min(1e-8)
    elif dataset.kind == "discrete":
        scale = scale / (dataset.levels - 1)
    return shift, scale
