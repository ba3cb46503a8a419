"""The one training loop shared by every family.

A family's model provides `loss(*batch) -> (objective, terms)` and
`ledger_terms(*batch, samples) -> terms`; this loop trains a group of seeds of it (one
model, or several stacked: seeds.py) for a budget of optimizer steps and does the rest:
Adam with warm-up and a decaying learning rate (optim.py), batches from a source
(batches.py: passes over a split, or fresh draws), periodic validation ledgers, the choice
of the best checkpoint, the convergence verdict, non-finite-loss detection and a progress
bar when someone is watching.

Model selection sees only the validation split: every seed keeps the weights of its
evaluation with the lowest validation criterion (`Selection`); the test split is scored once,
after training, by the caller. The criterion is what the model trains on: neg_elbo, or the
model's `own_objective` where that is another (IWAE's -L_k, whose ELBO may rise while -L_k
falls; a beta-VAE's distortion + beta rate, whose ELBO worsens as beta < 1 buys rate):
choosing those on the ELBO would keep an early checkpoint of a different model. A run has converged when
its best validation criterion improved by less than train.converged_tol over the last 10% of
its steps.

The hot path has no per-batch host sync: term sums stay on the device (RunningMeans)
and the finiteness check is on the summed objective, both read once per evaluation.
"""

import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from klbench.batches import Batch
from klbench.config import TrainConfig
from klbench.errors import TrainingError
from klbench.ledger import RunningMeans
from klbench.optim import Adam, learning_rate
from klbench.seeds import OneSeed, StackedSeeds, held_out_ledger

__all__ = ["CONVERGENCE_WINDOW", "Selection", "evaluation_steps", "fit", "fit_model", "held_out_ledger", "seed_everything"]

CONVERGENCE_WINDOW = 0.1  # the share of the last steps over which convergence is judged


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Selection:
    """What the validation split decided for one seed: the step whose weights are kept, its
    validation means, and the convergence verdict (module docstring)."""

    best_step: int
    best: dict[str, float]
    improvement: float  # best validation criterion before the last 10% of steps minus the best within them
    converged: bool
    criterion: str = "neg_elbo"  # the key of `best` chosen on: neg_elbo, or "objective" (the model's own_objective)
    selected_on: str = "neg_elbo"  # its name for people: neg_elbo, or the own_objective's label ("-L_5")

    @classmethod
    def judge(cls, curve: list[tuple[int, dict[str, float]]], steps: int, tol: float,
              own_objective: str | None = None) -> "Selection":
        """The selection from (step, validation means) at every evaluation."""
        key = "neg_elbo" if own_objective is None else "objective"
        best_step, best = min(curve, key=lambda point: point[1][key])
        boundary = steps * (1 - CONVERGENCE_WINDOW)
        before = min(m[key] for step, m in curve if step <= boundary)
        within = min((m[key] for step, m in curve if step > boundary), default=before)
        return cls(best_step, best, before - within, before - within < tol, key, own_objective or "neg_elbo")

    def to_dict(self) -> dict[str, float | int | bool | str]:
        out = {"best_step": self.best_step, "converged": self.converged, "selected_on": self.selected_on,
               "improvement_last_10pct": self.improvement, "best_val_neg_elbo": self.best["neg_elbo"]}
        if self.criterion != "neg_elbo":
            out["best_val_objective"] = self.best[self.criterion]
        return out


def evaluation_steps(config: TrainConfig) -> list[int]:
    """The steps after which the loop evaluates: `evaluations` of them (at most one per step),
    evenly spaced, the last last."""
    return sorted({round(config.steps * k / config.evaluations) for k in range(1, config.evaluations + 1)})


def fit(
    group: OneSeed | StackedSeeds,
    batches: Iterable[Batch],
    validation: tuple[Tensor, ...],
    config: TrainConfig,
    on_eval: Callable[[int, list[dict[str, dict[str, float]]]], None] | None = None,
    progress: bool | None = None,
) -> tuple[list[list[dict[str, float | int | str]]], list[Selection]]:
    """Train a group of seeds for config.steps Adam steps; leave each seed at its best
    validation checkpoint. Return each seed's history rows (step, split, lr, terms, neg_elbo,
    wall_time; split "train" averages the steps since the previous evaluation) and Selection.

    The caller seeds the RNGs. `on_eval(step, [{"train": means, "val": means}, ...])` is called
    at every evaluation with one entry per seed. Raises TrainingError, naming the seed, on a
    non-finite loss.
    """
    seeds = group.seeds
    optimizer = Adam(group.parameters(), lr=config.lr)  # fused: one kernel per step for all parameters
    device = validation[0].device
    if progress is None:
        progress = sys.stderr.isatty()
    histories: list[list[dict[str, float | int | str]]] = [[] for _ in range(group.size)]
    curves: list[list[tuple[int, dict[str, float]]]] = [[] for _ in range(group.size)]
    best: list[tuple[float, dict[str, Tensor]] | None] = [None] * group.size
    checkpoints = set(evaluation_steps(config))
    own_objective = group.own_objective
    criterion = "neg_elbo" if own_objective is None else "objective"
    bar = None
    if progress:
        from tqdm import tqdm

        label = f"train seed{seeds[0]}" if len(seeds) == 1 else f"train seeds {','.join(map(str, seeds))}"
        bar = tqdm(total=config.steps, desc=label, unit="step", leave=False)
    start, done = time.perf_counter(), 0
    running = RunningMeans()
    # a NaN/inf objective in any batch makes its seed's sum non-finite: one check per evaluation
    objective_sum = torch.zeros(group.size, device=device)
    group.train()
    for step, (batch, index, per_pass) in zip(range(1, config.steps + 1), batches):
        optimizer.lr = learning_rate(step, config.lr, config.steps, config.warmup_steps, config.schedule,
                                     config.final_lr)
        objective, terms = group.loss(batch, batch_index=index, num_batches=per_pass, progress=step / config.steps)
        optimizer.zero_grad()
        objective.sum().backward()
        optimizer.step()
        running.add(terms)
        objective_sum += objective.detach()
        if step not in checkpoints:
            continue
        finite = torch.isfinite(objective_sum).tolist()
        if not all(finite):
            raise TrainingError(f"training loss became NaN/inf by step {step} (seed {seeds[finite.index(False)]}); "
                                f"lower train.lr (now {config.lr:g}) or check the data")
        means = [{"train": values} for values in running.means()]
        running, objective_sum = RunningMeans(), torch.zeros(group.size, device=device)
        ledgers = group.held_out(validation, samples=config.validation_samples)
        own = None if own_objective is None else group.held_out(validation, config.validation_samples,
                                                                "own_objective_terms")
        for s, (entry, ledger) in enumerate(zip(means, ledgers)):
            entry["val"] = ledger.means()
            if own is not None:
                entry["val"]["objective"] = own[s].terms["objective"].double().mean().item()
            if not all(np.isfinite(v) for v in entry["val"].values()):
                raise TrainingError(f"validation ledger is NaN/inf at step {step} (seed {seeds[s]}); "
                                    f"lower train.lr (now {config.lr:g})")
            curves[s].append((step, entry["val"]))
            if best[s] is None or entry["val"][criterion] < best[s][0]:
                best[s] = (entry["val"][criterion], group.snapshot(s))
        group.train()
        wall = time.perf_counter() - start
        for history, entry in zip(histories, means):
            for split, values in entry.items():
                history.append({"step": step, "split": split, "lr": optimizer.lr, **values, "wall_time": wall})
        if bar is not None:
            bar.update(step - done)
            bar.set_postfix({f"val_{criterion}": f"{means[0]['val'][criterion]:.3f}"})
        done = step
        if on_eval is not None:
            on_eval(step, means)
    if bar is not None:
        bar.close()
    for s, (_, weights) in enumerate(best):
        group.restore(s, weights)
    group.train(False)
    return histories, [Selection.judge(curve, config.steps, config.converged_tol, own_objective) for curve in curves]


def fit_model(model: torch.nn.Module, train: tuple[Tensor, ...], validation: tuple[Tensor, ...], config: TrainConfig,
              seed: int = 0, progress: bool | None = False) -> tuple[list[dict[str, float | int | str]], Selection]:
    """Train one model on passes over in-memory tensors (global RNG from its current state);
    return its history and selection. The model ends at its best validation checkpoint."""
    from klbench.batches import Passes

    group = OneSeed(model, seed)
    (history,), (selection,) = fit(group, Passes(group, train, config.batch_size), validation, config,
                                   progress=progress)
    return history, selection
