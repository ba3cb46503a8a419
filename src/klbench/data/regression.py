"""Regression datasets with real targets: the 1-D toy curve of Blundell et al. (2015) and diabetes.

Targets y are float32 (N,), so Dataset.target is "real". Both are offline and fixed: the
same tensors on every call with the same options.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from klbench.data.dataset import Dataset, hash_tensors
from klbench.data.split import check_count, check_seed, generators, permutation_split

# --- toy_curve ---------------------------------------------------------------------------------

CURVE_NOISE = 0.02
TRAIN_RANGE = (0.0, 0.5)
# Out-of-distribution inputs keep 0.1 away from the training range on either side, so that
# "outside" is clearly outside; OOD_POINTS evenly spaced per side.
OOD_RANGES = ((-0.5, -0.1), (0.6, 1.0))
OOD_POINTS = 100


def curve(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """y = x + 0.3 sin(2 pi (x + eps)) + 0.3 sin(4 pi (x + eps)) + eps (Blundell et al. 2015, sec. 5.2)."""
    return x + 0.3 * torch.sin(2 * math.pi * (x + eps)) + 0.3 * torch.sin(4 * math.pi * (x + eps)) + eps


def _curve_targets(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noisy targets at float64 inputs x (N,): eps ~ N(0, 0.02^2) per point."""
    return curve(x, CURVE_NOISE * torch.randn(x.shape, generator=generator, dtype=torch.float64))


def toy_curve(n_train: int = 1024, n_test: int = 512, seed: int = 0) -> Dataset:
    """Blundell et al.'s 1-D regression curve, x ~ U(0, 0.5) for train and test, y = curve(x, eps).

    x_ood / y_ood: OOD_POINTS evenly spaced inputs on each of [-0.5, -0.1] and [0.6, 1.0]
    (outside the training range) with noisy targets from the same curve, for the predictive
    band beyond the data and the out-of-distribution entropy. Train, test and the OOD targets
    come from independent streams derived from `seed`, so the test set does not change with
    n_train. kind "continuous", D = 1.
    """
    n_train = check_count("toy_curve", "n_train", n_train)
    n_test = check_count("toy_curve", "n_test", n_test)
    seed = check_seed("toy_curve", seed)
    train_generator, test_generator, ood_generator = generators(seed, 3)
    low, high = TRAIN_RANGE
    x_train = low + (high - low) * torch.rand(n_train, generator=train_generator, dtype=torch.float64)
    y_train = _curve_targets(x_train, train_generator)
    x_test = low + (high - low) * torch.rand(n_test, generator=test_generator, dtype=torch.float64)
    y_test = _curve_targets(x_test, test_generator)
    x_ood = torch.cat([torch.linspace(a, b, OOD_POINTS, dtype=torch.float64) for a, b in OOD_RANGES])
    y_ood = _curve_targets(x_ood, ood_generator)
    tensors = [t.float() for t in (x_train[:, None], x_test[:, None], y_train, y_test, x_ood[:, None], y_ood)]
    x_train, x_test, y_train, y_test, x_ood, y_ood = tensors
    return Dataset(
        name="toy_curve", kind="continuous", x_train=x_train, x_test=x_test, shape=(1,),
        split={"n_train": n_train, "n_test": n_test, "seed": seed, "train_range": list(TRAIN_RANGE),
               "ood_ranges": [list(r) for r in OOD_RANGES],
               "how": "train and test x ~ U(0, 0.5) drawn independently (separate seeded streams); "
                      "x_ood an even grid outside the training range"},
        data_hash=hash_tensors(*tensors),
        y_train=y_train, y_test=y_test, x_ood=x_ood, y_ood=y_ood,
    )


# --- diabetes ----------------------------------------------------------------------------------

DIABETES_TRAIN_FRACTION = 0.8


def _diabetes_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw features (442 x 10, float64) and targets (442,) of sklearn's load_diabetes(scaled=False).

    Reads the files load_diabetes reads without importing sklearn (about 1.8 s); the tests
    compare the two.
    """
    data_dir = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "data"
    return np.loadtxt(data_dir / "diabetes_data_raw.csv.gz"), np.loadtxt(data_dir / "diabetes_target.csv.gz")


def diabetes(seed: int = 0) -> Dataset:
    """scikit-learn's diabetes regression (442 patients, 10 features, disease progression after a year).

    Split: a seeded random permutation, first floor(0.8 N) = 353 train, 89 test. x and y are
    standardized with the TRAIN split's mean and (population) standard deviation, so no test
    statistic leaks into training; split["y_mean"], split["y_std"] give y in original units
    as y * y_std + y_mean. kind "continuous", D = 10.
    """
    seed = check_seed("diabetes", seed)
    features, targets = _diabetes_arrays()
    x, y = torch.from_numpy(features), torch.from_numpy(targets)
    train, test = permutation_split(len(x), int(DIABETES_TRAIN_FRACTION * len(x)), seed)
    x_mean, x_std = x[train].mean(0), x[train].std(0, correction=0)
    y_mean, y_std = y[train].mean(), y[train].std(correction=0)
    x, y = ((x - x_mean) / x_std).float(), ((y - y_mean) / y_std).float()
    return Dataset(
        name="diabetes", kind="continuous", x_train=x[train], x_test=x[test], shape=(x.shape[1],),
        split={"n_train": len(train), "n_test": len(test), "seed": seed,
               "how": "seeded random permutation of sklearn load_diabetes(scaled=False), first 80% train; "
                      "x and y standardized with train statistics",
               "y_mean": y_mean.item(), "y_std": y_std.item()},
        data_hash=hash_tensors(x[train], x[test], y[train], y[test]),
        y_train=y[train], y_test=y[test],
    )
