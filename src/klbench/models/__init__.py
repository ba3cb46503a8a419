"""The model families, by name: the registry, and the only place that lists them.

Each family module declares `FAMILY = Family(...)` (models/family.py says what a family
declares and what its model provides); adding a family is its module plus one line here.
"""

from klbench.errors import ConfigError
from klbench.models import bbb, diffusion, m2, vae, vib
from klbench.models.family import Family

FAMILIES: dict[str, Family] = {module.FAMILY.name: module.FAMILY for module in (vae, diffusion, bbb, vib, m2)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}'; known families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
