"""Where a run's training batches come from: passes over a finite split, or fresh draws.

The training loop asks for one batch per optimizer step, for every seed of its group at
once (a leading seed axis when the seeds are stacked, seeds.py). Two sources:

- `Passes`: minibatches of a finite training split, each seed reshuffling it on every pass
  (an epoch); the last batch of a pass may be smaller. An optional `transform` redraws each
  batch's x from its stored values (dynamic binarization: x ~ Bernoulli(intensity)).
- `FreshDraws`: a new sample from the data distribution's exact sampler for every batch
  (infinite data: no example is seen twice, so there is nothing to overfit).

Draws of data (fresh samples, binarization) come from each seed's own data generator
(`data_generator`), never from the RNG that the model's noise uses, so a seed's batches do
not depend on which seeds share its process, nor on how often the loop evaluates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from klbench.seeds import OneSeed, StackedSeeds

# A batch as the loop uses it: the family's tensors, its position in a pass and the pass's length.
Batch = tuple[tuple[Tensor, ...], int, int]
# Stream of a seed's data draws: a child of the seed distinct from every model-noise stream.
DATA_STREAM = 0xDA7A


def data_generator(seed: int) -> torch.Generator:
    """The generator of a training seed's data draws (CPU; the same in any process)."""
    state = np.random.SeedSequence([seed, DATA_STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _per_seed(group: OneSeed | StackedSeeds, draw: Callable[[int], tuple[Tensor, ...]],
              device: torch.device) -> tuple[Tensor, ...]:
    """draw(s) for every seed s of the group, with the group's seed axis, on `device`."""
    parts = [draw(s) for s in range(group.size)]
    if not group.stacked:
        return tuple(t.to(device) for t in parts[0])
    return tuple(torch.stack(column).to(device) for column in zip(*parts))


class Passes:
    """Shuffled passes over a finite split, forever; transform(x, generator) redraws each batch's x."""

    def __init__(self, group: OneSeed | StackedSeeds, tensors: tuple[Tensor, ...], batch_size: int,
                 transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                 generators: list[torch.Generator] | None = None) -> None:
        self.group, self.tensors, self.batch_size = group, tensors, batch_size
        self.transform, self.generators = transform, generators
        self.n = tensors[0].shape[0]

    def __iter__(self) -> Iterator[Batch]:
        device = self.tensors[0].device
        while True:
            rows = self.group.permutations(self.n, device).split(self.batch_size, dim=1)
            for index, part in enumerate(rows):
                batch = self.group.rows(self.tensors, part)
                if self.transform is not None:
                    x = batch[0] if self.group.stacked else batch[0].unsqueeze(0)
                    redrawn = _per_seed(self.group, lambda s: (self.transform(x[s].cpu(), self.generators[s]),),
                                        device)
                    batch = redrawn + batch[1:]
                yield batch, index, len(rows)

    def epochs(self, steps: int) -> float:
        """How many passes over the split `steps` batches make."""
        return steps * self.batch_size / self.n


class FreshDraws:
    """A new sample of batch_size examples per step and seed: sampler(n, generator) -> (x, y)."""

    def __init__(self, group: OneSeed | StackedSeeds, sampler: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
                 batch_size: int, with_targets: bool, generators: list[torch.Generator], device: torch.device) -> None:
        self.group, self.sampler, self.batch_size = group, sampler, batch_size
        self.with_targets, self.generators, self.device = with_targets, generators, device

    def __iter__(self) -> Iterator[Batch]:
        def draw(s: int) -> tuple[Tensor, ...]:
            x, y = self.sampler(self.batch_size, self.generators[s])
            return (x, y) if self.with_targets else (x,)

        while True:
            yield _per_seed(self.group, draw, self.device), 0, 1

    def epochs(self, steps: int) -> None:
        """Infinite data has no passes."""
        return None
