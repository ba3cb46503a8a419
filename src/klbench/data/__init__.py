"""The dataset registry: every benchmark dataset by name, loaded with keyword options.

load_dataset("checkerboard", n_train=1000) returns a Dataset (see dataset.py). All loaders
work offline and are deterministic; `mnist` and `fashion_mnist` read IDX files from `path`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from klbench.data.dataset import Dataset, hash_tensors
from klbench.data.images import digits, mnist1d, mnist5k
from klbench.data.mnist_files import fashion_mnist, mnist
from klbench.data.regression import diabetes, toy_curve
from klbench.data.toy2d import checkerboard, eight_gaussians, two_moons
from klbench.errors import DataError

__all__ = ["DATASETS", "PROFILES", "Dataset", "hash_tensors", "load_dataset"]

DATASETS: dict[str, Callable[..., Dataset]] = {
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "two_moons": two_moons,
    "digits": digits,
    "mnist5k": mnist5k,
    "mnist1d": mnist1d,
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "toy_curve": toy_curve,
    "diabetes": diabetes,
}

# (kind, target) of every dataset, known without loading it, so that the workflow can
# decide which dataset/model pairs to schedule at parse time. tests/test_data.py checks
# each entry against the loaded dataset.
PROFILES: dict[str, tuple[str, str | None]] = {
    "eight_gaussians": ("continuous", "class"),  # y: the mixture component
    "checkerboard": ("continuous", "class"),  # y: the square
    "two_moons": ("continuous", "class"),  # y: the moon
    "digits": ("discrete", "class"),
    "mnist5k": ("binary", "class"),
    "mnist1d": ("continuous", "class"),
    "mnist": ("binary", "class"),
    "fashion_mnist": ("binary", "class"),
    "toy_curve": ("continuous", "real"),
    "diabetes": ("continuous", "real"),
}


def load_dataset(name: str, **options: Any) -> Dataset:
    """The dataset `name`, loaded with `options`; DataError for an unknown name or option."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; known datasets: {', '.join(sorted(DATASETS))}")
    loader = DATASETS[name]
    accepted = list(inspect.signature(loader).parameters)
    for option in options:
        if option not in accepted:
            raise DataError(f"dataset '{name}' has no option '{option}'; "
                            f"accepted options: {', '.join(accepted) if accepted else 'none'}")
    return loader(**options)
