"""The one training loop shared by every family.

A family's model provides `loss(*batch) -> (objective, terms)` and
`ledger_terms(*batch, samples) -> terms`; this loop trains a group of seeds of it (one
model, or several stacked: seeds.py) and does the rest: Adam,
shuffled minibatches from in-memory tensors, per-epoch train and held-out ledgers,
non-finite-loss detection, a progress bar when someone is watching.

The hot path has no per-batch host sync: term sums stay on the device (RunningMeans)
and the finiteness check is on the epoch's summed objective, both read once per epoch.
"""

import random
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from klbench.config import TrainConfig
from klbench.errors import TrainingError
from klbench.ledger import RunningMeans
from klbench.optim import Adam
from klbench.seeds import OneSeed, StackedSeeds, held_out_ledger

__all__ = ["fit", "held_out_ledger", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(
    group: OneSeed | StackedSeeds,
    train: tuple[Tensor, ...],
    test: tuple[Tensor, ...],
    config: TrainConfig,
    on_epoch: Callable[[int, list[dict[str, dict[str, float]]]], None] | None = None,
    progress: bool | None = None,
) -> list[list[dict[str, float | int | str]]]:
    """Train a group of seeds with Adam; return each seed's history rows (epoch, split,
    terms, neg_elbo, wall_time).

    The caller seeds the RNGs. `on_epoch(epoch, [{"train": means, "test": means}, ...])`
    is called after each epoch with one entry per seed (the test entry only on evaluation
    epochs). Raises TrainingError, naming the seed, on a non-finite loss.
    """
    seeds = group.seeds
    optimizer = Adam(group.parameters(), lr=config.lr)  # fused: one kernel per step for all parameters
    n, device = train[0].shape[0], train[0].device
    if progress is None:
        progress = sys.stderr.isatty()
    histories: list[list[dict[str, float | int | str]]] = [[] for _ in range(group.size)]
    start = time.perf_counter()
    epochs = range(1, config.epochs + 1)
    if progress:
        from tqdm import tqdm

        label = f"train seed{seeds[0]}" if len(seeds) == 1 else f"train seeds {','.join(map(str, seeds))}"
        epochs = tqdm(epochs, desc=label, unit="epoch", leave=False)
    group.train()
    for epoch in epochs:
        running = RunningMeans()
        # a NaN/inf objective in any batch makes its seed's sum non-finite: one check per epoch
        objective_sum = torch.zeros(group.size, device=device)
        batches = group.permutations(n, device).split(config.batch_size, dim=1)
        for batch_index, rows in enumerate(batches):
            objective, terms = group.loss(group.rows(train, rows), batch_index=batch_index, num_batches=len(batches))
            optimizer.zero_grad()
            objective.sum().backward()
            optimizer.step()
            running.add(terms)
            objective_sum += objective.detach()
        finite = torch.isfinite(objective_sum).tolist()
        if not all(finite):
            raise TrainingError(f"training loss became NaN/inf in epoch {epoch} (seed {seeds[finite.index(False)]}); "
                                f"lower train.lr (now {config.lr:g}) or check the data")
        means = [{"train": values} for values in running.means()]
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            for seed, entry, ledger in zip(seeds, means, group.held_out(test, samples=1)):
                entry["test"] = ledger.means()
                if not all(np.isfinite(v) for v in entry["test"].values()):
                    raise TrainingError(f"held-out ledger is NaN/inf after epoch {epoch} (seed {seed}); "
                                        f"lower train.lr (now {config.lr:g})")
        wall = time.perf_counter() - start
        for history, entry in zip(histories, means):
            for split, values in entry.items():
                history.append({"epoch": epoch, "split": split, **values, "wall_time": wall})
        if progress:
            epochs.set_postfix(neg_elbo=f"{means[0]['train']['neg_elbo']:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, means)
    return histories
