"""Model families, by name. A family module provides:

FAMILY (its name), TERMS (its ledger term names), DATA_KINDS (dataset kinds it models),
Config (a frozen dataclass of its hyperparameters) and build(config, dim, kind, levels)
returning an nn.Module with `loss(x)` -> (objective, terms) for training and
`ledger_terms(x, samples)` -> terms for evaluation, both per example in nats.
"""

from types import ModuleType

from klbench.errors import ConfigError
from klbench.models import vae

FAMILIES: dict[str, ModuleType] = {module.FAMILY: module for module in (vae,)}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}'; known families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
