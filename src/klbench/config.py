"""Config: YAML -> validated dict -> typed per-run objects.

Config flows one way. `load_config` reads and merges YAML files (later files override
earlier ones key by key, as Snakemake's `--configfile` does) and `validate_config`
checks them against the JSON schema (`config_schema`: the static top level in
schemas/config.schema.yaml, and the sections of the settings dataclasses generated from
them, so a default or a limit is written once, in its dataclass) and fills the top-level
defaults. `run_grid` lists the (dataset, model, seed) runs, and `resolve_run` turns one of
them into a `RunConfig`: everything a training job needs, with typed settings, passed as
explicit arguments from there on.
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
from typing import Any, Literal

import yaml

from klbench.errors import ConfigError
from klbench.settings import build_settings, describe_schema_error, schema_of, setting

SCHEMA_PATH = resources.files("klbench") / "schemas" / "config.schema.yaml"

# Short tags of swept hyperparameters in variant names (beta_vae-b0.5); others use the key.
# Only names are made from them: a sweep's value is stored in the run's config and ledger.
SWEEP_TAGS = {"beta": "b"}


@dataclass(frozen=True)
class TrainConfig:
    """How every run trains (the `train` block; families, datasets and models override it).

    The budget is optimizer steps; epochs follow from it (steps x batch_size / n_train). The
    learning rate warms up linearly over the first `warmup` share of the steps, then follows the
    schedule. The model kept is the one with the best validation neg_elbo, or the best value of the
    bound the model trains on where that is another (IWAE's -L_k; train.py)."""

    steps: int = setting(4000, "Optimizer steps: the training budget (epochs follow from it).", minimum=1)
    batch_size: int = setting(128, "Examples per gradient step.", minimum=1)
    lr: float = setting(1e-3, "Peak Adam learning rate (after warm-up).", exclusiveMinimum=0)
    warmup: float = setting(0.025, "Share of the steps spent warming the learning rate up linearly from 0 to lr "
                            "(0: none).", minimum=0, exclusiveMaximum=1)
    schedule: Literal["cosine", "constant", "burda"] = setting(
        "cosine", "After warm-up: cosine decay from lr to lr x final_lr over the remaining steps; constant lr; or "
        "burda: Burda et al. 2016's 8 stages, stage i = 0..7 taking 3^i / 3280 of the steps at lr x 10^(-i/7).")
    final_lr: float = setting(0.1, "The cosine schedule's last learning rate, as a share of lr.", minimum=0, maximum=1)
    validation: float = setting(0.1, "Share of the training split held out for validation: a fixed, seeded cut "
                                "(the same for every seed and model) that picks the best checkpoint and judges "
                                "convergence. Datasets drawn fresh per batch have a validation set of their own.",
                                exclusiveMinimum=0, exclusiveMaximum=1)
    evaluations: int = setting(50, "Validation ledgers during training, evenly spaced in steps (the last at the "
                               "last step; at most one per step): the points of the training curves and of the "
                               "best-checkpoint choice.", minimum=2)
    validation_samples: int = setting(1, "Monte Carlo draws per example of each validation ledger (the same draws "
                                      "at every evaluation). Diffusion's one-draw estimate is noisy; more draws make "
                                      "the checkpoint choice and the convergence verdict less so.", minimum=1)
    converged_tol: float = setting(0.01, "A run has converged when its best validation neg_elbo (IWAE: -L_k) "
                                   "improved by less than this (nats per example) over the last 10% of its steps.",
                                   minimum=0)
    stack_seeds: bool = setting(False, "Train the seeds of one job as one stacked model (torch.func.vmap, each "
                                "seed's noise from its own generator) rather than one after another. The same "
                                "results; on a CPU no faster for small MLPs (tests/benchmarks/bench_seeds.py).")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.steps)


@dataclass(frozen=True)
class EvalConfig:
    """How every run is evaluated (the `evaluate` block). A family whose diagnostics need more
    settings declares a subclass with them (its `Family.evaluate`)."""

    samples: int = setting(16, "Monte Carlo samples per example for the held-out ledger terms.", minimum=1)


@dataclass(frozen=True)
class JobResources:
    """What one training job (the seeds of a dataset x model) asks a cluster scheduler for: the
    `resources` block, overridden per dataset by datasets.<d>.resources. Snakemake passes them
    to its executor (SLURM: --mem, --time); a local run schedules by --cores and ignores them
    unless --resources caps mem_mb. A GPU is requested when `device` is cuda."""

    mem_mb: int = setting(2000, "Memory per training job in MB (measured on the default benchmark: median 430, "
                          "max 1,160).", minimum=1)
    runtime: int = setting(60, "Wall-time limit per training job in minutes.", minimum=1)


def job_resources(config: Mapping[str, Any], dataset: str) -> dict[str, int]:
    """A training job's resources on `dataset`: the JobResources defaults < `resources` <
    datasets.<dataset>.resources; gpu 1 where device is cuda (auto may land on a CPU node)."""
    resources = {**dataclasses.asdict(JobResources()), **config["resources"],
                 **config["datasets"].get(dataset, {}).get("resources", {})}
    return {**resources, "gpu": int(config["device"] == "cuda")}


@dataclass(frozen=True)
class RunConfig:
    """Everything one training job uses; written to the run's config.json.

    params and evaluate are the family's typed settings (Family.config, Family.evaluate);
    variant_of is the `models` entry the variant comes from, sweep its swept value ({} if none)."""

    dataset: str
    dataset_options: dict[str, Any]
    model: str
    family: str
    params: Any
    seed: int
    train: TrainConfig
    evaluate: Any
    variant_of: str = ""
    sweep: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    device: str = "cpu"
    tracking_uri: str | None = None

    @property
    def run_key(self) -> str:
        return f"{self.dataset}/{self.model}/seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of what determines the result (not where it is tracked or how many threads)."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("tracking_uri", "threads")}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        """A RunConfig from its dict (config.json, --spec): every part checked, settings typed."""
        from klbench.models import get_family

        if not isinstance(values, Mapping):
            raise ConfigError(f"run: expected a mapping, got {type(values).__name__}")
        values = dict(values)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"run: unknown key '{unknown[0]}'; known keys: {', '.join(fields)}")
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and n not in values]
        if missing:
            raise ConfigError(f"run: missing key '{missing[0]}'")
        family = get_family(values["family"])
        where = f"models.{values['model']}"
        values["params"] = build_settings(family.config, values["params"], f"{where}.params")
        values["evaluate"] = build_settings(family.evaluate, values["evaluate"], f"{where}.evaluate")
        values["train"] = build_settings(TrainConfig, values["train"], f"{where}.train")
        values.setdefault("variant_of", values["model"])
        return cls(**values)


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


def _union_schema(classes: list[type]) -> dict[str, Any]:
    """An object that may hold any field of any of these settings classes (first declaration wins)."""
    properties: dict[str, Any] = {}
    for cls in classes:
        for name, schema in schema_of(cls)["properties"].items():
            properties.setdefault(name, schema)
    return {"type": "object", "additionalProperties": False, "properties": properties}


def config_schema() -> dict[str, Any]:
    """The whole config schema: the static top level (schemas/config.schema.yaml) with the
    sections of the settings dataclasses generated from them, one per registered family."""
    from klbench.models import FAMILIES

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    defs = schema["$defs"]
    defs["train"] = {**schema_of(TrainConfig), "description": "Overrides of the `train` settings."}
    defs["resources"] = {**schema_of(JobResources), "description": "Overrides of the `resources` settings."}
    schema["properties"]["resources"] = {**schema_of(JobResources), "default": {},
                                         "description": "What each training job asks a cluster scheduler for."}
    defs["evaluate"] = {**_union_schema([EvalConfig] + [f.evaluate for f in FAMILIES.values()]),
                        "description": "Overrides of evaluation settings (keys of any family's `evaluate`)."}
    schema["properties"]["evaluate"] = {**schema_of(EvalConfig), "default": {},
                                        "description": "Evaluation settings of every run; family-specific ones go "
                                                       "in families.<family>.evaluate."}
    schema["properties"]["train"] = {**schema_of(TrainConfig), "default": {},
                                     "description": "Training settings of every run."}
    families = schema["properties"]["families"]
    families["properties"] = {
        name: {"type": "object", "additionalProperties": False, "properties": {
            "params": {**schema_of(family.config), "description": f"Hyperparameters of every {name} model."},
            "train": {"$ref": "#/$defs/train"},
            "evaluate": {**schema_of(family.evaluate), "description": f"Evaluation of every {name} model."}}}
        for name, family in FAMILIES.items()
    }
    per_dataset = schema["properties"]["datasets"]["additionalProperties"]["properties"]["families"]
    per_dataset.update(additionalProperties=False, properties=families["properties"])
    model = schema["properties"]["models"]["additionalProperties"]
    model["properties"]["family"]["enum"] = list(FAMILIES)
    model["allOf"] = [
        {"if": {"properties": {"family": {"const": name}}},
         "then": {"properties": {"params": schema_of(family.config), "evaluate": schema_of(family.evaluate)}}}
        for name, family in FAMILIES.items()
    ]
    return schema


def validate_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check a merged config against the schema and the registries; fill top-level defaults.

    Every failure is a ConfigError whose message names the offending key.
    """
    import jsonschema

    config = copy.deepcopy(dict(raw))
    if "seeds" in config:
        config["seeds"] = _coerce_integer_strings(config["seeds"])
    validator_cls = jsonschema.validators.extend(
        jsonschema.Draft202012Validator,
        {"properties": _set_defaults(jsonschema.Draft202012Validator.VALIDATORS["properties"])},
    )
    error = jsonschema.exceptions.best_match(validator_cls(config_schema()).iter_errors(config))
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


def _check_semantics(config: Mapping[str, Any]) -> None:
    """What the schema cannot say: names that must exist, and every run's settings built
    (sweep values, rules between fields) for one seed of the grid."""
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
    grid = run_grid(config)
    if not grid:
        raise ConfigError("the grid is empty: no model in `run` can train on any dataset listed with it "
                          "(e.g. a classifier needs labelled data)")
    for dataset, model in dict.fromkeys((d, m) for d, m, _ in grid):
        resolve_run(config, dataset, model, config["seeds"][0])


def _sweep_name(base: str, key: str, value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{base}-{SWEEP_TAGS.get(key, key)}{text}"


def expand_models(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Model variants by name: each `models` entry, or each point of its sweep, with its
    family, params (the sweep value included), sweep ({key: value} or {}) and overrides."""
    variants: dict[str, dict[str, Any]] = {}
    for base, spec in config["models"].items():
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
                "params": {**spec.get("params", {}), **change},
                "sweep": change,
                "train": spec.get("train", {}),
                "evaluate": spec.get("evaluate", {}),
            }
    return variants


def run_grid(config: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """(dataset, model variant, seed) for every run the config asks for, keeping only the
    pairs whose family can model the dataset (e.g. no classifier on unlabelled data)."""
    from klbench.data import PROFILES
    from klbench.models import get_family

    variants = expand_models(config)
    grid: dict[tuple[str, str, int], None] = {}  # ordered and without repeats across blocks
    for block in config["run"]:
        selected = [name for name, v in variants.items() if v["base"] in block["models"] or name in block["models"]]
        for d in block["datasets"]:
            for m in selected:
                if get_family(variants[m]["family"]).supports(*PROFILES[d]):
                    grid.update({(d, m, s): None for s in config["seeds"]})
    return list(grid)


def seed_blocks(seeds: list[int], per_job: int) -> list[tuple[int, ...]]:
    """The seeds of each training job: those with the same seed // per_job, in order.

    Blocks go by seed value, not position, so a new seed joins (and re-runs) only its own
    block and every other job stays as it is."""
    blocks: dict[int, list[int]] = {}
    for seed in sorted(seeds):
        blocks.setdefault(seed // per_job, []).append(seed)
    return [tuple(block) for block in blocks.values()]


def resolve_run(config: Mapping[str, Any], dataset: str, model: str, seed: int) -> RunConfig:
    """The RunConfig of one grid point. Each setting takes the most specific value given:
    train: `train` < families.<f>.train < datasets.<d>.train < datasets.<d>.families.<f>.train
    < models.<m>.train; evaluate: `evaluate` < families.<f>.evaluate < datasets.<d>.evaluate
    (the keys the family has) < datasets.<d>.families.<f>.evaluate < models.<m>.evaluate;
    params: families.<f>.params < datasets.<d>.families.<f>.params < models.<m>.params < the
    sweep value; and below all of them the defaults of the settings dataclasses."""
    from klbench.models import get_family

    variants = expand_models(config)
    if model not in variants:
        raise ConfigError(f"unknown model '{model}'; variants in this config: {', '.join(variants)}")
    variant = variants[model]
    family = get_family(variant["family"])
    family_block = config["families"].get(family.name, {})
    dataset_block = config["datasets"].get(dataset, {})
    on_dataset = dataset_block.get("families", {}).get(family.name, {})
    known = {f.name for f in dataclasses.fields(family.evaluate)}
    return RunConfig.from_dict(
        {
            "dataset": dataset,
            "dataset_options": dataset_block.get("options", {}),
            "model": model,
            "family": family.name,
            "params": {**family_block.get("params", {}), **on_dataset.get("params", {}), **variant["params"]},
            "seed": int(seed),
            "train": {**config["train"], **family_block.get("train", {}), **dataset_block.get("train", {}),
                      **on_dataset.get("train", {}), **variant["train"]},
            "evaluate": {**config["evaluate"], **family_block.get("evaluate", {}),
                         **{k: v for k, v in dataset_block.get("evaluate", {}).items() if k in known},
                         **on_dataset.get("evaluate", {}), **variant["evaluate"]},
            "variant_of": variant["base"],
            "sweep": variant["sweep"],
            "threads": config["threads"],
            "device": config["device"],
            "tracking_uri": config["tracking_uri"],
        }
    )
