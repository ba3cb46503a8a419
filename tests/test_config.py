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
    assert variants["vae"]["params"]["latent_dim"] == config["families"]["vae"]["latent_dim"]
    grid = run_grid(config)
    vae_blocks = [b for b in config["run"] if "vae" in b["models"]]
    vae_runs = [run for run in grid if variants[run[1]]["family"] == "vae"]
    assert len(vae_runs) == len(vae_blocks[0]["datasets"]) * 5 * len(config["seeds"]) >= 3 * 4 * 3
    assert len(set(grid)) == len(grid)


def test_grid_blocks_combine_without_repeats(default):
    default["run"] = [{"datasets": ["checkerboard", "digits"], "models": ["vae"]},
                      {"datasets": ["checkerboard"], "models": ["vae", "iwae"]}]
    default["seeds"] = [0]
    grid = run_grid(validate_config(default))
    assert grid == [("checkerboard", "vae", 0), ("digits", "vae", 0), ("checkerboard", "iwae-k5", 0)]


def test_smoke_config_merges_on_top_of_the_default(repo, default):
    config = validate_config(load_config([repo / "config" / "config.yaml", repo / "config" / "smoke.yaml"]))
    assert config["train"]["epochs"] == 3 and config["train"]["lr"] == default["train"]["lr"]
    pairs = {(d, m) for d, m, _ in run_grid(config)}
    assert {(d, m) for d in ("checkerboard", "digits") for m in ("vae", "iwae-k5")} | {("toy_curve", "bbb-gauss")} <= pairs


def test_train_settings_resolve_global_then_dataset_then_model(default):
    default["datasets"]["checkerboard"]["train"] = {"epochs": 7, "lr": 0.01}
    default["models"]["vae"]["train"] = {"lr": 0.02}
    config = validate_config(default)
    run = resolve_run(config, "checkerboard", "vae", 1)
    assert (run.train.epochs, run.train.lr, run.train.batch_size) == (7, 0.02, config["train"]["batch_size"])
    assert resolve_run(config, "mnist5k", "vae-mog", 0).train.epochs == config["datasets"]["mnist5k"]["train"]["epochs"]


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
        (lambda c: c.update(epochs=3), "unknown config key 'epochs'"),
        (lambda c: c["train"].update(epochs=-1), "config key 'train.epochs'"),
        (lambda c: c["train"].update(epochs="ten"), "config key 'train.epochs'"),
        (lambda c: c["train"].update(lr=0), "config key 'train.lr'"),
        (lambda c: c["train"].pop("batch_size"), "batch_size"),
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
        (lambda c: c["evaluate"].update(iwae_k=[1, 3, 64]), "every iwae_k must divide the largest"),
        (lambda c: c["evaluate"].update(iwae_k=[1, 10000]), "config key 'evaluate.iwae_k.1'"),
        (lambda c: c["models"]["beta_vae"].update(sweep={"beta": [0.5, -2.0]}), "beta must be > 0"),
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
