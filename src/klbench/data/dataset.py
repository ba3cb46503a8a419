"""The record every dataset loader returns, and the hash that identifies its data."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from klbench.errors import DataError

KINDS = ("continuous", "binary", "discrete")
# Seed of the validation cut: one fixed permutation per dataset, whatever the training seed.
VALIDATION_SEED = 0


def hash_tensors(*tensors: torch.Tensor | None) -> str:
    """First 16 hex characters of sha256 over each tensor's dtype, shape and raw bytes, in order.

    dtype and shape are hashed too, so the same bytes viewed as another shape or type hash
    differently; None (a dataset without labels) hashes as a fixed marker.
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none;")
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test pair of flattened examples plus what is known about their distribution.

    x_train, x_test: float32 (N, D). `kind` says what x holds: "continuous" reals, "binary"
    values in {0, 1}, or "discrete" integers 0..levels-1 (stored as float32). `entropy` is
    the true entropy H(p) of the data distribution in nats per example (differential
    entropy for continuous data) where it is known, with its Monte Carlo standard error
    `entropy_se` (0.0 for a closed form); `log_density(x)` is the exact log p(x) in nats,
    (N, D) -> (N,), float64. `x_ood` (float32 (M, D)) and `y_ood`: held-out inputs from
    outside the training distribution, and their targets where known, for out-of-distribution
    diagnostics (e.g. a regression curve beyond its training range); None where there are none.

    x_val, y_val: the validation split (model selection and convergence only; never scored as a
    result). A loader sets it where it can draw one of its own (fresh draws of a toy density);
    otherwise `with_validation` cuts it from the training split. `sampler(n, generator) ->
    (x, y)`: an exact sampler of the training distribution (float32 x), for training on fresh
    draws per batch (infinite data); x_train is then a fixed reference draw, for statistics and
    for families that need a finite training set. `redraw(x, generator) -> x`: a fresh draw of
    the training inputs from their stored values per batch (dynamic binarization: Bernoulli of
    the stored intensities); the validation and test splits are drawn once.
    `on_support(samples) -> {name: value}`: how much of a model's samples (numpy (n, D)) lies
    where the data does (e.g. the share inside the checkerboard's squares).
    """

    name: str
    kind: str
    x_train: torch.Tensor
    x_test: torch.Tensor
    shape: tuple[int, ...]
    split: dict
    data_hash: str
    y_train: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    levels: int | None = None
    entropy: float | None = None
    entropy_se: float | None = None
    log_density: Callable[[torch.Tensor], torch.Tensor] | None = None
    x_ood: torch.Tensor | None = None
    y_ood: torch.Tensor | None = None
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    sampler: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    redraw: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    on_support: Callable[..., dict[str, float]] | None = None

    def __post_init__(self) -> None:
        # A malformed record is a bug in a loader, not a user error: fail loudly at its source.
        if self.kind not in KINDS:
            raise ValueError(f"dataset {self.name}: kind {self.kind!r} is not one of {KINDS}")
        for part in (p for p in (self.x_train, self.x_test, self.x_ood, self.x_val) if p is not None):
            if part.dtype != torch.float32 or part.dim() != 2 or part.shape[1] != self.x_train.shape[1]:
                raise ValueError(f"dataset {self.name}: x must be float32 (N, D) with one D, got {part.dtype} {tuple(part.shape)}")
        if math.prod(self.shape) != self.x_train.shape[1]:
            raise ValueError(f"dataset {self.name}: shape {self.shape} does not hold D = {self.x_train.shape[1]} values")
        if (self.levels is not None) != (self.kind == "discrete"):
            raise ValueError(f"dataset {self.name}: levels is set exactly when kind is 'discrete'")

    def with_validation(self, share: float) -> Dataset:
        """This dataset with a validation split: its own if it has one, else the fixed, seeded
        cut of `share` of the training split (VALIDATION_SEED: the same for every run of it)."""
        if self.x_val is not None:
            return self
        n = len(self.x_train)
        n_val = max(1, round(share * n))
        if n_val >= n:
            raise DataError(f"dataset '{self.name}': a validation share of {share:g} leaves no training examples "
                            f"of {n}; lower train.validation or enlarge n_train")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
        keep, held = order[n_val:].sort().values, order[:n_val].sort().values
        pick = lambda t, rows: None if t is None else t[rows]  # noqa: E731
        x_val = self.x_train[held]
        if self.redraw is not None:  # validation data are drawn once, like the test split
            x_val = self.redraw(x_val, torch.Generator().manual_seed(VALIDATION_SEED))
        split = {**self.split, "validation": {"n_val": n_val, "n_train_left": n - n_val, "share": share,
                                              "seed": VALIDATION_SEED, "how": "seeded cut of the training split"}}
        return dataclasses.replace(self, x_train=self.x_train[keep], y_train=pick(self.y_train, keep),
                                   x_val=x_val, y_val=pick(self.y_train, held), split=split)

    @property
    def dim(self) -> int:
        """D, the number of values in one flattened example."""
        return self.x_train.shape[1]

    @property
    def target(self) -> str | None:
        """What y holds: "class" labels (int64), "real" values (float), or None (no y)."""
        if self.y_train is None:
            return None
        return "class" if self.y_train.dtype == torch.int64 else "real"

    @property
    def image_like(self) -> bool:
        """Whether results are also reported in bits per dimension (binary and discrete data)."""
        return self.kind in ("binary", "discrete")
