"""End to end: the smoke config through real Snakemake into a temporary directory, with
real MLflow tracking on the default SQLite store, checked from the files and the store."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient
import pytest

from conftest import run_snakemake
from services import CHROMIUM, NO_CHROMIUM, check_mlflow_ui, free_port, wait_until
from klbench.config import expand_models, resolve_run, run_grid
from klbench.figures import plan_figures
from klbench.models import FAMILIES, get_family
from klbench.train import evaluation_steps

pytestmark = pytest.mark.slow


def snakemake(repo: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_snakemake(workdir, repo / "config" / "smoke.yaml", args=args)


def families_of(config) -> dict[str, str]:
    variants = expand_models(config)
    return {model: variants[model]["family"] for _, model, _ in run_grid(config)}


def figure_names(config) -> list[str]:
    variants = expand_models(config)
    return [f.name for f in plan_figures([(d, get_family(variants[m]["family"])) for d, m, _ in run_grid(config)])]


def test_the_smoke_grid_holds_every_family(smoke):
    _, _, config, _ = smoke
    assert set(families_of(config).values()) == set(FAMILIES)


def test_every_run_directory_is_complete_and_its_ledger_adds_up(smoke):
    _, workdir, config, _ = smoke
    family_of = families_of(config)
    for dataset, model, seed in run_grid(config):
        run_dir = workdir / "results" / "runs" / dataset / model / f"seed{seed}"
        for name in ("ledger.json", "history.csv", "config.json", "model.pt", "samples.png", "mlflow.json", "timing.json"):
            assert (run_dir / name).stat().st_size > 0, f"{run_dir / name} missing or empty"
        assert not (run_dir / ".staging").exists()
        ledger = json.loads((run_dir / "ledger.json").read_text())
        terms, derived, diagnostics = ledger["terms"], ledger["derived"], ledger["diagnostics"]
        family = family_of[model]
        assert ledger["run"]["key"] == f"{dataset}/{model}/seed{seed}" and ledger["run"]["family"] == family
        assert tuple(terms) == FAMILIES[family].terms
        assert all(math.isfinite(v) for v in terms.values())
        assert derived["neg_elbo"] == pytest.approx(sum(terms.values()), rel=1e-9)
        history = pd.read_csv(run_dir / "history.csv")
        train = resolve_run(config, dataset, model, seed).train
        assert list(history.loc[history["split"] == "val", "step"]) == evaluation_steps(train)
        assert ledger["train"]["steps"] == train.steps and ledger["train"]["best_step"] in evaluation_steps(train)
        assert isinstance(ledger["train"]["converged"], bool)
        assert "validation" in ledger["run"]["split"]  # the split the checkpoint was chosen on is recorded
        assert (history["neg_elbo"] - history[list(terms)].sum(axis=1)).abs().max() < 1e-6
        assert (run_dir / "samples.npz").exists() == FAMILIES[family].density  # density models only
        if family == "vae":
            check_vae_ledger(resolve_run(config, dataset, model, seed), dataset, terms, derived, diagnostics)
        elif family == "diffusion":
            assert terms["prior"] >= 0 and terms["diffusion"] >= 0
            assert (run_dir / "loss_curve.csv").exists()
        elif family == "bbb":
            assert terms["complexity"] >= 0 and "test_log_lik" in diagnostics
        else:  # the classifiers: their reliability bins, and KL terms >= 0
            assert 0 <= diagnostics["accuracy"] <= 1 and (run_dir / "reliability.csv").exists()
            assert all(terms[t] >= 0 for t in ("rate", "label_rate") if t in terms)
        if any(rank["task"] == "classification" for rank in ledger["run"]["ranks"]):
            # a classifier's log predictive probability is at most 0 (and above chance after training)
            assert -math.log(10) - 0.5 < diagnostics["test_log_lik"] <= 0


def check_vae_ledger(run, dataset, terms, derived, diagnostics):
    assert terms["rate"] >= 0
    iwae = [diagnostics["iwae_nll"][str(k)] for k in run.evaluate.iwae_k]
    assert iwae == sorted(iwae, reverse=True)  # -L_k decreases with k
    assert iwae[-1] <= derived["neg_elbo"] + 0.05
    # I(X;Z) <= R in expectation (the marginal KL >= 0); the one-draw estimates agree up to MC noise
    assert -0.01 <= diagnostics["mutual_info"] <= diagnostics["rate_mc"] + 0.05
    assert diagnostics["mutual_info"] <= diagnostics["mutual_info_max"] + 1e-9
    if dataset == "checkerboard":
        assert derived["data_entropy_true"] == pytest.approx(math.log(8))
        assert derived["kl_total"] > 0
        assert derived["kl_total"] == pytest.approx(derived["inference_gap"] + derived["model_gap"])
    else:
        assert derived["bpd"] == pytest.approx(derived["neg_elbo"] / (64 * math.log(2)))


def test_summary_table_has_one_row_per_run_with_every_term(smoke):
    _, workdir, config, _ = smoke
    table = pd.read_csv(workdir / "results" / "tables" / "summary.csv")
    assert len(table) == len(run_grid(config))
    assert {"dataset", "model", "seed", "neg_elbo", "iwae_nll.64"} <= set(table.columns)
    assert set(table["model"]) == set(families_of(config))
    for family, runs in table.groupby("family"):
        terms = list(FAMILIES[family].terms)
        assert ((runs[terms].sum(axis=1) - runs["neg_elbo"]).abs() < 1e-9).all()


def test_mlflow_store_holds_one_finished_run_per_run_key_with_metrics(smoke):
    _, workdir, config, _ = smoke
    assert (workdir / "mlflow.db").exists()  # MLflow's default store, where `mlflow ui` looks
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    family_of = families_of(config)
    experiments = [client.get_experiment_by_name(f).experiment_id for f in sorted(set(family_of.values()))]
    runs = client.search_runs(experiments, max_results=1000)
    expected = {f"{d}/{m}/seed{s}" for d, m, s in run_grid(config)}
    assert {r.info.run_name for r in runs} == expected and len(runs) == len(expected)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"dataset", "model", "seed", "family", "git_commit", "git_dirty", "config_hash", "data_hash",
                "version.torch", "version.mlflow", "version.snakemake", "device"} <= set(run.data.tags)
        dataset, model, seed = run.info.run_name.split("/")
        train = resolve_run(config, dataset, model, int(seed.removeprefix("seed"))).train
        assert run.data.params["train.steps"] == str(train.steps)
        ledger = json.loads((workdir / "results" / "runs" / run.info.run_name / "ledger.json").read_text())
        first_term = FAMILIES[family_of[model]].terms[0]
        assert run.data.metrics[f"test/{first_term}"] == pytest.approx(ledger["terms"][first_term])
        assert run.data.metrics["test/neg_elbo"] == pytest.approx(ledger["derived"]["neg_elbo"])
        train_history = client.get_metric_history(run.info.run_id, f"train/{first_term}")
        assert sorted(m.step for m in train_history) == evaluation_steps(train)
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/neg_elbo")) == evaluation_steps(train)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"ledger.json", "model.pt", "history.csv", "config.json"} <= artifacts


def test_at_most_one_training_job_per_cpu_runs_at_once(smoke):
    """`--cores 8` on a machine with fewer CPUs: the training jobs (single-threaded torch) still
    run one per CPU at a time, since more only share the CPUs (workflow/rules/common.smk)."""
    _, _, _, result = smoke
    running, most = set(), 0
    rule = None
    for line in result.stderr.splitlines():
        if match := re.match(r"(?:local)?rule (\S+):", line):
            rule = match.group(1)
        elif (match := re.match(r"\s+jobid: (\d+)", line)) and rule and rule.startswith("train_"):
            running.add(match.group(1))
            most = max(most, len(running))
        elif match := re.match(r"Finished jobid: (\d+)", line):
            running.discard(match.group(1))
    assert 1 <= most <= min(8, os.cpu_count() or 1)


def test_a_second_invocation_has_nothing_to_do(smoke):
    repo, workdir, _, _ = smoke
    result = snakemake(repo, workdir, "--dry-run")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_a_bad_config_fails_before_any_job_with_one_line(smoke, tmp_path):
    repo, _, _, _ = smoke
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: -1\n")
    command = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path),
               "--configfile", str(repo / "config" / "smoke.yaml"), str(bad), "--cores", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "config key 'train.steps': -1 is less than the minimum of 1" in result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_mlflow_ui_shows_the_runs_filters_by_tag_and_shows_ledger_metrics(smoke, tmp_path):
    _, workdir, config, _ = smoke
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK", 120, "mlflow ui")
        client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
        family_of = families_of(config)
        check_mlflow_ui(url, client, {f"{d}/{m}/seed{s}": family_of[m] for d, m, s in run_grid(config)},
                        tmp_path / "mlflow-runs.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_figures_tables_and_the_mlflow_summary_run_come_out_of_the_pipeline(smoke):
    _, workdir, config, _ = smoke
    results = workdir / "results"
    names = figure_names(config)
    assert {"ledger_bars", "rate_distortion", "iwae_vs_k", "training_curves-vae"} <= set(names)
    for name in names:
        for ext in ("png", "pdf"):
            assert (results / "figures" / f"{name}.{ext}").stat().st_size > 5_000
    captions = json.loads((results / "figures" / "captions.json").read_text())
    assert set(captions) == set(names)
    for dataset, model, _ in run_grid(config):
        family = families_of(config)[model]
        assert (results / "figures" / "runs" / family / dataset / f"{model}.png").stat().st_size > 5_000
    for table in ("ledger", "paired", "ranking", "cross_family", "timing"):
        assert (results / "tables" / f"{table}.csv").exists() and (results / "tables" / f"{table}.md").exists()
    ledger_stats = pd.read_csv(results / "tables" / "ledger.csv")
    assert set(ledger_stats["n_seeds"]) == {len(config["seeds"])}
    timing = pd.read_csv(results / "tables" / "timing.csv").set_index("phase")
    summary = pd.read_csv(results / "tables" / "summary.csv")
    # every run's share, plus the fork server's imports, counted once (README, "Jobs and seeds")
    server = json.loads((results / "logs" / "fork_server.json").read_text())["startup_cpu_s"]
    assert server > 1.0  # it imported torch and MLflow, which the jobs then did not
    assert summary["timing.cpu.startup_s"].max() < 0.5
    assert timing.at["total", "cpu_s"] == pytest.approx(summary["timing.cpu.total_s"].sum() + server)
    assert timing.at["startup", "cpu_s"] == pytest.approx(summary["timing.cpu.startup_s"].sum() + server)
    assert timing.loc[["startup", "data", "store_open", "train", "eval", "logging", "other"], "share"].sum() == pytest.approx(1)
    paired = pd.read_csv(results / "tables" / "paired.csv")
    assert set(paired["baseline"]) <= set(config["baselines"].values()) and len(paired)
    where = json.loads((results / "mlflow_summary.json").read_text())
    client = MlflowClient(tracking_uri=where["tracking_uri"])
    assert client.get_run(where["run_id"]).info.status == "FINISHED"
    attached = {a.path for folder in ("tables", "figures") for a in client.list_artifacts(where["run_id"], folder)}
    assert {"tables/ledger.csv", "tables/summary.csv", "figures/ledger_bars.png", "figures/rate_distortion.pdf"} <= attached


def test_the_report_holds_every_figure_and_table(smoke, tmp_path):
    repo, workdir, config, _ = smoke
    report = tmp_path / "report.html"
    snakemake(repo, workdir, "--report", str(report))
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 100_000
    for name in figure_names(config):
        assert f"{name}.png" in html
    assert "ledger.csv" in html and "klbench: models compared through their KL ledgers" in html


def test_adding_a_seed_plans_only_the_new_runs_and_the_aggregates(smoke):
    """A seed in a new block of seeds_per_job: one new job per pair, no existing job re-run."""
    repo, workdir, config, _ = smoke
    per_job = config["seeds_per_job"]
    new_seed = (max(config["seeds"]) // per_job + 1) * per_job
    plan = snakemake(repo, workdir, "--dry-run", "--config", f"seeds=[{','.join(map(str, config['seeds']))},{new_seed}]")
    text = plan.stdout + plan.stderr
    pairs = {(d, m) for d, m, _ in run_grid(config)}
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", text, flags=re.MULTILINE))
    assert int(counts[f"train_seeds_{new_seed}"]) == len(pairs)  # one new job per dataset/model pair ...
    assert [rule for rule in counts if rule.startswith("train")] == [f"train_seeds_{new_seed}"]  # ... nothing retrained
    assert int(counts["summary"]) == 1 and int(counts["figures"]) == 1
