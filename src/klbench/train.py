"""The one training loop shared by every family.

A family's model provides `loss(*batch) -> (objective, terms)` and
`ledger_terms(*batch, samples) -> terms`; this loop does the rest: seeding, Adam,
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
from torch import Tensor, nn

from klbench.config import TrainConfig
from klbench.errors import TrainingError
from klbench.ledger import Ledger, RunningMeans

EVAL_BATCH = 1000


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def held_out_ledger(model: nn.Module, tensors: tuple[Tensor, ...], samples: int) -> Ledger:
    """The unweighted ledger of every example of a split, in batches."""
    was_training = model.training
    model.eval()
    n = tensors[0].shape[0]
    parts = [
        Ledger(model.ledger_terms(*(t[i : i + EVAL_BATCH] for t in tensors), samples=samples))
        for i in range(0, n, EVAL_BATCH)
    ]
    model.train(was_training)
    return Ledger.cat(parts)


def fit(
    model: nn.Module,
    train: tuple[Tensor, ...],
    test: tuple[Tensor, ...],
    config: TrainConfig,
    on_epoch: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
    progress: bool | None = None,
) -> list[dict[str, float | int | str]]:
    """Train with Adam; return history rows (epoch, split, terms, neg_elbo, wall_time).

    The caller seeds the RNGs. `on_epoch(epoch, {"train": means, "test": means})` is
    called after each epoch (the test entry only on evaluation epochs). Raises
    TrainingError on a non-finite loss or parameter.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    n = train[0].shape[0]
    if progress is None:
        progress = sys.stderr.isatty()
    history: list[dict[str, float | int | str]] = []
    start = time.perf_counter()
    epochs = range(1, config.epochs + 1)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="train", unit="epoch", leave=False)
    model.train()
    for epoch in epochs:
        running = RunningMeans()
        # a NaN/inf objective in any batch makes this sum non-finite: one check per epoch
        objective_sum = torch.zeros((), device=train[0].device)
        batches = torch.randperm(n, device=train[0].device).split(config.batch_size)
        for batch_index, rows in enumerate(batches):
            objective, terms = model.loss(*(t[rows] for t in train), batch_index=batch_index, num_batches=len(batches))
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            running.add(terms)
            objective_sum += objective.detach()
        if not torch.isfinite(objective_sum).item():
            raise TrainingError(
                f"training loss became NaN/inf in epoch {epoch}; lower train.lr (now {config.lr:g}) or check the data"
            )
        means = {"train": running.means()}
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            means["test"] = held_out_ledger(model, test, samples=1).means()
            if not all(np.isfinite(v) for v in means["test"].values()):
                raise TrainingError(f"held-out ledger is NaN/inf after epoch {epoch}; lower train.lr (now {config.lr:g})")
        wall = time.perf_counter() - start
        for split, values in means.items():
            history.append({"epoch": epoch, "split": split, **values, "wall_time": wall})
        if progress:
            epochs.set_postfix(neg_elbo=f"{means['train']['neg_elbo']:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, means)
    return history
