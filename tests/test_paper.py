"""config/paper.yaml, Burda et al. 2016's Table 1 protocol: its settings as published, and the
whole pipeline on it at a tiny scale on IDX files written here (dynamic binarization, the six
variants, the published figures beside the runs' numbers)."""

import json

import pytest
import yaml

from conftest import REPO, run_snakemake, write_grey_idx
from klbench.config import load_config, resolve_run, run_grid, validate_config

PAPER = REPO / "config" / "paper.yaml"
VARIANTS = ["vae-k1", "vae-k5", "vae-k50", "iwae-k1", "iwae-k5", "iwae-k50"]
PUBLISHED = {"vae-k1": 86.76, "vae-k5": 86.47, "vae-k50": 86.35, "iwae-k1": 86.76, "iwae-k5": 85.54, "iwae-k50": 84.78}


def test_the_paper_config_states_burda_et_al_s_protocol():
    config = validate_config(load_config([REPO / "config" / "config.yaml", PAPER]))
    assert sorted(m for _, m, _ in run_grid(config)) == sorted(VARIANTS)
    for model in VARIANTS:
        run = resolve_run(config, "mnist", model, 0)
        assert run.dataset_options["binarization"] == "dynamic"
        assert (run.params.latent_dim, run.params.hidden, run.params.activation) == (50, [200, 200], "tanh")
        assert run.params.k == int(model.split("-k")[1])
        assert run.params.objective == ("elbo" if model.startswith("vae") else "iwae")
        train = run.train
        assert (train.batch_size, train.lr, train.schedule, train.warmup) == (20, 0.001, "burda", 0)
        assert train.steps == 3280 * 60000 // 20  # 3,280 passes over 60,000 images
        assert max(run.evaluate.iwae_k) == 5000 and run.evaluate.iwae_examples == 10000
    published = {(p["model"], p["metric"]): p["value"] for p in config["published"]}
    assert published == {(m, "nll_bound"): v for m, v in PUBLISHED.items()}


@pytest.mark.slow
def test_the_paper_pipeline_runs_at_a_tiny_scale_and_shows_the_published_figures(tmp_path):
    data = write_grey_idx(tmp_path / "idx", 120, 30)  # grey levels: dynamic binarization has work to do
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({
        "datasets": {"mnist": {"options": {"path": str(data)}, "train": {"steps": 12},
                               "evaluate": {"iwae_examples": 30}}},
        "families": {"vae": {"train": {"evaluations": 3, "validation": 0.1}, "evaluate": {"iwae_k": [1, 5, 50]}}},
    }))
    run_snakemake(tmp_path, PAPER, tiny)
    runs = tmp_path / "results" / "paper" / "runs" / "mnist"
    for model in VARIANTS:
        ledger = json.loads((runs / model / "seed0" / "ledger.json").read_text())
        assert ledger["run"]["split"]["binarization"] == "dynamic"
        assert ledger["run"]["split"]["validation"]["n_val"] == 12
        assert ledger["train"]["steps"] == 12 and ledger["train"]["epochs"] == pytest.approx(12 * 20 / 108)
        assert ledger["derived"]["nll_bound"] <= ledger["derived"]["neg_elbo"] + 1e-6  # -L_50 <= -ELBO
    table = (tmp_path / "results" / "paper" / "tables" / "ledger.md").read_text()
    for model, value in PUBLISHED.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {model} "))
        assert f"{value:g} (nll_bound)" in row
    assert "published: Burda et al. 2016, Table 1" in table
