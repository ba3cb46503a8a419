"""Ledgers -> tables. Reads run directories' ledger.json files only (no models, no MLflow)."""

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
    """One flat row: run keys, every ledger term, derived quantities, diagnostics, timing."""
    run = ledger["run"]
    row: dict[str, Any] = {k: run[k] for k in KEY_COLUMNS}
    row.update({"config_hash": run["config_hash"], "data_hash": run["data_hash"],
                "git_commit": run.get("git_commit"), "git_dirty": run.get("git_dirty")})
    row.update(ledger["terms"])
    row.update(ledger["derived"])
    row.update({k: v for k, v in flatten(ledger["diagnostics"]) if not isinstance(v, (list, dict))})
    return row


def read_timing(ledger_path: Path) -> dict[str, float]:
    """timing.json beside a ledger (wall-clock seconds), or nothing if it is absent."""
    path = Path(ledger_path).with_name("timing.json")
    return {f"timing.{k}": v for k, v in read_ledger(path).items()} if path.exists() else {}


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
NOT_METRICS = {"seed", "config_hash", "data_hash", "git_commit", "git_dirty", "data_entropy_true", "data_entropy"}
# What a model is ranked and paired by, per family: density models by their bound on
# -log p(x) (lower is better); BBB by the held-out log-likelihood of the labels under its
# predictive distribution (higher is better), since the MAP baseline's -ELBO is no bound.
RANK_BY = {"vae": "neg_elbo", "diffusion": "neg_elbo", "bbb": "test_log_lik"}
HIGHER_IS_BETTER = {"test_log_lik"}
TASK = {"vae": "density", "diffusion": "density", "bbb": "prediction"}


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
    """Long table: dataset, family, model, metric, n_seeds, mean, std, ci95_low, ci95_high,
    and dirty_runs: how many of the runs came from a git tree with uncommitted changes."""
    rows = []
    for key, group in summary.groupby(GROUP, sort=False):
        dirty = int(group["git_dirty"].astype("boolean").fillna(False).sum()) if "git_dirty" in group else 0
        for metric in metric_columns(summary):
            if group[metric].notna().any():
                mean, std, low, high, n = t_interval(group[metric])
                rows.append({**dict(zip(GROUP, key)), "metric": metric, "n_seeds": n, "mean": mean, "std": std,
                             "ci95_low": low, "ci95_high": high, "dirty_runs": dirty})
    return pd.DataFrame(rows)


def paired_comparisons(summary: pd.DataFrame, baselines: dict[str, str]) -> pd.DataFrame:
    """Each model against its family's baseline on the same dataset and seeds:
    d_s = metric(model, s) - metric(baseline, s); mean of d with its 95% t interval. The
    difference is larger than the seed noise when the interval excludes 0."""
    rows = []
    for (dataset, family), group in summary.groupby(["dataset", "family"], sort=False):
        baseline = baselines.get(family)
        if baseline not in set(group["model"]):
            continue
        base = group[group["model"] == baseline].set_index("seed")
        metric = RANK_BY[family]
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


def ranking(stats: pd.DataFrame) -> pd.DataFrame:
    """Models ranked within each dataset and task (density models by -ELBO in nats per
    example, lower is better; BBB separately, by held-out log-likelihood, higher is
    better). `tied_with_next` when the 95% intervals of neighbours overlap: the order is
    within seed noise."""
    rows = []
    stats = stats.assign(task=stats["family"].map(TASK))
    for (dataset, task), group in stats.groupby(["dataset", "task"], sort=False):
        group = group[group["metric"] == group["family"].map(RANK_BY)]
        descending = bool(group["metric"].isin(HIGHER_IS_BETTER).all())
        group = group.sort_values("mean", ascending=not descending, kind="stable").reset_index(drop=True)
        for i, row in group.iterrows():
            nxt = group.iloc[i + 1] if i + 1 < len(group) else None
            tied = bool(nxt is not None and min(row["ci95_high"], nxt["ci95_high"]) >= max(row["ci95_low"], nxt["ci95_low"]))
            rows.append({"dataset": dataset, "task": task, "rank": i + 1, "model": row["model"],
                         "family": row["family"], "metric": row["metric"], "mean": row["mean"], "std": row["std"],
                         "n_seeds": row["n_seeds"], "tied_with_next": tied})
    return pd.DataFrame(rows)


def cross_family(stats: pd.DataFrame) -> pd.DataFrame:
    """Density models of different families on the same dataset, in common units: -ELBO
    in nats per example and, for image-like data, bits per dimension."""
    density = stats[stats["family"].map(TASK) == "density"]
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


def ledger_markdown(stats: pd.DataFrame, metrics: list[str]) -> str:
    """One table per dataset: rows = models, cells = mean ± std over seeds, plus the 95%
    interval of neg_elbo (every metric's interval is in ledger.csv)."""
    parts = []
    for dataset, group in stats.groupby("dataset", sort=False):
        present = [m for m in metrics if m in set(group["metric"])]
        rows = []
        for (family, model), runs in group.groupby(["family", "model"], sort=False):
            cells = runs.set_index("metric")
            dirty = " (dirty)" if cells["dirty_runs"].max() > 0 else ""
            row = {"model": model + dirty, "family": family, "seeds": int(cells["n_seeds"].max())}
            row.update({m: _pm(cells.at[m, "mean"], cells.at[m, "std"]) if m in cells.index else "" for m in present})
            low, high = cells.at["neg_elbo", "ci95_low"], cells.at["neg_elbo", "ci95_high"]
            row["neg_elbo 95% CI"] = "" if pd.isna(low) else f"[{low:.3f}, {high:.3f}]"
            rows.append(row)
        parts.append(f"### {dataset}\n\nmean ± std over seeds, nats per example (bpd: bits per dimension); "
                     "(dirty): some runs came from a git tree with uncommitted changes\n\n"
                     + pd.DataFrame(rows).to_markdown(index=False))
    return "\n\n".join(parts) + "\n"


TABLE_METRICS = ["rate", "distortion", "prior", "diffusion", "reconstruction", "complexity", "nll", "neg_elbo", "bpd",
                 "kl_total", "inference_gap", "model_gap", "mutual_info", "marginal_kl", "active_units"]


def write_tables(summary: pd.DataFrame, out_dir: Path, baselines: dict[str, str]) -> dict[str, Path]:
    """Every comparison table as CSV and Markdown into out_dir; returns name -> CSV path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = seed_stats(summary)
    extra = [m for m in metric_columns(summary) if m not in TABLE_METRICS and not m.startswith("iwae_nll")
             and summary.loc[summary["family"] == "bbb", m].notna().any()] if "bbb" in set(summary["family"]) else []
    tables = {
        "ledger": (stats, ledger_markdown(stats, TABLE_METRICS + extra)),
        "paired": (paired := paired_comparisons(summary, baselines), paired.to_markdown(index=False, floatfmt=".4g")),
        "ranking": (ranks := ranking(stats), ranks.to_markdown(index=False, floatfmt=".4g")),
        "cross_family": (cross := cross_family(stats), cross.to_markdown(index=False, floatfmt=".4g")),
    }
    paths = {}
    for name, (table, markdown) in tables.items():
        paths[name] = out_dir / f"{name}.csv"
        table.to_csv(paths[name], index=False)
        (out_dir / f"{name}.md").write_text(markdown if len(table) else f"(no rows: {name} needs more runs)\n")
    return paths
