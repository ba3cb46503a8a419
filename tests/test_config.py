import pytest

from klbench.config import (
    RunConfig,
    expand_models,
    load_config,
    resolve_run,
    run_grid,
    validate_config,
)
from klbench.errors import ConfigError


@pytest.fixture
def default(repo):
    return load_config([repo / "config" / "config.yaml"])


def test_default_config_is_valid_and_expands_sweeps(default):
    config = validate_config(default)
    variants = expand_models(config)
    vae_variants = {name for name, v in variants.items() if v["family"] == "vae"}
    assert {"vae", "beta_vae-b0.25", "beta_vae-b2", "iwae-k5", "vae-mog"} == vae_variants
    assert variants["beta_vae-b0.25"]["params"]["beta"] == 0.25
    assert variants["iwae-k5"]["params"]["k"] == 5
    assert variants["vae-mog"]["params"]["prior"] == "mog"
    assert resolve_run(config, "digits", "vae", 0).params.latent_dim == config["families"]["vae"]["params"]["latent_dim"]
    grid = run_grid(config)
    assert len(set(grid)) == len(grid)
    pairs = {(d, m) for d, m, _ in grid}
    # the toys (continuous data) leave out the beta sweep, which degenerates there; mnist5k runs it
    for toy in ("eight_gaussians", "checkerboard"):
        assert {(toy, m) for m in ("vae", "iwae-k5", "vae-mog", "ddpm-linear", "vdm-learned")} <= pairs
        assert not any(d == toy and m.startswith("beta_vae") for d, m in pairs)
    assert {("mnist5k", m) for m in vae_variants} <= pairs
    assert len(grid) == len(pairs) * len(config["seeds"]) and len(config["seeds"]) == 3


def test_the_full_config_adds_every_model_on_every_dataset(repo, default):
    """config/full.yaml: the default's grid and the rest (mnist5k diffusion, M2 and VIB on both
    image sets, the beta sweep on the toys), mnist5k diffusion at DDPM-cosine's optimum."""
    full = validate_config(load_config([repo / "config" / "config.yaml", repo / "config" / "full.yaml"]))
    pairs = {(d, m) for d, m, _ in run_grid(full)}
    assert {(d, m) for d, m, _ in run_grid(validate_config(default))} <= pairs
    variants = expand_models(full)
    for dataset in ("eight_gaussians", "checkerboard", "mnist5k"):
        assert {(dataset, m) for m, v in variants.items() if v["family"] in ("vae", "diffusion")} <= pairs
    for dataset in ("digits", "mnist5k"):
        assert {(dataset, m) for m, v in variants.items() if v["family"] in ("vib", "m2")} <= pairs
    assert full["results_dir"] != default["results_dir"]  # the default's results stay as they are
    for model in ("ddpm-linear", "ddpm-cosine", "vdm-fixed", "vdm-learned"):
        train = resolve_run(full, "mnist5k", model, 0).train
        # DDPM-cosine's measured optimum, chosen on validation ledgers of several draws of t
        assert train.steps >= 3000 and train.validation_samples >= 8


def test_grid_blocks_combine_without_repeats(default):
    default["run"] = [{"datasets": ["checkerboard", "digits"], "models": ["vae"]},
                      {"datasets": ["checkerboard"], "models": ["vae", "iwae"]}]
    default["seeds"] = [0]
    grid = run_grid(validate_config(default))
    assert grid == [("checkerboard", "vae", 0), ("digits", "vae", 0), ("checkerboard", "iwae-k5", 0)]


def test_smoke_config_merges_on_top_of_the_default(repo, default):
    config = validate_config(load_config([repo / "config" / "config.yaml", repo / "config" / "smoke.yaml"]))
    assert config["train"]["steps"] == 30 and config["train"]["lr"] == default["train"]["lr"]
    pairs = {(d, m) for d, m, _ in run_grid(config)}
    assert {(d, m) for d in ("checkerboard", "digits") for m in ("vae", "iwae-k5")} | {("toy_curve", "bbb-gauss")} <= pairs


def test_every_smoke_run_trains_only_a_few_steps(repo):
    """The default's dataset, family and model budgets are more specific than the smoke's `train`:
    the smoke config must override each of them, or the smoke pipeline trains the full budgets."""
    config = validate_config(load_config([repo / "config" / "config.yaml", repo / "config" / "smoke.yaml"]))
    for dataset, model, seed in run_grid(config):
        assert resolve_run(config, dataset, model, seed).train.steps <= 50, (dataset, model)


def test_train_settings_resolve_global_then_dataset_then_model(default):
    # a dataset without per-family budgets (the default's toys set the VAEs' own)
    default["datasets"]["two_moons"] = {"train": {"steps": 7000, "lr": 0.01}}
    default["models"]["vae"]["train"] = {"lr": 0.02}
    config = validate_config(default)
    run = resolve_run(config, "two_moons", "vae", 1)
    assert (run.train.steps, run.train.lr, run.train.batch_size) == (7000, 0.02, config["train"]["batch_size"])
    assert resolve_run(config, "mnist5k", "map", 0).train.steps == config["datasets"]["mnist5k"]["train"]["steps"]


def test_a_familys_settings_on_one_dataset_beat_the_familys_and_yield_to_the_models(default):
    default["datasets"]["digits"] = {"families": {"vae": {"params": {"hidden": [64], "latent_dim": 3},
                                                           "train": {"steps": 77}, "evaluate": {"iwae_examples": 9}}}}
    default["models"]["vae-mog"]["params"]["latent_dim"] = 5
    config = validate_config(default)
    vae, mog = resolve_run(config, "digits", "vae", 0), resolve_run(config, "digits", "vae-mog", 0)
    assert (vae.params.hidden, vae.params.latent_dim, vae.train.steps, vae.evaluate.iwae_examples) == ([64], 3, 77, 9)
    assert (mog.params.hidden, mog.params.latent_dim) == ([64], 5)  # the model's own params win
    elsewhere = resolve_run(config, "checkerboard", "vae", 0)
    assert elsewhere.params.hidden == config["families"]["vae"]["params"]["hidden"]
    assert resolve_run(config, "digits", "ddpm-linear", 0).train.steps != 77  # another family is untouched
    default["datasets"]["digits"]["families"] = {"vae": {"params": {"hiden": [1]}}}
    with pytest.raises(ConfigError, match="unknown config key 'datasets.digits.families.vae.params.hiden'"):
        validate_config(default)


def test_settings_resolve_from_family_dataset_and_model_blocks(default):
    """train: global < families.<f>.train < datasets.<d>.train < models.<m>.train; evaluate keys
    of a dataset apply to the families that have them; params: family < model < sweep value."""
    default["train"] = {"steps": 500, "lr": 0.1, "batch_size": 64}
    default["families"]["diffusion"]["train"] = {"steps": 900, "batch_size": 256}
    default["datasets"]["checkerboard"]["train"] = {"batch_size": 32}
    default["models"]["ddpm-cosine"]["train"] = {"steps": 1100}
    default["datasets"]["checkerboard"]["evaluate"] = {"iwae_examples": 7, "curve_points": 5}
    config = validate_config(default)
    cosine = resolve_run(config, "checkerboard", "ddpm-cosine", 0)
    assert (cosine.train.steps, cosine.train.batch_size, cosine.train.lr) == (1100, 32, 0.1)
    default["families"]["vae"]["train"] = {"steps": 900, "batch_size": 256}
    config = validate_config(default)
    vae = resolve_run(config, "mnist5k", "vae", 0)
    # datasets.mnist5k.families.vae.train beats datasets.mnist5k.train and families.vae.train
    assert (vae.train.steps, vae.train.batch_size) == (
        config["datasets"]["mnist5k"]["families"]["vae"]["train"]["steps"], 256)
    assert resolve_run(config, "digits", "vae", 0).train.steps == 900  # families.vae.train
    assert resolve_run(config, "digits", "bbb-gauss", 0).train.steps == 500  # the global train
    assert cosine.evaluate.curve_points == 5 and not hasattr(cosine.evaluate, "iwae_examples")
    vae = resolve_run(config, "checkerboard", "vae", 0)
    assert vae.evaluate.iwae_examples == 7 and not hasattr(vae.evaluate, "curve_points")
    default["families"]["vae"]["params"]["beta"] = 3.0
    default["models"]["beta_vae"]["params"] = {"latent_dim": 4}
    swept = resolve_run(validate_config(default), "digits", "beta_vae-b0.25", 0)
    assert (swept.params.beta, swept.params.latent_dim) == (0.25, 4)
    assert resolve_run(validate_config(default), "digits", "vae", 0).params.beta == 3.0


def test_defaults_of_the_settings_dataclasses_fill_what_a_config_leaves_out(default):
    """A family block may be absent: every setting has its default in the family's module."""
    from klbench.models import get_family
    from klbench.settings import defaults_of

    del default["families"]["bbb"]
    run = resolve_run(validate_config(default), "digits", "bbb-gauss", 0)
    assert run.params == get_family("bbb").config(**defaults_of(get_family("bbb").config))
    assert run.train.lr == default["train"]["lr"]  # the family block held lr 0.01


def test_a_sweep_records_its_value_and_names_are_never_parsed(default):
    default["models"]["x-h32"] = {"family": "vae", "params": {"latent_dim": 3}}
    default["run"] = [{"datasets": ["digits"], "models": ["x-h32", "beta_vae"]}]
    config = validate_config(default)
    plain = resolve_run(config, "digits", "x-h32", 0)
    assert (plain.sweep, plain.variant_of) == ({}, "x-h32")
    swept = resolve_run(config, "digits", "beta_vae-b2", 0)
    assert (swept.sweep, swept.variant_of, swept.params.beta) == ({"beta": 2.0}, "beta_vae", 2.0)
    assert swept.to_dict()["sweep"] == {"beta": 2.0}


def test_schema_family_sections_are_generated_from_the_settings_dataclasses():
    from klbench.config import config_schema
    from klbench.models import FAMILIES
    from klbench.settings import schema_of

    schema = config_schema()
    families = schema["properties"]["families"]["properties"]
    assert set(families) == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert families[name]["properties"]["params"]["properties"] == schema_of(family.config)["properties"]
        assert families[name]["properties"]["evaluate"]["properties"] == schema_of(family.evaluate)["properties"]
        for field, spec in schema_of(family.config)["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"
    assert schema["properties"]["models"]["additionalProperties"]["properties"]["family"]["enum"] == list(FAMILIES)


def test_run_config_round_trips_and_hash_ignores_where_it_is_tracked(default):
    config = validate_config(default)
    run = resolve_run(config, "checkerboard", "beta_vae-b2", 2)
    again = RunConfig.from_dict(run.to_dict())
    assert again == run and again.run_key == "checkerboard/beta_vae-b2/seed2"
    moved = RunConfig.from_dict({**run.to_dict(), "tracking_uri": "http://127.0.0.1:5000", "threads": 4})
    assert moved.config_hash() == run.config_hash()
    changed = RunConfig.from_dict({**run.to_dict(), "seed": 3})
    assert changed.config_hash() != run.config_hash()


def test_seeds_given_as_strings_on_the_command_line_are_integers(default):
    default["seeds"] = ["0", "1"]
    assert validate_config(default)["seeds"] == [0, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(steps=3), "unknown config key 'steps'"),
        (lambda c: c["train"].update(steps=-1), "config key 'train.steps'"),
        (lambda c: c["train"].update(steps="ten"), "config key 'train.steps'"),
        (lambda c: c["train"].update(epochs=40), "unknown config key 'train.epochs'"),
        (lambda c: c["train"].update(warmup=1), "config key 'train.warmup'"),
        (lambda c: c["train"].update(lr=0), "config key 'train.lr'"),
        (lambda c: c["train"].update(batch_size=0), "config key 'train.batch_size': 0 is less than the minimum of 1"),
        (lambda c: c["families"]["diffusion"]["train"].update(lr=-1), "config key 'families.diffusion.train.lr'"),
        (lambda c: c["families"]["vae"]["params"].update(latnt_dim=3),
         "unknown config key 'families.vae.params.latnt_dim'"),
        (lambda c: c["families"].update(gan={}), "unknown config key 'families.gan'"),
        (lambda c: c["datasets"]["mnist5k"].update(evaluate={"iwae_exampels": 3}),
         "unknown config key 'datasets.mnist5k.evaluate.iwae_exampels'"),
        (lambda c: c["evaluate"].update(iwae_k=[1, 64]), "unknown config key 'evaluate.iwae_k'; allowed here: samples"),
        (lambda c: c["models"]["vae"].update(params={"beta": -1.0}), "config key 'models.vae.params.beta'"),
        (lambda c: c["models"]["vae"].update(params={"bta": 2.0}), "unknown config key 'models.vae.params.bta'"),
        (lambda c: c["models"]["vae"].update(family="gan"), "config key 'models.vae.family'"),
        (lambda c: c["run"][0].update(datasets=["mnist9k"]), "unknown dataset 'mnist9k'; known datasets: "),
        (lambda c: c["run"][0].update(models=["vea"]), "run.0.models: unknown model 'vea'"),
        (lambda c: c["run"][0].update(model=["vae"]), "unknown config key 'run.0.model'"),
        (lambda c: c.update(run={"datasets": ["digits"], "models": ["vae"]}), "config key 'run'"),
        (lambda c: c.update(seeds=["a"]), "config key 'seeds.0'"),
        (lambda c: c.update(seeds=[0.5]), "config key 'seeds.0'"),
        (lambda c: c.update(seeds=[]), "config key 'seeds'"),
        (lambda c: c["families"]["vae"]["evaluate"].update(iwae_k=[1, 3, 64]), "every iwae_k must divide the largest"),
        (lambda c: c["families"]["vae"]["evaluate"].update(iwae_k=[1, 10000]),
         "config key 'families.vae.evaluate.iwae_k.1'"),
        (lambda c: c["models"]["beta_vae"].update(sweep={"beta": [0.5, -2.0]}),
         "config key 'models.beta_vae-b-2.params.beta': -2.0 is less than or equal to the minimum of 0"),
        (lambda c: c.update(device="tpu"), "config key 'device'"),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(default, change, message):
    change(default)
    with pytest.raises(ConfigError) as error:
        validate_config(default)
    text = str(error.value)
    assert message in text
    assert "\n" not in text and len(text) < 300


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config([tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config([scalar])


def test_config_readme_shows_every_setting_as_the_code_declares_it(repo):
    """config/README.md's tables are `klbench settings`' output: defaults, limits and meaning
    come from one declaration, and the page cannot drift from it."""
    from klbench.config import EvalConfig, JobResources, TrainConfig
    from klbench.models import FAMILIES
    from klbench.settings import settings_table

    readme = (repo / "config" / "README.md").read_text()
    for cls in [TrainConfig, EvalConfig, JobResources] + [c for f in FAMILIES.values() for c in (f.config, f.evaluate)]:
        assert settings_table(cls) in readme, f"config/README.md lacks the current table of {cls.__qualname__}"


def test_training_jobs_ask_for_the_configs_resources_per_dataset_and_a_gpu_only_with_cuda(default):
    from klbench.config import job_resources

    default["resources"] = {"mem_mb": 3000}
    default["datasets"]["mnist5k"]["resources"] = {"runtime": 240}
    config = validate_config(default)
    assert job_resources(config, "checkerboard") == {"mem_mb": 3000, "runtime": 60, "gpu": 0}
    assert job_resources(config, "mnist5k") == {"mem_mb": 3000, "runtime": 240, "gpu": 0}
    assert job_resources(validate_config({**default, "device": "cuda"}), "digits")["gpu"] == 1
    assert job_resources(validate_config({**default, "device": "auto"}), "digits")["gpu"] == 0
    with pytest.raises(ConfigError, match="resources"):
        validate_config({**default, "resources": {"memory": 3000}})
    with pytest.raises(ConfigError, match="runtime"):
        validate_config({**default, "resources": {"runtime": 0}})


@pytest.mark.slow
def test_the_workflow_gives_training_jobs_those_resources(repo, tmp_path):
    """(That aggregation, figures and the report stay local is checked on a real SLURM cluster:
    tests/test_cluster.py finds only the training jobs in sacct.)"""
    import subprocess

    from conftest import snakemake_command

    override = tmp_path / "resources.yaml"
    override.write_text("resources: {mem_mb: 3000}\ndatasets: {digits: {resources: {runtime: 90}}}\n")
    command, env = snakemake_command(tmp_path, repo / "config" / "smoke.yaml", override, args=("--dry-run",))
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = (out.stdout + out.stderr).split("\nrule ")[1:]
    train = [job for job in jobs if job.startswith("train_seeds_")]
    assert train and all("mem_mb=3000" in job and "gpu=0" in job for job in train)
    assert all(("runtime=90" in job) == ("/digits/" in job) for job in train)
    local = [job for job in jobs if job.startswith(("summary", "figures", "mlflow_summary", "run_figure"))]
    assert local and all("mem_mb=2000" in job and "runtime=30" in job for job in local)
