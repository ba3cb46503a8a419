"""Fixed, seeded randomness for datasets: independent generator streams, seeded splits, checked sizes.

All randomness goes through explicit torch.Generator objects, never the global RNG, so a
dataset is the same on every call and loading one never disturbs a training seed.
"""

from __future__ import annotations

import numpy as np
import torch

from klbench.errors import DataError


def generators(seed: int, count: int) -> list[torch.Generator]:
    """`count` independent torch generators derived from one seed.

    numpy's SeedSequence spawns statistically independent child seeds, so (for example)
    the test set of a toy dataset does not change when n_train does.
    """
    children = np.random.SeedSequence(seed).spawn(count)
    return [torch.Generator().manual_seed(int(child.generate_state(1, np.uint64)[0])) for child in children]


def permutation_split(n: int, n_train: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a seeded random split: a permutation of 0..n-1, first n_train train, rest test."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:n_train], order[n_train:]


def check_seed(dataset: str, value: object) -> int:
    """The `seed` option as a non-negative int, or a DataError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"dataset '{dataset}': option 'seed' must be a non-negative integer, got {value!r}")
    return value


def check_count(dataset: str, option: str, value: object, available: int | None = None) -> int:
    """A size option (n_train, n_test) as a positive int no larger than `available`, or a DataError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"dataset '{dataset}': option '{option}' must be a positive integer, got {value!r}")
    if available is not None and value > available:
        raise DataError(f"dataset '{dataset}': option '{option}' is {value} but only {available} examples are available")
    return value
