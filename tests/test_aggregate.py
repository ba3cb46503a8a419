"""Aggregation on hand-made ledgers whose means, intervals and rankings are known."""

import json
import math

import pandas as pd
import pytest

from klbench.aggregate import (paired_comparisons, ranking, seed_stats, summary_table, t_interval, write_tables)

T_975_2 = 4.302652729911275  # Student t quantile, 97.5%, 2 degrees of freedom


def ledger(dataset, model, family, seed, terms, dirty=False, **derived):
    return {"run": {"dataset": dataset, "model": model, "family": family, "seed": seed, "config_hash": "c",
                    "data_hash": "d", "git_commit": "abc", "git_dirty": dirty},
            "terms": terms, "derived": {"neg_elbo": sum(terms.values()), **derived},
            "diagnostics": {"iwae_nll": {"1": sum(terms.values()), "64": sum(terms.values()) - 0.1}}}


def summary(tmp_path, ledgers):
    paths = []
    for i, values in enumerate(ledgers):
        path = tmp_path / f"run{i}" / "ledger.json"
        path.parent.mkdir()
        path.write_text(json.dumps(values))
        (path.parent / "timing.json").write_text(json.dumps({"total_s": 1.0 + i}))
        paths.append(path)
    return summary_table(paths)


@pytest.fixture
def runs(tmp_path):
    rows = []
    for seed, (base, better, same) in enumerate([(10.0, 8.0, 10.5), (11.0, 9.0, 10.0), (12.0, 10.0, 12.5)]):
        rows.append(ledger("toy", "vae", "vae", seed, {"rate": 1.0, "distortion": base - 1.0}))
        rows.append(ledger("toy", "vae-better", "vae", seed, {"rate": 2.0, "distortion": better - 2.0}, dirty=seed == 1))
        rows.append(ledger("toy", "vae-same", "vae", seed, {"rate": 1.0, "distortion": same - 1.0}))
    return summary(tmp_path, rows)


def test_t_interval_matches_the_closed_form():
    mean, std, low, high, n = t_interval(pd.Series([1.0, 2.0, 3.0]))
    assert (mean, std, n) == (2.0, 1.0, 3)
    assert (low, high) == pytest.approx((2 - T_975_2 / math.sqrt(3), 2 + T_975_2 / math.sqrt(3)))
    mean, std, low, high, n = t_interval(pd.Series([5.0]))
    assert mean == 5.0 and n == 1 and math.isnan(std) and math.isnan(low)


def test_seed_stats_have_known_means_and_count_dirty_runs(runs):
    stats = seed_stats(runs).set_index(["model", "metric"])
    assert stats.loc[("vae", "neg_elbo"), "mean"] == pytest.approx(11.0)
    assert stats.loc[("vae", "neg_elbo"), "std"] == pytest.approx(1.0)
    assert stats.loc[("vae", "rate"), "ci95_low"] == pytest.approx(1.0)  # no spread, zero-width interval
    assert stats.loc[("vae-better", "neg_elbo"), "n_seeds"] == 3
    assert stats.loc[("vae-better", "neg_elbo"), "dirty_runs"] == 1 and stats.loc[("vae", "rate"), "dirty_runs"] == 0
    assert ("vae", "timing.total_s") not in stats.index and ("vae", "seed") not in stats.index


def test_paired_comparison_separates_a_real_difference_from_seed_noise(runs):
    paired = paired_comparisons(runs, {"vae": "vae"}).set_index("model")
    # vae-better is exactly 2 nats better on every seed: the spread across seeds cancels in pairs
    assert paired.loc["vae-better", "mean_diff"] == pytest.approx(-2.0)
    assert paired.loc["vae-better", "std_diff"] == pytest.approx(0.0, abs=1e-12)
    assert paired.loc["vae-better", "beyond_seed_noise"]
    # vae-same differs by +0.5, -1.0, +0.5: mean 0, interval straddles 0
    assert paired.loc["vae-same", "mean_diff"] == pytest.approx(0.0)
    assert not paired.loc["vae-same", "beyond_seed_noise"]
    assert paired_comparisons(runs, {"vae": "no-such-model"}).empty


def test_ranking_orders_by_neg_elbo_and_flags_overlapping_intervals(runs):
    ranks = ranking(seed_stats(runs))
    assert list(ranks["model"]) == ["vae-better", "vae", "vae-same"]
    assert list(ranks["rank"]) == [1, 2, 3]
    assert ranks.set_index("model").loc["vae", "tied_with_next"]  # 11 ± 1 vs 11 ± 1.3: within noise


def test_write_tables_writes_csv_and_markdown(runs, tmp_path):
    paths = write_tables(runs, tmp_path / "tables", {"vae": "vae"})
    assert set(paths) == {"ledger", "paired", "ranking", "cross_family"}
    for name, path in paths.items():
        assert path.exists() and path.with_suffix(".md").read_text().strip()
    markdown = (tmp_path / "tables" / "ledger.md").read_text()
    assert "### toy" in markdown and "vae-better (dirty)" in markdown and "11.000 ± 1.000" in markdown
    assert "no rows" in (tmp_path / "tables" / "cross_family.md").read_text()  # one family only


def test_bbb_is_ranked_by_held_out_log_likelihood_higher_first(tmp_path):
    rows = []
    for seed in range(2):
        for model, log_lik in (("map", -0.5), ("bbb-gauss", -0.2)):
            values = ledger("digits", model, "bbb", seed, {"complexity": 0.0 if model == "map" else 1.0, "nll": 0.3})
            values["diagnostics"]["test_log_lik"] = log_lik + seed * 0.01
            rows.append(values)
    ranks = ranking(seed_stats(summary(tmp_path, rows)))
    assert list(ranks["model"]) == ["bbb-gauss", "map"] and set(ranks["metric"]) == {"test_log_lik"}
