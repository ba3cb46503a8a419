"""Config: YAML -> validated dict -> typed per-run objects.

Config flows one way. `load_config` reads and merges YAML files (later files override
earlier ones key by key, as Snakemake's `--configfile` does) and `validate_config`
checks them against the JSON schema (the one Snakemake's workflow uses too, so the CLI
and the pipeline accept exactly the same files) and fills its defaults. `run_grid` lists
the (dataset, model, seed) runs, and `resolve_run` turns one of them into a `RunConfig`:
everything a training job needs, passed as explicit arguments from there on.
"""

import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from klbench.errors import ConfigError

SCHEMA_PATH = resources.files("klbench") / "schemas" / "config.schema.yaml"

# Short tags for swept hyperparameters in variant names (beta_vae-b0.5); others use the key.
SWEEP_TAGS = {"beta": "b"}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    eval_every: int

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class EvalConfig:
    samples: int
    iwae_k: tuple[int, ...]
    iwae_examples: int
    curve_points: int
    ece_bins: int

    def __post_init__(self) -> None:
        largest = max(self.iwae_k)
        if any(largest % k for k in self.iwae_k):
            raise ValueError(f"every iwae_k must divide the largest ({largest}), got {list(self.iwae_k)}")
        object.__setattr__(self, "iwae_k", tuple(sorted(self.iwae_k)))


@dataclass(frozen=True)
class RunConfig:
    """Everything one training job uses; written to the run's config.json."""

    dataset: str
    dataset_options: dict[str, Any]
    model: str
    family: str
    params: dict[str, Any]
    seed: int
    train: TrainConfig
    evaluate: EvalConfig
    threads: int = 1
    device: str = "cpu"
    tracking_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run_key(self) -> str:
        return f"{self.dataset}/{self.model}/seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of what determines the result (not where it is tracked or how many threads)."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("tracking_uri", "threads", "extra")}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        values = dict(values)
        values["train"] = checked_dataclass(TrainConfig, values.get("train", {}), "train")
        values["evaluate"] = checked_dataclass(EvalConfig, values.get("evaluate", {}), "evaluate")
        run = checked_dataclass(cls, values, "run")
        family_config(run.family, run.params, f"models.{run.model}.params")
        return run


def checked_dataclass(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown/missing keys and bad values -> ConfigError."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; known keys: {', '.join(fields)}")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in values]
    if missing:
        raise ConfigError(f"{where}: missing key '{missing[0]}'")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def family_config(family: str, params: Mapping[str, Any], where: str) -> Any:
    """The family's typed config (e.g. VAEConfig) from its params, checked."""
    from klbench.models import get_family

    return checked_dataclass(get_family(family).Config, params, where)


def load_config(paths: list[str | Path]) -> dict[str, Any]:
    """Read YAML files and merge them in order (dicts merge key by key; other values replace)."""
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        merge_into(merged, values)
    return merged


def merge_into(base: dict[str, Any], override: Mapping[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge_into(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _coerce_integer_strings(value: Any) -> Any:
    """Snakemake's `--config seeds=[0,1]` delivers strings; accept those that are integers."""
    if isinstance(value, list):
        return [_coerce_integer_strings(v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return value


def validate_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check a merged config against the schema and the registries; fill defaults.

    Every failure is a ConfigError whose message names the offending key.
    """
    import jsonschema

    config = copy.deepcopy(dict(raw))
    if "seeds" in config:
        config["seeds"] = _coerce_integer_strings(config["seeds"])
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator_cls = jsonschema.validators.extend(
        jsonschema.Draft202012Validator,
        {"properties": _set_defaults(jsonschema.Draft202012Validator.VALIDATORS["properties"])},
    )
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(config))
    if error is not None:
        raise ConfigError(describe_schema_error(error)) from None
    _check_semantics(config)
    return config


def _set_defaults(validate_properties):
    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if isinstance(subschema, dict) and "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return set_defaults


def describe_schema_error(error: Any) -> str:
    """One line naming the key, e.g. "config key 'train.epochs': -1 is less than the minimum of 1"."""
    path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    message = error.message
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' (?:was|were) unexpected", message)
        names = re.findall(r"'([^']+)'", message.split("(")[-1]) if not extra else extra
        allowed = sorted(error.schema.get("properties", {}))
        where = f"{path}." if path != "(top level)" else ""
        return f"unknown config key '{where}{names[0] if names else '?'}'; allowed here: {', '.join(allowed)}"
    if len(message) > 200:
        message = message[:200] + "..."
    return f"config key '{path}': {message}"


def _check_semantics(config: Mapping[str, Any]) -> None:
    from klbench.data import DATASETS

    for i, block in enumerate(config["run"]):
        for name in block["datasets"]:
            if name not in DATASETS:
                raise ConfigError(f"run.{i}.datasets: unknown dataset '{name}'; "
                                  f"known datasets: {', '.join(sorted(DATASETS))}")
        for name in block["models"]:
            if name not in config["models"]:
                raise ConfigError(f"run.{i}.models: unknown model '{name}'; "
                                  f"defined in `models`: {', '.join(config['models'])}")
    variants = expand_models(config)
    for family, model in config["baselines"].items():
        if model not in variants or variants[model]["family"] != family:
            raise ConfigError(f"baselines.{family}: '{model}' is not a model variant of family '{family}'; "
                              f"variants: {', '.join(v for v in variants if variants[v]['family'] == family) or 'none'}")
    for name in config["datasets"]:
        if name not in DATASETS:
            raise ConfigError(f"datasets: unknown dataset '{name}'; known datasets: {', '.join(sorted(DATASETS))}")
    for name, block in [("evaluate", config["evaluate"])] + [
        (f"datasets.{d}.evaluate", {**config["evaluate"], **b["evaluate"]}) for d, b in config["datasets"].items()
        if "evaluate" in b
    ]:
        checked_dataclass(EvalConfig, {**block, "iwae_k": tuple(block["iwae_k"])}, name)
    for variant in expand_models(config).values():
        family_config(variant["family"], variant["params"], f"models.{variant['base']}")
    if not run_grid(config):
        raise ConfigError("the grid is empty: no model in `run` can train on any dataset listed with it "
                          "(e.g. a classifier needs labelled data)")


def _sweep_name(base: str, key: str, value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{base}-{SWEEP_TAGS.get(key, key)}{text}"


def expand_models(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Model variants by name: sweeps expanded, family defaults merged under each model's params."""
    variants: dict[str, dict[str, Any]] = {}
    for base, spec in config["models"].items():
        params = {**config["families"].get(spec["family"], {}), **spec.get("params", {})}
        points = [(base, {})]
        if spec.get("sweep"):
            ((key, values),) = spec["sweep"].items()
            points = [(_sweep_name(base, key, v), {key: v}) for v in values]
        for name, change in points:
            if name in variants:
                raise ConfigError(f"models.{base}: variant name '{name}' is defined twice")
            variants[name] = {
                "base": base,
                "family": spec["family"],
                "params": {**params, **change},
                "train": spec.get("train", {}),
            }
    return variants


def run_grid(config: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """(dataset, model variant, seed) for every run the config asks for, keeping only the
    pairs whose family can model the dataset (e.g. no classifier on unlabelled 2-D data)."""
    from klbench.data import PROFILES
    from klbench.models import get_family, supports

    variants = expand_models(config)
    grid: dict[tuple[str, str, int], None] = {}  # ordered and without repeats across blocks
    for block in config["run"]:
        selected = [name for name, v in variants.items() if v["base"] in block["models"] or name in block["models"]]
        for d in block["datasets"]:
            for m in selected:
                if supports(get_family(variants[m]["family"]), *PROFILES[d]):
                    grid.update({(d, m, s): None for s in config["seeds"]})
    return list(grid)


def resolve_run(config: Mapping[str, Any], dataset: str, model: str, seed: int) -> RunConfig:
    """The RunConfig of one grid point: train settings = global < dataset < model overrides,
    evaluate settings = global < dataset."""
    variants = expand_models(config)
    if model not in variants:
        raise ConfigError(f"unknown model '{model}'; variants in this config: {', '.join(variants)}")
    variant = variants[model]
    dataset_block = config["datasets"].get(dataset, {})
    train = {**config["train"], **dataset_block.get("train", {}), **variant["train"]}
    evaluate = {**config["evaluate"], **dataset_block.get("evaluate", {})}
    evaluate["iwae_k"] = tuple(evaluate["iwae_k"])
    return RunConfig.from_dict(
        {
            "dataset": dataset,
            "dataset_options": dataset_block.get("options", {}),
            "model": model,
            "family": variant["family"],
            "params": variant["params"],
            "seed": int(seed),
            "train": train,
            "evaluate": evaluate,
            "threads": config["threads"],
            "device": config["device"],
            "tracking_uri": config["tracking_uri"],
        }
    )
