"""Ledgers -> tables. Reads run directories' ledger.json files only (no models, no MLflow).

What a run is ranked and tabulated by comes from its ledger.json, as its family declared it
(run.task, run.ranks, run.headline; the term names are the keys of `terms`), so a new family
needs no change here."""

import json
from pathlib import Path
from typing import Any

import pandas as pd

from klbench.errors import DataError
from klbench.tracking import flatten

KEY_COLUMNS = ("dataset", "model", "family", "seed")


def read_ledger(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read ledger {path}: {error}") from None


def ledger_row(ledger: dict[str, Any]) -> dict[str, Any]:
    """One flat row: run keys, what the run is ranked by (ranks as JSON, terms and headline
    comma-joined), the swept parameter and its value, every ledger term, derived quantities,
    diagnostics."""
    run = ledger["run"]
    row: dict[str, Any] = {k: run[k] for k in KEY_COLUMNS}
    ((sweep_param, sweep_value),) = run["sweep"].items() if run["sweep"] else ((None, None),)
    row.update({"variant_of": run["variant_of"], "sweep_param": sweep_param, "sweep_value": sweep_value,
                "task": run["task"], "ranks": json.dumps(run["ranks"]), "terms": ",".join(ledger["terms"]),
                "headline": ",".join(run["headline"]),
                "config_hash": run["config_hash"], "data_hash": run["data_hash"],
                "git_commit": run.get("git_commit"), "git_dirty": run.get("git_dirty")})
    train = ledger["train"]
    row.update({"steps": train["steps"], "epochs": train["epochs"], "best_step": train["best_step"],
                "converged": bool(train["converged"])})
    row.update(ledger["terms"])
    row.update(ledger["derived"])
    row.update({k: v for k, v in flatten(ledger["diagnostics"]) if not isinstance(v, (list, dict))})
    return row


def read_timing(ledger_path: Path) -> dict[str, float]:
    """timing.json beside a ledger (wall and CPU seconds per phase), or nothing if it is absent."""
    path = Path(ledger_path).with_name("timing.json")
    return {f"timing.{k}": v for k, v in flatten(read_ledger(path))} if path.exists() else {}


def timing_table(summary: pd.DataFrame, server_startup_s: float = 0.0) -> pd.DataFrame:
    """CPU seconds per phase (klbench.timing.PHASES) summed over the runs of a pipeline, with
    each phase's share, and the fixed cost: the share of CPU that is not training or evaluation.

    server_startup_s: the CPU the fork server spent importing before it forked the jobs (its
    jobs' own start-up is only what came after the fork); counted once, in start-up."""
    from klbench.timing import PHASES, WORK

    columns = {name: f"timing.cpu.{name}_s" for name in PHASES}
    if not set(columns.values()) <= set(summary.columns):
        return pd.DataFrame(columns=["phase", "cpu_s", "share", "per_run_median_s"])
    sums = {name: summary[column].sum() + (server_startup_s if name == "startup" else 0.0)
            for name, column in columns.items()}
    total = summary["timing.cpu.total_s"].sum() + server_startup_s
    rows = [{"phase": name, "cpu_s": sums[name], "share": sums[name] / total,
             "per_run_median_s": summary[column].median()} for name, column in columns.items()]
    fixed = sum(r["cpu_s"] for r in rows if r["phase"] not in WORK)
    rows.append({"phase": "fixed cost (all but train and eval)", "cpu_s": fixed, "share": fixed / total,
                 "per_run_median_s": float("nan")})
    rows.append({"phase": "total", "cpu_s": total, "share": 1.0,
                 "per_run_median_s": summary["timing.cpu.total_s"].median()})
    return pd.DataFrame(rows)


def summary_table(ledger_paths: list[Path]) -> pd.DataFrame:
    """One row per run, sorted by dataset, model and seed."""
    rows = [{**ledger_row(read_ledger(p)), **read_timing(p)} for p in ledger_paths]
    if not rows:
        raise DataError("no ledgers to aggregate; run the training jobs first")
    return pd.DataFrame(rows).sort_values(list(KEY_COLUMNS[:2]) + ["seed"]).reset_index(drop=True)


def write_summary(ledger_paths: list[Path], out: Path) -> pd.DataFrame:
    table = summary_table(ledger_paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(out)
    return table


# --- comparison tables over seeds ---------------------------------------------------

GROUP = ["dataset", "family", "model"]
# Columns that describe a run rather than measure it.
NOT_METRICS = {"seed", "config_hash", "data_hash", "git_commit", "git_dirty", "data_entropy_true", "data_entropy",
               "sweep_value", "steps", "epochs"}


def model_ranks(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, family, model) and task it is ranked on: metric, higher_is_better,
    primary (whether the task is the run's own, its first rank), from the ledgers' run.ranks."""
    rows = []
    for (dataset, family, model), runs in summary.groupby(GROUP, sort=False):
        first = runs.iloc[0]
        for rank in json.loads(first["ranks"]):
            rows.append({"dataset": dataset, "family": family, "model": model, **rank,
                         "primary": rank["task"] == first["task"]})
    return pd.DataFrame(rows, columns=[*GROUP, "task", "metric", "higher_is_better", "primary"])


def metric_columns(summary: pd.DataFrame) -> list[str]:
    numeric = summary.select_dtypes("number").columns
    return [c for c in numeric if c not in NOT_METRICS and not c.startswith("timing.") and not c.startswith("bounds.")]


def t_interval(values: "pd.Series", level: float = 0.95) -> tuple[float, float, float, float, int]:
    """mean, std (ddof 1), and the Student-t interval of the mean over n seeds; NaN for n < 2."""
    from scipy import stats

    values = values.dropna()
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan"), n
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / n**0.5
    return mean, std, mean - half, mean + half, n


def seed_stats(summary: pd.DataFrame) -> pd.DataFrame:
    """Long table: dataset, family, model, metric, n_seeds, mean, std, ci95_low, ci95_high;
    dirty_runs: how many of the runs came from a git tree with uncommitted changes; steps: their
    training budget; converged_runs: how many of them converged (train.py)."""
    rows = []
    for key, group in summary.groupby(GROUP, sort=False):
        dirty = int(group["git_dirty"].astype("boolean").fillna(False).sum()) if "git_dirty" in group else 0
        run = {"dirty_runs": dirty, "steps": int(group["steps"].max()),
               "converged_runs": int(group["converged"].astype(bool).sum()), "runs": len(group)}
        for metric in metric_columns(summary):
            if group[metric].notna().any():
                mean, std, low, high, n = t_interval(group[metric])
                rows.append({**dict(zip(GROUP, key)), "metric": metric, "n_seeds": n, "mean": mean, "std": std,
                             "ci95_low": low, "ci95_high": high, **run})
    return pd.DataFrame(rows)


def paired_comparisons(summary: pd.DataFrame, baselines: dict[str, str]) -> pd.DataFrame:
    """Each model against its family's baseline on the same dataset and seeds, on the metric of
    the run's primary task: d_s = metric(model, s) - metric(baseline, s); mean of d with its
    95% t interval. The difference is larger than the seed noise when the interval excludes 0."""
    rows = []
    for (dataset, family), group in summary.groupby(["dataset", "family"], sort=False):
        baseline = baselines.get(family)
        if baseline not in set(group["model"]):
            continue
        base = group[group["model"] == baseline].set_index("seed")
        metric = next(r["metric"] for r in json.loads(base["ranks"].iloc[0]) if r["task"] == base["task"].iloc[0])
        for model, runs in group[group["model"] != baseline].groupby("model", sort=False):
            runs = runs.set_index("seed")
            seeds = sorted(set(runs.index) & set(base.index))
            diff = runs.loc[seeds, metric] - base.loc[seeds, metric]
            mean, std, low, high, n = t_interval(diff)
            rows.append({"dataset": dataset, "family": family, "model": model, "baseline": baseline,
                         "metric": metric, "n_pairs": n, "mean_diff": mean, "std_diff": std,
                         "ci95_low": low, "ci95_high": high,
                         "beyond_seed_noise": bool(n >= 2 and (low > 0 or high < 0))})
    return pd.DataFrame(rows)


def ranking(stats: pd.DataFrame, ranks: pd.DataFrame) -> pd.DataFrame:
    """Models ranked within each dataset and task, each by the metric its family declares for
    that task (e.g. density models by -ELBO in nats per example, lower is better; classifiers
    by held-out log-likelihood, higher is better); a model ranked on two tasks appears in both.
    `tied_with_next` when the 95% intervals of neighbours overlap: the order is within seed noise."""
    rows = []
    ranked = stats.merge(ranks, on=[*GROUP, "metric"])
    for (dataset, task), group in ranked.groupby(["dataset", "task"], sort=False):
        if group["higher_is_better"].nunique() > 1:
            raise DataError(f"{dataset}, task {task}: the families disagree on the direction of their metrics")
        descending = bool(group["higher_is_better"].iloc[0])
        group = group.sort_values("mean", ascending=not descending, kind="stable").reset_index(drop=True)
        for i, row in group.iterrows():
            nxt = group.iloc[i + 1] if i + 1 < len(group) else None
            tied = bool(nxt is not None and min(row["ci95_high"], nxt["ci95_high"]) >= max(row["ci95_low"], nxt["ci95_low"]))
            rows.append({"dataset": dataset, "task": task, "rank": i + 1, "model": row["model"],
                         "family": row["family"], "metric": row["metric"], "mean": row["mean"], "std": row["std"],
                         "n_seeds": row["n_seeds"], "tied_with_next": tied})
    return pd.DataFrame(rows)


def cross_family(stats: pd.DataFrame, ranks: pd.DataFrame) -> pd.DataFrame:
    """Density models of different families on the same dataset, in common units: -ELBO
    in nats per example and, for image-like data, bits per dimension."""
    density_models = ranks.loc[ranks["task"] == "density", GROUP].drop_duplicates()
    density = stats.merge(density_models, on=GROUP)
    shared = density.groupby("dataset")["family"].nunique()
    density = density[density["dataset"].isin(shared[shared > 1].index)]
    wide = density[density["metric"].isin(["neg_elbo", "bpd", "kl_total"])].pivot_table(
        index=["dataset", "family", "model"], columns="metric", values=["mean", "std"], sort=False)
    wide.columns = [f"{metric}_{stat}" for stat, metric in wide.columns]
    return wide.reset_index()


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


# The reference row of continuous density data: a single Gaussian fitted to the training data.
REFERENCE_METRIC, REFERENCE_MODEL = "gaussian_fit_nll", "single Gaussian fit (reference)"


def ledger_markdown(stats: pd.DataFrame, metrics: list[str], published: list[dict[str, Any]] = ()) -> str:
    """One table per dataset: rows = models, cells = mean ± std over seeds, plus the 95%
    interval of neg_elbo (every metric's interval is in ledger.csv); runs that did not converge
    are marked (†, with how many), and on continuous density data the NLL of a single Gaussian
    fit is a reference row. `published` figures (the config's list) get a column beside the
    model they belong to, their sources listed below the table."""
    parts = []
    for dataset, group in stats.groupby("dataset", sort=False):
        present = [m for m in metrics if m in set(group["metric"])]
        rows = []
        for (family, model), runs in group.groupby(["family", "model"], sort=False):
            cells = runs.set_index("metric")
            first = runs.iloc[0]
            dirty = " (dirty)" if first["dirty_runs"] > 0 else ""
            unconverged = int(first["runs"] - first["converged_runs"])
            mark = f" † ({unconverged}/{int(first['runs'])})" if unconverged else ""
            row = {"model": model + mark + dirty, "family": family, "seeds": int(cells["n_seeds"].max()),
                   "steps": int(first["steps"])}
            row.update({m: _pm(cells.at[m, "mean"], cells.at[m, "std"]) if m in cells.index else "" for m in present})
            low, high = cells.at["neg_elbo", "ci95_low"], cells.at["neg_elbo", "ci95_high"]
            row["neg_elbo 95% CI"] = "" if pd.isna(low) else f"[{low:.3f}, {high:.3f}]"
            for entry in (p for p in published if (p["dataset"], p["model"]) == (dataset, model)):
                row["published"] = f"{entry['value']:g} ({entry['metric']})"
            rows.append(row)
        reference = group[group["metric"] == REFERENCE_METRIC]
        if len(reference):
            rows.append({"model": REFERENCE_MODEL, "family": "", "neg_elbo": f"{reference['mean'].iloc[0]:.3f}"})
        parts.append(f"### {dataset}\n\nmean ± std over seeds, nats per example (bpd: bits per dimension); "
                     "nll_bound: -L_k at the largest k; † (n/m): n of the m runs did not converge (their "
                     "validation -ELBO, IWAE: -L_k, still improved by more than train.converged_tol over the last "
                     "10% of steps); (dirty): some runs came from a git tree with uncommitted changes\n\n"
                     + pd.DataFrame(rows).astype(object).fillna("").to_markdown(index=False)
                     + "".join(f"\n\npublished: {source}" for source in dict.fromkeys(
                         p["source"] for p in published if p["dataset"] == dataset)))
    return "\n\n".join(parts) + "\n"


# Derived quantities every table shows after the terms (where a run has them).
DERIVED_METRICS = ["neg_elbo", "bpd", "kl_total", "nll_bound", "inference_gap", "model_gap"]


def table_metrics(summary: pd.DataFrame) -> list[str]:
    """The columns of the Markdown ledger tables: every family's terms (in its order), the
    derived quantities, then the diagnostics the families name as their headline."""
    listed = lambda column: [n for cell in summary[column].dropna().unique() for n in cell.split(",") if n]  # noqa: E731
    return list(dict.fromkeys([*listed("terms"), *DERIVED_METRICS, *listed("headline")]))


def write_tables(summary: pd.DataFrame, out_dir: Path, baselines: dict[str, str],
                 server_startup_s: float = 0.0, published: list[dict[str, Any]] = ()) -> dict[str, Path]:
    """Every comparison table as CSV and Markdown into out_dir; returns name -> CSV path.
    server_startup_s: see timing_table; published: see ledger_markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = seed_stats(summary)
    ranks = model_ranks(summary)
    tables = {
        "ledger": (stats, ledger_markdown(stats, table_metrics(summary), published)),
        "paired": (paired := paired_comparisons(summary, baselines), paired.to_markdown(index=False, floatfmt=".4g")),
        "ranking": (ranked := ranking(stats, ranks), ranked.to_markdown(index=False, floatfmt=".4g")),
        "cross_family": (cross := cross_family(stats, ranks), cross.to_markdown(index=False, floatfmt=".4g")),
        "timing": (timing := timing_table(summary, server_startup_s), timing.to_markdown(index=False, floatfmt=".3g")),
    }
    paths = {}
    for name, (table, markdown) in tables.items():
        paths[name] = out_dir / f"{name}.csv"
        table.to_csv(paths[name], index=False)
        (out_dir / f"{name}.md").write_text(markdown if len(table) else f"(no rows: {name} needs more runs)\n")
    return paths
