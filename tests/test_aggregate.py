"""Aggregation on hand-made ledgers whose means, intervals and rankings are known.

The ledgers have the format run.py writes; what a run is ranked by (run.task, run.ranks,
run.headline) comes from the registered families' own declarations, so the fixtures follow
the families when those change."""

import dataclasses
import json
import math

import pandas as pd
import pytest

from klbench.aggregate import (DERIVED_METRICS, cross_family, ledger_row, model_ranks, paired_comparisons, ranking,
                               seed_stats, summary_table, t_interval, table_metrics, write_summary, write_tables)
from klbench.errors import DataError
from klbench.models import get_family

T_975_2 = 4.302652729911275  # Student t quantile, 97.5%, 2 degrees of freedom
T_975_1 = 12.706204736174698  # Student t quantile, 97.5%, 1 degree of freedom


def declared_ranks(family, target=None):
    return [dataclasses.asdict(r) for r in get_family(family).ranks_for(target)]


def ledger(dataset, model, family, seed, terms, dirty=False, target=None, variant_of=None, sweep=None,
           diagnostics=None, ranks=None, converged=True, **derived):
    """A ledger.json as run.py writes it, for a run of `family` on data with `target` type."""
    ranks = declared_ranks(family, target) if ranks is None else ranks
    neg_elbo = sum(terms.values())
    run = {"key": f"{dataset}/{model}/seed{seed}", "dataset": dataset, "model": model, "family": family,
           "variant_of": model if variant_of is None else variant_of, "sweep": sweep or {}, "seed": seed,
           "config_hash": "c", "data_hash": "d", "split": {}, "dim": 2, "kind": "continuous",
           "units": "nats per example", "task": ranks[0]["task"], "ranks": ranks,
           "headline": list(get_family(family).headline), "git_commit": "abc", "git_dirty": dirty, "device": "cpu"}
    if diagnostics is None:
        diagnostics = {"iwae_nll": {"1": neg_elbo, "64": neg_elbo - 0.1}}
    return {"run": run, "terms": terms, "derived": {"neg_elbo": neg_elbo, **derived}, "diagnostics": diagnostics,
            "train": {"steps": 100, "epochs": 1.0, "best_step": 100, "converged": converged, "parameters": 10,
                      "final": {}}}


def write_ledgers(tmp_path, ledgers):
    paths = []
    for i, values in enumerate(ledgers):
        path = tmp_path / f"run{i}" / "ledger.json"
        path.parent.mkdir()
        path.write_text(json.dumps(values))
        (path.parent / "timing.json").write_text(json.dumps({"total_s": 1.0 + i}))
        paths.append(path)
    return paths


def summary(tmp_path, ledgers):
    return summary_table(write_ledgers(tmp_path, ledgers))


@pytest.fixture
def runs(tmp_path):
    rows = []
    for seed, (base, better, same) in enumerate([(10.0, 8.0, 10.5), (11.0, 9.0, 10.0), (12.0, 10.0, 12.5)]):
        rows.append(ledger("toy", "vae", "vae", seed, {"rate": 1.0, "distortion": base - 1.0}))
        rows.append(ledger("toy", "vae-better", "vae", seed, {"rate": 2.0, "distortion": better - 2.0},
                           dirty=seed == 1))
        rows.append(ledger("toy", "vae-same", "vae", seed, {"rate": 1.0, "distortion": same - 1.0}))
    return summary(tmp_path, rows)


def classifier_diagnostics(log_lik):
    return {"test_log_lik": log_lik, "accuracy": 0.9, "ece": 0.02}


@pytest.fixture
def mixed(tmp_path):
    """digits (class targets): two VAEs, a diffusion model and two BBB classifiers; toy
    (no targets): one VAE only. Known values: neg_elbo vae 20/22, vae-big 18/19, ddpm 15/17;
    test_log_lik map -0.5/-0.4, bbb-gauss -0.2/-0.1; BBB neg_elbo (its nats of labels) 0.4/0.5."""
    rows = []
    for seed in range(2):
        rows.append(ledger("digits", "vae", "vae", seed, {"rate": 5.0, "distortion": 15.0 + 2 * seed},
                           target="class"))
        rows.append(ledger("digits", "vae-big", "vae", seed, {"rate": 8.0, "distortion": 10.0 + seed},
                           target="class"))
        rows.append(ledger("digits", "ddpm", "diffusion", seed,
                           {"prior": 0.0, "diffusion": 14.0 + 2 * seed, "reconstruction": 1.0}, target="class",
                           diagnostics={"log_snr_max": 10.0}))
        rows.append(ledger("digits", "map", "bbb", seed, {"complexity": 0.0, "nll": 0.4 + 0.1 * seed},
                           target="class", diagnostics=classifier_diagnostics(-0.5 + 0.1 * seed)))
        rows.append(ledger("digits", "bbb-gauss", "bbb", seed, {"complexity": 0.2, "nll": 0.2 + 0.1 * seed},
                           target="class", diagnostics=classifier_diagnostics(-0.2 + 0.1 * seed)))
        rows.append(ledger("toy", "vae", "vae", seed, {"rate": 1.0, "distortion": 2.0 + seed}))
    return summary(tmp_path, rows)


def test_t_interval_matches_the_closed_form():
    mean, std, low, high, n = t_interval(pd.Series([1.0, 2.0, 3.0]))
    assert (mean, std, n) == (2.0, 1.0, 3)
    assert (low, high) == pytest.approx((2 - T_975_2 / math.sqrt(3), 2 + T_975_2 / math.sqrt(3)))
    mean, std, low, high, n = t_interval(pd.Series([5.0]))
    assert mean == 5.0 and n == 1 and math.isnan(std) and math.isnan(low)


def test_ledger_row_records_what_the_run_is_ranked_by_and_its_sweep():
    swept = ledger("toy", "beta_vae-b0.25", "vae", 3, {"rate": 0.5, "distortion": 4.0}, variant_of="beta_vae",
                   sweep={"beta": 0.25}, diagnostics={"iwae_nll": {"1": 4.5, "64": 4.25}, "mutual_info": 0.4})
    row = ledger_row(swept)
    assert (row["dataset"], row["model"], row["family"], row["seed"]) == ("toy", "beta_vae-b0.25", "vae", 3)
    assert (row["variant_of"], row["sweep_param"], row["sweep_value"]) == ("beta_vae", "beta", 0.25)
    assert row["task"] == "density"
    assert json.loads(row["ranks"]) == [{"task": "density", "metric": "neg_elbo", "higher_is_better": False}]
    assert row["terms"] == "rate,distortion" and row["headline"] == ",".join(get_family("vae").headline)
    # terms, derived and (flattened) diagnostics become columns with their values
    assert (row["rate"], row["distortion"], row["neg_elbo"]) == (0.5, 4.0, 4.5)
    assert (row["iwae_nll.64"], row["mutual_info"]) == (4.25, 0.4)

    plain = ledger_row(ledger("reg", "bbb-gauss", "bbb", 0, {"complexity": 0.1, "nll": 1.0}, target="real",
                              diagnostics={"test_log_lik": -1.05, "rmse": 0.7}))
    assert (plain["variant_of"], plain["sweep_param"], plain["sweep_value"]) == ("bbb-gauss", None, None)
    assert plain["task"] == "regression"  # a BBB run is ranked on the task its data's targets make
    assert json.loads(plain["ranks"]) == [{"task": "regression", "metric": "test_log_lik", "higher_is_better": True}]
    assert plain["terms"] == "complexity,nll" and plain["test_log_lik"] == -1.05


def test_seed_stats_have_known_means_and_count_dirty_runs(runs):
    stats = seed_stats(runs).set_index(["model", "metric"])
    assert stats.loc[("vae", "neg_elbo"), "mean"] == pytest.approx(11.0)
    assert stats.loc[("vae", "neg_elbo"), "std"] == pytest.approx(1.0)
    assert (stats.loc[("vae", "neg_elbo"), "ci95_low"], stats.loc[("vae", "neg_elbo"), "ci95_high"]) == pytest.approx(
        (11 - T_975_2 / math.sqrt(3), 11 + T_975_2 / math.sqrt(3)))
    assert stats.loc[("vae", "rate"), "ci95_low"] == pytest.approx(1.0)  # no spread, zero-width interval
    assert stats.loc[("vae-better", "iwae_nll.64"), "mean"] == pytest.approx(9.0 - 0.1)
    assert stats.loc[("vae-better", "neg_elbo"), "n_seeds"] == 3
    assert stats.loc[("vae-better", "neg_elbo"), "dirty_runs"] == 1 and stats.loc[("vae", "rate"), "dirty_runs"] == 0
    # what describes a run (seed, timing, the sweep's value, the ranks) is not a metric
    described = {"timing.total_s", "seed", "sweep_value", "ranks", "task", "terms", "headline", "variant_of"}
    assert not described & set(stats.index.get_level_values("metric"))


def test_a_swept_value_is_not_averaged_as_a_metric(tmp_path):
    rows = [ledger("toy", f"beta_vae-b{b:g}", "vae", seed, {"rate": 1.0 / b, "distortion": 2.0 + seed},
                   variant_of="beta_vae", sweep={"beta": b}) for b in (0.5, 2.0) for seed in range(2)]
    table = summary(tmp_path, rows)
    assert table.groupby("model")["sweep_value"].first().to_dict() == {"beta_vae-b0.5": 0.5, "beta_vae-b2": 2.0}
    stats = seed_stats(table)
    assert "sweep_value" not in set(stats["metric"])
    assert stats.set_index(["model", "metric"]).loc[("beta_vae-b0.5", "rate"), "mean"] == pytest.approx(2.0)


def test_paired_comparison_separates_a_real_difference_from_seed_noise(runs):
    paired = paired_comparisons(runs, {"vae": "vae"}).set_index("model")
    assert set(paired["metric"]) == {"neg_elbo"}  # the metric of the vae's declared density rank
    # vae-better is exactly 2 nats better on every seed: the spread across seeds cancels in pairs
    assert paired.loc["vae-better", "mean_diff"] == pytest.approx(-2.0)
    assert paired.loc["vae-better", "std_diff"] == pytest.approx(0.0, abs=1e-12)
    assert paired.loc["vae-better", "beyond_seed_noise"]
    # vae-same differs by +0.5, -1.0, +0.5: mean 0, interval straddles 0
    assert paired.loc["vae-same", "mean_diff"] == pytest.approx(0.0)
    assert paired.loc["vae-same", "std_diff"] == pytest.approx(math.sqrt(0.75))
    assert not paired.loc["vae-same", "beyond_seed_noise"]
    assert paired_comparisons(runs, {"vae": "no-such-model"}).empty


def test_paired_comparison_of_classifiers_uses_their_declared_metric(mixed):
    paired = paired_comparisons(mixed, {"bbb": "map", "vae": "vae"}).set_index(["dataset", "model"])
    gauss = paired.loc[("digits", "bbb-gauss")]
    assert gauss["metric"] == "test_log_lik" and gauss["baseline"] == "map"
    assert gauss["mean_diff"] == pytest.approx(0.3) and gauss["std_diff"] == pytest.approx(0.0, abs=1e-12)
    assert gauss["beyond_seed_noise"]
    big = paired.loc[("digits", "vae-big")]
    assert big["metric"] == "neg_elbo"
    assert big["mean_diff"] == pytest.approx(-2.5)  # -2 and -3 nats
    assert big["std_diff"] == pytest.approx(math.sqrt(0.5))
    assert not big["beyond_seed_noise"]  # -2.5 ± 12.7 * 0.5 straddles 0
    assert big["ci95_high"] == pytest.approx(-2.5 + T_975_1 * 0.5)


def test_model_ranks_come_from_the_ledgers(mixed):
    ranks = model_ranks(mixed).set_index(["dataset", "model"])
    assert len(ranks) == 6  # one rank per model: no family here is ranked on two tasks
    assert ranks.loc[("digits", "bbb-gauss"), ["task", "metric", "higher_is_better", "primary"]].tolist() == [
        "classification", "test_log_lik", True, True]
    assert ranks.loc[("digits", "ddpm"), ["task", "metric", "higher_is_better"]].tolist() == [
        "density", "neg_elbo", False]
    assert ranks.loc[("toy", "vae"), "task"] == "density"


def test_ranking_orders_by_neg_elbo_and_flags_overlapping_intervals(runs):
    ranks = ranking(seed_stats(runs), model_ranks(runs))
    assert list(ranks["model"]) == ["vae-better", "vae", "vae-same"]
    assert list(ranks["rank"]) == [1, 2, 3]
    assert list(ranks["mean"]) == pytest.approx([9.0, 11.0, 11.0])
    assert set(ranks["task"]) == {"density"} and set(ranks["metric"]) == {"neg_elbo"}
    tied = ranks.set_index("model")["tied_with_next"]
    assert tied["vae-better"] and tied["vae"]  # 9 ± 1 vs 11 ± 1: the t intervals (± 2.5) overlap
    assert not tied["vae-same"]  # the last has no neighbour


def test_ranking_separates_tasks_and_directions_on_one_dataset(mixed):
    ranks = ranking(seed_stats(mixed), model_ranks(mixed))
    digits = ranks[ranks["dataset"] == "digits"]
    density = digits[digits["task"] == "density"]
    assert list(density["model"]) == ["ddpm", "vae-big", "vae"]  # lower -ELBO first, across families
    assert list(density["mean"]) == pytest.approx([16.0, 18.5, 21.0])
    classification = digits[digits["task"] == "classification"]
    assert list(classification["model"]) == ["bbb-gauss", "map"]  # higher log-likelihood first
    assert list(classification["mean"]) == pytest.approx([-0.15, -0.45])
    assert set(classification["metric"]) == {"test_log_lik"}
    assert list(ranks.loc[ranks["dataset"] == "toy", "model"]) == ["vae"]


def test_a_model_ranked_on_two_tasks_appears_in_both(tmp_path):
    both = declared_ranks("vae") + declared_ranks("bbb", "class")  # e.g. a semi-supervised density model
    rows = []
    for seed in range(2):
        rows.append(ledger("digits", "both", "vae", seed, {"rate": 1.0, "distortion": 9.0}, ranks=both,
                           diagnostics=classifier_diagnostics(-0.3)))
        rows.append(ledger("digits", "map", "bbb", seed, {"complexity": 0.0, "nll": 0.5}, target="class",
                           diagnostics=classifier_diagnostics(-0.6 + 0.01 * seed)))
    table = summary(tmp_path, rows)
    ranks = model_ranks(table).set_index(["model", "task"])
    assert ranks.loc[("both", "density"), "primary"] and not ranks.loc[("both", "classification"), "primary"]
    ranked = ranking(seed_stats(table), model_ranks(table))
    assert list(ranked.loc[ranked["task"] == "classification", "model"]) == ["both", "map"]
    assert list(ranked.loc[ranked["task"] == "density", "model"]) == ["both"]


def test_ranking_refuses_a_task_whose_families_disagree_on_direction(tmp_path):
    upside_down = [{"task": "density", "metric": "neg_elbo", "higher_is_better": True}]
    rows = [ledger("toy", "vae", "vae", 0, {"rate": 1.0, "distortion": 2.0}),
            ledger("toy", "odd", "diffusion", 0, {"prior": 0.0, "diffusion": 1.0, "reconstruction": 1.0},
                   ranks=upside_down)]
    table = summary(tmp_path, rows)
    with pytest.raises(DataError, match="direction"):
        ranking(seed_stats(table), model_ranks(table))


def test_cross_family_compares_density_models_of_different_families(mixed):
    cross = cross_family(seed_stats(mixed), model_ranks(mixed)).set_index(["dataset", "model"])
    # only digits has density models of two families; the classifiers are not density models
    assert set(cross.index) == {("digits", "vae"), ("digits", "vae-big"), ("digits", "ddpm")}
    assert cross.loc[("digits", "ddpm"), "neg_elbo_mean"] == pytest.approx(16.0)
    assert cross.loc[("digits", "vae"), "neg_elbo_mean"] == pytest.approx(21.0)
    assert cross.loc[("digits", "vae"), "neg_elbo_std"] == pytest.approx(math.sqrt(2.0))
    assert cross.loc[("digits", "ddpm"), "family"] == "diffusion"


def test_table_metrics_are_the_families_terms_derived_then_headline(mixed):
    # the summary is sorted by dataset then model: bbb-gauss, ddpm, map, vae, vae-big on digits
    bbb, diffusion, vae = get_family("bbb"), get_family("diffusion"), get_family("vae")
    expected = [*bbb.terms, *diffusion.terms, *vae.terms, *DERIVED_METRICS, *bbb.headline, *diffusion.headline,
                *vae.headline]
    assert table_metrics(mixed) == list(dict.fromkeys(expected))


def test_write_tables_writes_csv_and_markdown(runs, tmp_path):
    paths = write_tables(runs, tmp_path / "tables", {"vae": "vae"})
    assert set(paths) == {"ledger", "paired", "ranking", "cross_family", "timing"}
    for name, path in paths.items():
        assert path.exists() and path.with_suffix(".md").read_text().strip()
    markdown = (tmp_path / "tables" / "ledger.md").read_text()
    assert "### toy" in markdown and "vae-better (dirty)" in markdown and "11.000 ± 1.000" in markdown
    low, high = 11 - T_975_2 / math.sqrt(3), 11 + T_975_2 / math.sqrt(3)
    assert f"[{low:.3f}, {high:.3f}]" in markdown  # the neg_elbo interval of vae
    ranked = pd.read_csv(paths["ranking"])
    assert list(ranked["model"]) == ["vae-better", "vae", "vae-same"]
    assert "no rows" in (tmp_path / "tables" / "cross_family.md").read_text()  # one family only


def test_write_tables_shows_each_familys_headline(mixed, tmp_path):
    paths = write_tables(mixed, tmp_path / "tables", {"bbb": "map"})
    markdown = (tmp_path / "tables" / "ledger.md").read_text()
    digits = markdown.split("### digits")[1].split("### toy")[0]
    header = digits.split("\n\n")[2].splitlines()[0]
    for column in ("complexity", "nll", "rate", "diffusion", "test_log_lik", "accuracy", "neg_elbo"):
        assert f" {column} " in header
    assert "-0.150 ± 0.071" in digits  # bbb-gauss test_log_lik over two seeds
    ranked = pd.read_csv(paths["ranking"])
    assert list(ranked.loc[ranked["task"] == "classification", "model"]) == ["bbb-gauss", "map"]
    assert len(pd.read_csv(paths["cross_family"])) == 3


def test_tables_from_summary_csv_match_the_in_memory_summary(mixed, tmp_path):
    """The workflow writes summary.csv and reads it back: ranks, terms and headline survive."""
    out = tmp_path / "summary.csv"
    mixed.to_csv(out, index=False)
    read = pd.read_csv(out)
    assert table_metrics(read) == table_metrics(mixed)
    pd.testing.assert_frame_equal(model_ranks(read), model_ranks(mixed))
    pd.testing.assert_frame_equal(ranking(seed_stats(read), model_ranks(read)),
                                  ranking(seed_stats(mixed), model_ranks(mixed)))


def test_write_summary_writes_one_row_per_run(tmp_path):
    rows = [ledger("toy", "vae", "vae", seed, {"rate": 1.0, "distortion": 2.0 + seed}) for seed in (1, 0)]
    table = write_summary(write_ledgers(tmp_path, rows), tmp_path / "out" / "summary.csv")
    read = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert list(read["seed"]) == [0, 1] and list(read["neg_elbo"]) == [3.0, 4.0]
    assert list(read["timing.total_s"]) == [2.0, 1.0] and len(table) == 2


def test_bbb_is_ranked_by_held_out_log_likelihood_higher_first(tmp_path):
    rows = []
    for target, task in (("class", "classification"), ("real", "regression")):
        for seed in range(2):
            for model, log_lik in (("map", -0.5), ("bbb-gauss", -0.2)):
                values = ledger(f"data-{target}", model, "bbb", seed,
                                {"complexity": 0.0 if model == "map" else 1.0, "nll": 0.3}, target=target,
                                diagnostics=classifier_diagnostics(log_lik + seed * 0.01))
                rows.append(values)
    table = summary(tmp_path, rows)
    ranks = ranking(seed_stats(table), model_ranks(table))
    assert set(ranks["metric"]) == {"test_log_lik"}
    for target, task in (("class", "classification"), ("real", "regression")):
        ranked = ranks[ranks["dataset"] == f"data-{target}"]
        assert set(ranked["task"]) == {task}
        assert list(ranked["model"]) == ["bbb-gauss", "map"]
        assert list(ranked["mean"]) == pytest.approx([-0.195, -0.495])
