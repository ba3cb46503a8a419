"""The record every dataset loader returns, and the hash that identifies its data."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

KINDS = ("continuous", "binary", "discrete")


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

    def __post_init__(self) -> None:
        # A malformed record is a bug in a loader, not a user error: fail loudly at its source.
        if self.kind not in KINDS:
            raise ValueError(f"dataset {self.name}: kind {self.kind!r} is not one of {KINDS}")
        for part in (p for p in (self.x_train, self.x_test, self.x_ood) if p is not None):
            if part.dtype != torch.float32 or part.dim() != 2 or part.shape[1] != self.x_train.shape[1]:
                raise ValueError(f"dataset {self.name}: x must be float32 (N, D) with one D, got {part.dtype} {tuple(part.shape)}")
        if math.prod(self.shape) != self.x_train.shape[1]:
            raise ValueError(f"dataset {self.name}: shape {self.shape} does not hold D = {self.x_train.shape[1]} values")
        if (self.levels is not None) != (self.kind == "discrete"):
            raise ValueError(f"dataset {self.name}: levels is set exactly when kind is 'discrete'")

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
