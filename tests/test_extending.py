"""A family is one declaration: a new one, defined here and nowhere in src/, flows through the
config schema, training, evaluation, aggregation, the figures and the report's categories."""

import math
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn

from klbench.aggregate import write_summary, write_tables
from klbench.config import load_config, resolve_run, run_grid, validate_config
from klbench.errors import ConfigError
from klbench.figures import plan_figures, write_all
from klbench.models import FAMILIES, get_family
from klbench.models.family import Diagnostics, Family, Figure, Rank, samples_run_figure
from klbench.settings import setting


@dataclass(frozen=True)
class GaussConfig:
    init_scale: float = setting(1.0, "Initial standard deviation of the fit.", exclusiveMinimum=0)


class DiagonalGaussian(nn.Module):
    """q(x) = N(x; mu, diag sigma^2) fitted by maximum likelihood. Its -log q(x) splits into
    center = 0.5 sum_j (x_j - mu_j)^2 / sigma_j^2 and spread = 0.5 sum_j log(2 pi sigma_j^2)."""

    def __init__(self, config: GaussConfig, dim: int):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(dim))
        self.log_sigma = nn.Parameter(torch.full((dim,), math.log(config.init_scale)))

    def terms(self, x):
        center = 0.5 * ((x - self.mu) / self.log_sigma.exp()).pow(2).sum(-1)
        spread = (0.5 * math.log(2 * math.pi) + self.log_sigma).sum().expand(len(x))
        return {"center": center, "spread": spread}

    def loss(self, x, batch_index, num_batches, progress=1.0):
        terms = self.terms(x)
        return sum(terms.values()).mean(), {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def ledger_terms(self, x, samples):
        return self.terms(x)

    @torch.no_grad()
    def sample(self, n):
        return self.mu + self.log_sigma.exp() * torch.randn(n, len(self.mu))


def diagnose(model, dataset, ledger, config, out_dir):
    return Diagnostics({"sigma_mean": model.log_sigma.exp().mean().item()})


GAUSS = Family(
    name="gauss", terms=("center", "spread"), data_kinds=("continuous",), targets=None,
    ranks=(Rank("density", "neg_elbo"),), config=GaussConfig,
    build=lambda config, dataset: DiagonalGaussian(config, dataset.dim),
    diagnose=diagnose, run_figure=samples_run_figure,
    figures=(Figure("center_spread", "plane", {"x": "center", "y": "spread", "title": "center against spread"}),),
    headline=("sigma_mean",),
)


@pytest.fixture
def with_gauss(monkeypatch):
    monkeypatch.setitem(FAMILIES, "gauss", GAUSS)


def gauss_config(repo, **params):
    raw = load_config([repo / "config" / "config.yaml"])
    raw["models"] = {"gauss": {"family": "gauss", "params": params}, "vae": {"family": "vae"}}
    raw["run"] = [{"datasets": ["checkerboard"], "models": ["gauss", "vae"]}]
    raw["seeds"] = [0, 1]
    raw["baselines"] = {}
    raw["datasets"]["checkerboard"] = {"options": {"n_train": 400, "n_test": 200}, "evaluate": {"iwae_examples": 50}}
    raw["train"] = {"steps": 40, "warmup": 0, "batch_size": 400, "lr": 0.05}
    raw["families"]["vae"]["train"] = {"steps": 2}
    raw["families"]["vae"]["evaluate"] = {"iwae_k": [1, 4]}
    return validate_config(raw)


def test_the_schema_knows_a_registered_family_and_checks_its_settings(repo, with_gauss):
    config = gauss_config(repo, init_scale=2.0)
    assert resolve_run(config, "checkerboard", "gauss", 0).params == GaussConfig(init_scale=2.0)
    with pytest.raises(ConfigError, match="config key 'models.gauss.params.init_scale': -1 is less than or equal"):
        gauss_config(repo, init_scale=-1)
    with pytest.raises(ConfigError, match="unknown config key 'models.gauss.params.scale'"):
        gauss_config(repo, scale=1)


@pytest.mark.slow
def test_a_new_family_flows_through_training_aggregation_figures_and_report(repo, tmp_path, monkeypatch, with_gauss):
    from klbench.run import execute_run
    from klbench.tracking import init_store

    monkeypatch.chdir(tmp_path)
    config = gauss_config(repo)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_store(uri, ["gauss", "vae"])
    runs = tmp_path / "runs"
    ledgers = []
    for dataset, model, seed in run_grid(config):
        run = resolve_run(config, dataset, model, seed)
        ledger = execute_run(run, runs / dataset / model / f"seed{seed}", progress=False, tracking_uri=uri)
        ledgers.append(runs / dataset / model / f"seed{seed}" / "ledger.json")
        if model == "gauss":
            assert list(ledger["terms"]) == ["center", "spread"] and ledger["run"]["headline"] == ["sigma_mean"]
            assert ledger["run"]["ranks"] == [{"task": "density", "metric": "neg_elbo", "higher_is_better": False}]
            # the fit's -log q(x) on held-out data, computed here from its own parameters
            state = torch.load(runs / dataset / model / f"seed{seed}" / "model.pt", weights_only=True)
            from klbench.data import load_dataset

            x = load_dataset("checkerboard", n_train=400, n_test=200).x_test.double()
            normal = torch.distributions.Normal(state["mu"].double(), state["log_sigma"].double().exp())
            assert ledger["derived"]["neg_elbo"] == pytest.approx(-normal.log_prob(x).sum(-1).mean().item(), rel=1e-5)
            assert ledger["derived"]["kl_total"] > 0  # a Gaussian cannot match the checkerboard's entropy

    # aggregation: the family's runs are ranked by what it declared, beside the VAE
    summary = write_summary(ledgers, tmp_path / "tables" / "summary.csv")
    write_tables(summary, tmp_path / "tables", {})
    ranking = pd.read_csv(tmp_path / "tables" / "ranking.csv")
    assert set(ranking["model"]) == {"gauss", "vae"} and set(ranking["metric"]) == {"neg_elbo"}
    means = summary.groupby("model")["neg_elbo"].mean()
    assert list(ranking.sort_values("rank")["model"]) == list(means.sort_values().index)
    markdown = (tmp_path / "tables" / "ledger.md").read_text()
    assert "center" in markdown and "spread" in markdown and "sigma_mean" in markdown

    # figures: the plan names the family's own figure and its training curves; each is drawn
    plan = plan_figures([(d, get_family(f)) for d, f in summary[["dataset", "family"]].drop_duplicates().itertuples(index=False)])
    by_name = {figure.name: figure for figure in plan}
    assert {"ledger_bars", "center_spread", "training_curves-gauss", "training_curves-vae", "rate_distortion",
            "iwae_vs_k", "sample_grids-checkerboard"} == set(by_name)
    assert by_name["center_spread"].families == ("gauss",) and by_name["training_curves-gauss"].category == "gauss"
    assert set(by_name["sample_grids-checkerboard"].families) == {"gauss", "vae"}
    captions = write_all(summary, runs, tmp_path / "figures", plan)
    assert set(captions) == set(by_name)
    for name in by_name:
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 5_000
    assert "center" in captions["center_spread"] and "spread" in captions["center_spread"]


def test_the_workflow_reads_report_categories_from_the_plan(repo):
    """report.smk files each comparison figure under the category its plan gives, and no rule
    file names a family."""
    rules = (repo / "workflow" / "rules" / "report.smk").read_text() + (repo / "workflow" / "rules" / "common.smk").read_text()
    assert "figure.category" in rules and "workflow_plan" in rules  # the plan (klbench/plan.py) holds plan_figures
    for name in FAMILIES:
        assert f'"{name}"' not in rules


def test_no_module_outside_models_names_a_family(repo):
    """The registry is the only place that lists the families (issue: `grep -rwE` finds only it)."""
    import re

    pattern = re.compile(r"\b(" + "|".join(FAMILIES) + r")\b")
    offenders = []
    for path in (repo / "src" / "klbench").rglob("*"):
        if path.suffix not in (".py", ".yaml") or "models" in path.relative_to(repo / "src" / "klbench").parts:
            continue
        offenders += [f"{path.name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
