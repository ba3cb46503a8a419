"""Model families, by name. A family module provides:

- FAMILY (its name), TERMS (its ledger term names, as in ledger.FAMILY_TERMS);
- DATA_KINDS (the dataset kinds its inputs may be) and SUPERVISED (whether it needs
  targets y: then every batch is (x, y), else (x,)) -- together they decide which
  dataset/model pairs the grid schedules, without loading any data;
- Config (a frozen dataclass of its hyperparameters) and build(config, dataset)
  returning an nn.Module with
    loss(*batch, batch_index, num_batches) -> (objective, terms)   for training
        (batch_index of num_batches: the position in the epoch, for minibatch KL
        weighting schedules), and
    ledger_terms(*batch, samples) -> terms                          for evaluation,
  terms being per-example tensors in nats, unweighted (DESIGN.md, "The ledger contract").
  Generative families also provide sample(n) -> (n, D) in data units.
"""

from types import ModuleType

from klbench.errors import ConfigError
from klbench.models import bbb, diffusion, vae

FAMILIES: dict[str, ModuleType] = {module.FAMILY: module for module in (vae, bbb, diffusion)}


def supports(family: ModuleType, kind: str, target: str | None) -> bool:
    """Whether `family` can train on a dataset of this kind and target type."""
    return kind in family.DATA_KINDS and (target is not None or not family.SUPERVISED)


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}'; known families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
