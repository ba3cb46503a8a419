"""Comparison figures across runs: the summary table and run-directory files -> PNG and PDF.

What is drawn is planned from the families' declarations (`plan_figures`, known before any
run exists, so that the workflow can declare the outputs): the ledger bars of every run, the
training curves of each family, the sample grids of each dataset with a density model, and
each figure a family declares (`Family.figures`), drawn by one of FIGURE_KINDS with the
options it declared. Each drawing takes the summary table (one row per run,
`aggregate.summary_table`) of the runs it shows and, where it needs per-run files, the runs
folder (`{runs}/{dataset}/{model}/seed{seed}/`), writes `{stem}.png` and `{stem}.pdf` and
returns {stem: caption}. Values are nats per example; image-like datasets get bits per
dimension on a second axis. Spread over seeds is the range (min to max), drawn as a band or
as every seed's point. Term names, tasks and sweeps come from the runs' ledgers (the summary's
terms, task, variant_of, sweep_param and sweep_value columns). Reads files, never models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from klbench.plots import _pyplot as _plain_pyplot

if TYPE_CHECKING:
    from klbench.models.family import Family

NATS = "nats per example"
SYMBOLS = {"beta": "β"}  # how a swept parameter is written in labels


# --- shared helpers ---------------------------------------------------------------------

def with_model_order(summary: pd.DataFrame, families: list[str]) -> pd.DataFrame:
    """The summary with an `order` column: models by family (in the order given, then any
    other in order of appearance), then by the `models` entry they come from, then by swept
    value (numeric order)."""
    families = list(dict.fromkeys([*families, *summary["family"]]))
    value = pd.to_numeric(summary.get("sweep_value"), errors="coerce") if "sweep_value" in summary else np.nan
    keys = summary.assign(_family=summary["family"].map(families.index), _value=value)
    keys = keys.drop_duplicates("model").sort_values(["_family", "variant_of", "_value", "model"],
                                                      na_position="first", kind="stable")
    return summary.assign(order=summary["model"].map({m: i for i, m in enumerate(keys["model"])}))


def _pyplot():
    import seaborn as sns

    plt = _plain_pyplot()
    sns.set_theme(style="whitegrid", context="notebook")
    return plt


def _models(frame: pd.DataFrame) -> list[str]:
    """The models of a frame in the summary's order (its `order` column)."""
    return list(frame.drop_duplicates("model").sort_values("order", kind="stable")["model"])


def _palette(summary: pd.DataFrame) -> dict[str, tuple]:
    """One colour per model, the same in every figure."""
    import seaborn as sns

    models = _models(summary)
    # 18 distinguishable colours (tab10 then Dark2) before falling back to evenly spaced hues
    distinct = sns.color_palette("tab10") + sns.color_palette("Dark2")
    colours = distinct[: len(models)] if len(models) <= len(distinct) else sns.color_palette("husl", len(models))
    return dict(zip(models, colours))


def _panels(n: int, ncols: int, size: tuple[float, float]):
    plt = _pyplot()
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _save(plt, fig, stem: Path, title: str, handles: list | None = None, ncol: int = 4) -> Path:
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=13)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(f"{stem}.png", dpi=110)
    fig.set_layout_engine("none")  # keep the layout just computed: the PDF needs no second pass
    fig.savefig(f"{stem}.pdf")
    plt.close(fig)
    return stem


def _handle(plt, colour, label: str, **style):
    style = {"marker": "o", "ls": "-", **style}
    return plt.Line2D([], [], color=colour, label=label, **style)


def _bpd_per_nat(summary: pd.DataFrame, dataset: str) -> float | None:
    """Bits per dimension per nat per example (1 / (D ln 2)) for image-like datasets, from the
    bpd column the ledger writes for them; None for other data."""
    if "bpd" not in summary:
        return None
    runs = summary[(summary["dataset"] == dataset) & summary["bpd"].notna()]
    return float((runs["bpd"] / runs["neg_elbo"]).median()) if len(runs) else None


def _bpd_axis(ax, factor: float | None) -> None:
    if factor:
        right = ax.secondary_yaxis("right", functions=(lambda y: y * factor, lambda b: b / factor))
        right.set_ylabel("bits per dimension")


def _entropy(summary: pd.DataFrame, dataset: str, column: str = "data_entropy_true") -> float | None:
    if column not in summary:
        return None
    values = summary.loc[summary["dataset"] == dataset, column].dropna()
    return float(values.mean()) if len(values) else None


def _run_dir(runs_dir: Path, row) -> Path:
    return Path(runs_dir) / row["dataset"] / row["model"] / f"seed{int(row['seed'])}"


def _read_runs(summary: pd.DataFrame, runs_dir: Path, name: str) -> pd.DataFrame:
    """One CSV (history.csv, loss_curve.csv) from every run that has it, with the run keys."""
    frames = [pd.read_csv(path).assign(dataset=row["dataset"], model=row["model"], family=row["family"],
                                       seed=row["seed"], order=row["order"])
              for _, row in summary.iterrows() if (path := _run_dir(runs_dir, row) / name).exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _line_band(ax, frame: pd.DataFrame, x: str, y: str, colour, label: str | None = None, **style) -> None:
    """Mean over seeds as a line, min-max over seeds as a band."""
    stats = frame.groupby(x)[y].agg(["mean", "min", "max"]).reset_index()
    ax.plot(stats[x], stats["mean"], color=colour, label=label, **style)
    ax.fill_between(stats[x], stats["min"], stats["max"], color=colour, alpha=0.2, lw=0)


def _density(summary: pd.DataFrame) -> pd.DataFrame:
    """The runs of density models of x (their primary task)."""
    return summary[summary["task"] == "density"]


def _terms(summary: pd.DataFrame) -> list[str]:
    """The ledger term names of these runs, each family's in its own order."""
    return list(dict.fromkeys(t for cell in summary["terms"].dropna().unique() for t in cell.split(",") if t))


# --- 1. a plane of two ledger terms (rate-distortion, information plane) ------------------

def _sweeps(runs: pd.DataFrame, runs_dir: Path | None, param: str) -> list[dict[str, float]]:
    """The sweeps over `param`, each {model: value}: the variants whose ledgers record a sweep
    of `param` from one `models` entry and, where config.json shows it, every model with the
    same parameters but that one (e.g. a VAE at beta 1 beside its beta sweep). Names are
    never read."""
    first = runs.drop_duplicates("model")
    swept = first[first["sweep_param"] == param] if "sweep_param" in first else first.iloc[:0]
    params = {}
    if runs_dir is not None:
        for _, row in first.iterrows():
            path = _run_dir(runs_dir, row) / "config.json"
            if path.exists():
                params[row["model"]] = json.loads(path.read_text()).get("params", {})
    rest = lambda p: json.dumps({k: v for k, v in p.items() if k != param}, sort_keys=True)  # noqa: E731
    sweeps = []
    for _, members in swept.groupby("variant_of", sort=False):
        sweep = {row["model"]: float(row["sweep_value"]) for _, row in members.iterrows()}
        same = {rest(params[m]) for m in sweep if m in params}
        sweep.update({m: float(p[param]) for m, p in params.items()
                      if m not in swept["model"].values and param in p and rest(p) in same})
        sweeps.append(sweep)
    return sweeps


def _merge_close(points: pd.DataFrame, labels: list, within: float = 0.03) -> list[tuple[tuple, list]]:
    """Labels of points that lie within `within` of the data span of each other, joined (e.g.
    two collapsed models at the same spot get one label "β=2, 4")."""
    span = (points.max() - points.min()).replace(0, 1).to_numpy()
    groups: list[tuple[tuple, list]] = []
    for xy, label in zip(points.to_numpy(), labels):
        for anchor, members in groups:
            if (np.abs(xy - anchor) <= within * span).all():
                members.append(label)
                break
        else:
            groups.append((tuple(xy), [label]))
    return groups


def plane(summary: pd.DataFrame, stem: Path, runs_dir: Path | None, options: dict[str, Any],
          palette: dict[str, tuple]) -> dict[Path, str]:
    """Per dataset, each model's (x, y) = two ledger terms (options x, y: e.g. rate and
    distortion): seeds as small points, the mean as a large one; the sweep over options
    `sweep` joined in its order; with `entropy_line`, R + D = H where H is known; with
    `mutual_info`, I(X;Z) as a cross; with `annotate`, that metric's mean beside each point."""
    x, y = options["x"], options["y"]
    if summary.empty or not {x, y} <= set(summary.columns):
        return {}
    colours = palette
    datasets = list(summary["dataset"].unique())
    plt, fig, axes = _panels(len(datasets), 3, (5.4, 5.0))
    has_h = has_i = has_ceiling = has_sweep = False
    annotate = options.get("annotate")
    extra = [c for c in (["mutual_info"] if options.get("mutual_info") else []) + ([annotate] if annotate else [])
             if c in summary]
    for ax, dataset in zip(axes, datasets):
        runs = summary[summary["dataset"] == dataset]
        means = runs.groupby("model")[[x, y] + extra].mean()
        for model in _models(runs):
            seeds, mean = runs[runs["model"] == model], means.loc[model]
            ax.scatter(seeds[x], seeds[y], s=12, color=colours[model], alpha=0.45, lw=0)
            ax.scatter(mean[x], mean[y], s=70, color=colours[model], edgecolor="k", lw=0.6, zorder=4)
            if annotate and pd.notna(mean.get(annotate)):
                ax.annotate(f"{annotate} {mean[annotate]:.3f}", (mean[x], mean[y]), xytext=(6, -10),
                            textcoords="offset points", fontsize=7.5, color=colours[model])
            if options.get("mutual_info") and pd.notna(mean.get("mutual_info")):
                has_i = True
                ax.plot([mean["mutual_info"], mean[x]], [mean[y]] * 2, color=colours[model],
                        lw=0.8, ls=":", zorder=3)
                ax.scatter(mean["mutual_info"], mean[y], marker="x", s=40, color=colours[model], zorder=4)
        ceiling = runs["mutual_info_max"].max() if "mutual_info_max" in runs else np.nan
        if has_i and "mutual_info" in means and (means["mutual_info"] > 0.9 * ceiling).any():
            has_ceiling = True  # the estimate of I cannot exceed log N: near it, I is a lower bound
            ax.axvline(ceiling, color="0.5", ls="-.", lw=1)
        param = options.get("sweep")
        symbol = SYMBOLS.get(param, param)
        for sweep in _sweeps(runs, runs_dir, param) if param else []:
            if len(sweep) < 2:
                continue
            has_sweep = True
            order = sorted(sweep, key=sweep.get)
            points = means.loc[order, [x, y]]
            ax.plot(points[x], points[y], color="0.4", lw=1, zorder=2)
            for (r, d), values in _merge_close(points, [sweep[m] for m in order]):
                ax.annotate(f"{symbol}=" + ", ".join(f"{b:g}" for b in values), (r, d), xytext=(6, 5),
                            textcoords="offset points", fontsize=8, color="0.25")
        entropy = _entropy(summary, dataset) if options.get("entropy_line") else None
        ax.margins(0.12)
        if entropy is not None:
            has_h = True
            (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
            xs = np.linspace(min(x0, entropy - y1), x1, 50)
            ax.plot(xs, entropy - xs, color="k", ls="--", lw=1)
            ax.fill_between(xs, entropy - xs, min(y0, entropy - x1) - 1, color="0.5", alpha=0.15, lw=0)
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
        ax.set_title(dataset + ("" if entropy is None else f"  (H = {entropy:.3f} nats)"))
        ax.set_xlabel(f"{options.get('x_label', x)}  ({NATS})")
        ax.set_ylabel(f"{options.get('y_label', y)}\n({NATS})")
    handles = [_handle(plt, colours[m], m, ls="") for m in _models(summary)]
    if has_sweep:
        handles.append(_handle(plt, "0.4", f"{symbol} sweep ({symbol} = weight of {x} in training)", marker=""))
    if has_h:
        handles.append(_handle(plt, "k", "R + D = H (shaded: infeasible, −ELBO < H)", marker="", ls="--"))
    if has_i:
        handles.append(_handle(plt, "0.3", "mutual information I(X;Z) (H − D ≤ I ≤ R; dotted: to R)",
                               marker="x", ls=""))
    if has_ceiling:
        handles.append(_handle(plt, "0.5", "log N: ceiling of the I estimate (N test examples)", marker="", ls="-."))
    _save(plt, fig, stem, options.get("title", f"{x} against {y} (test set)"), handles, ncol=3)
    caption = (f"{x} against {y} on held-out data, one panel per dataset: large dots are means over seeds, small "
               f"dots single seeds" + (f", and the grey line traces the {symbol} sweep" if has_sweep else "")
               + f"; points further down-left have a smaller {x} + {y}.")
    if annotate:
        caption += f" Each mean is labelled with its {annotate}."
    if has_h:
        caption += (" The dashed line R + D = H bounds what any model can reach (shaded: −ELBO below the data "
                    "entropy); the distance from it along the diagonal is KL(P‖Q).")
    if has_i:
        caption += (" Each cross marks the mutual information I(X;Z) at the model's distortion: the dotted gap "
                    "to the dot is the marginal KL (rate spent beyond I).")
    if has_ceiling:
        caption += " Near the dash-dotted log N line the estimate of I saturates and is only a lower bound."
    return {Path(stem): caption}


# --- 2. ledger bars ---------------------------------------------------------------------

def ledger_bars(summary: pd.DataFrame, stem: Path, runs_dir: Path, options: dict[str, Any],
                palette: dict[str, tuple]) -> dict[Path, str]:
    """Stacked mean ledger terms per model, one panel per dataset and task (density of x, or
    labels y for the models whose primary task is to predict them), each with its own y scale."""
    if summary.empty:
        return {}
    import seaborn as sns

    term_names = [t for t in _terms(summary) if t in summary]
    term_colours = dict(zip(term_names, sns.color_palette("Set2", len(term_names))))
    predicts = summary["task"] != "density"
    tasks = [("density of x", ~predicts), ("labels y", predicts)]
    panels = [(d, name, rows & (summary["dataset"] == d)) for d in summary["dataset"].unique()
              for name, rows in tasks if (rows & (summary["dataset"] == d)).any()]
    width = max(len(_models(summary[rows])) for _, _, rows in panels)
    plt, fig, axes = _panels(len(panels), 3 if width <= 8 else 2, (max(4.6, 0.62 * width + 1.2), 4.6))
    has_h = has_bound = False
    for ax, (dataset, task, rows) in zip(axes, panels):
        runs = summary[rows]
        models = _models(runs)
        means = runs.groupby("model").mean(numeric_only=True).loc[models]
        spread = runs.groupby("model")["neg_elbo"].agg(["min", "max"]).loc[models]
        x = np.arange(len(models))
        up, down = np.zeros(len(models)), np.zeros(len(models))
        for term in term_names:
            if term not in means or means[term].isna().all():
                continue
            value = means[term].fillna(0).to_numpy()
            base = np.where(value >= 0, up, down)
            ax.bar(x, value, 0.7, bottom=base, color=term_colours[term], edgecolor="white", lw=0.5)
            up, down = up + np.clip(value, 0, None), down + np.clip(value, None, 0)
        total = means["neg_elbo"].to_numpy()
        ax.errorbar(x, total, yerr=[total - spread["min"], spread["max"] - total], fmt="_", color="k", ms=22,
                    mew=1.5, capsize=3, zorder=4)
        if "nll_bound" in means and means["nll_bound"].notna().any():
            has_bound = True
            ax.scatter(x, means["nll_bound"], marker="v", color="k", s=22, zorder=5)
        entropy = _entropy(runs, dataset, "data_entropy")
        if entropy is not None:
            has_h = True
            ax.axhline(entropy, color="k", ls="--", lw=1)
        top = np.maximum(up, spread["max"].to_numpy())
        for i, model in enumerate(models):
            label = f"{total[i]:.4g}"
            if "kl_total" in means and pd.notna(means.at[model, "kl_total"]):
                label += f"\nKL {means.at[model, 'kl_total']:.3g}"
            ax.annotate(label, (x[i], top[i]), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7.5)
        ax.set_ylim(min(down.min(), 0) * 1.15, max(top.max(), entropy or 0) * 1.22)
        spare = (width - len(models)) / 2  # bars keep one width when a panel has fewer models
        ax.set_xlim(-0.6 - spare, len(models) - 0.4 + spare)
        ax.set_xticks(x, models, rotation=35, ha="right", fontsize=9)
        ax.set_title(f"{dataset}: {task}" + ("" if entropy is None else f"  (test-set H = {entropy:.3f})"), fontsize=11)
        ax.set_ylabel(NATS + (" (of the labels)" if task == "labels y" else ""))
        _bpd_axis(ax, _bpd_per_nat(runs, dataset) if task == "density of x" else None)
    handles = [plt.Rectangle((0, 0), 1, 1, color=term_colours[t], label=t) for t in term_names]
    handles.append(_handle(plt, "k", "−ELBO = sum of terms (bar: seed range)", marker="_", ls="", ms=14, mew=1.5))
    if has_bound:
        handles.append(_handle(plt, "k", "tighter bound −L_k (IWAE, largest k)", marker="v", ls=""))
    if has_h:
        handles.append(_handle(plt, "k", "data entropy H of the test examples", marker="", ls="--"))
    _save(plt, fig, stem, "Where the nats go: mean held-out ledger terms", handles, ncol=4)
    caption = ("Each bar stacks a model's mean held-out ledger terms (their sum is the −ELBO, written above "
               "the bar, with its seed range); panels have their own scale, and a predictive model's nats are "
               "of labels, not inputs.")
    if has_h:
        caption += (" The dashed line is the data entropy H: the height above it, KL in the label, is the "
                    "KL(P‖Q) the model still pays.")
    return {Path(stem): caption}


# --- 3. a bound against its number of importance samples k --------------------------------------------------------------

def bound_vs_k(summary: pd.DataFrame, stem: Path, runs_dir: Path, options: dict[str, Any],
               palette: dict[str, tuple]) -> dict[Path, str]:
    """-L_k against k (log axis), from the diagnostics `{column}.{k}` (options column, e.g.
    iwae_nll): mean and seed range per model, one panel per dataset; k = 1 is the ELBO. A
    second row shows the same curves less their k = 1 value."""
    prefix = options["column"] + "."
    columns = {int(c[len(prefix):]): c for c in summary.columns
               if c.startswith(prefix) and c[len(prefix):].isdigit() and summary[c].notna().any()}
    if not columns:
        return {}
    ks = sorted(columns)
    runs = summary.dropna(subset=[columns[k] for k in ks], how="all")
    long = runs[["dataset", "model", "seed", "order"] + [columns[k] for k in ks]].melt(
        id_vars=["dataset", "model", "seed", "order"], var_name="k", value_name="bound").dropna()
    long["k"] = long["k"].str.split(".").str[1].astype(int)
    long["gain"] = long["bound"] - long.groupby(["dataset", "model", "seed"])["bound"].transform(
        lambda s: s[long.loc[s.index, "k"] == min(ks)].mean())
    colours = palette
    datasets = list(long["dataset"].unique())
    plt, fig, axes = _panels(2 * len(datasets), len(datasets), (4.8, 3.6))
    for j, dataset in enumerate(datasets):
        top, bottom = axes[j], axes[len(datasets) + j]
        frame = long[long["dataset"] == dataset]
        for model in _models(frame):
            for ax, y in ((top, "bound"), (bottom, "gain")):
                _line_band(ax, frame[frame["model"] == model], "k", y, colours[model], marker="o", ms=4)
        entropy = _entropy(summary, dataset)
        if entropy is not None:
            top.axhline(entropy, color="k", ls="--", lw=1)
        top.set_title(dataset + ("" if entropy is None else f"  (H = {entropy:.3f})"))
        top.set_ylabel(f"−L_k  ({NATS})")
        bottom.set_ylabel(f"−L_k − (−L_{min(ks)})  (nats)")
        _bpd_axis(top, _bpd_per_nat(summary, dataset))
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_xticks(ks, [f"{k}\n(ELBO)" if k == 1 else str(k) for k in ks])
        bottom.set_xlabel("importance samples k")
    handles = [_handle(plt, colours[m], m) for m in _models(long)]
    if any(_entropy(summary, d) is not None for d in datasets):
        handles.append(_handle(plt, "k", "data entropy H", marker="", ls="--"))
    _save(plt, fig, stem, "Importance-weighted bound −L_k against k (test set)", handles, ncol=5)
    caption = ("The importance-weighted bound −L_k on −log q(x) per model (line: mean over seeds, band: seed "
               "range); k = 1 is the ELBO and each curve must fall with k. The bottom row subtracts the k = 1 "
               "value, so its drop at the largest k is the inference gap each model leaves. The bound is "
               "computed on the first iwae_examples test examples, so k = 1 can differ a little from the −ELBO "
               "of the other figures.")
    return {Path(stem): caption}


# --- 4. curves along a fixed grid (e.g. a loss per noise level) -------------------------------------------------------------

def curves(summary: pd.DataFrame, stem: Path, runs_dir: Path, options: dict[str, Any],
           palette: dict[str, tuple]) -> dict[Path, str]:
    """Each run's curve file (options file, e.g. loss_curve.csv: a grid variable, then loss in
    nats), mean over seeds with a band, one panel per dataset, grid variable and value column,
    hue = model. options grids: grid column -> [x label, y label], preferred first; a run is
    drawn against the first grid its file has, so different quantities never share an axis."""
    curves = _read_runs(summary, runs_dir, options["file"])
    if curves.empty:
        return {}
    keys = {"dataset", "model", "family", "seed", "order"}
    grid_labels = dict(options.get("grids", {}))
    grid_columns = tuple(grid_labels)
    grids = [g for g in grid_columns if g in curves] or [curves.columns[0]]
    values = [c for c in curves.select_dtypes("number").columns if c not in keys | set(grid_columns) | set(grids)]
    values = ["loss"] if "loss" in values else values
    panels = []
    for dataset in curves["dataset"].unique():
        frame = curves[curves["dataset"] == dataset]
        for grid in grids:  # a run is drawn against its preferred grid variable
            own = frame[frame[grid].notna()]
            if grid != grids[0] and grids[0] in own:
                own = own[own[grids[0]].isna()]
            panels += [(dataset, grid, value, own) for value in values if own[value].notna().any()]
    if not panels:
        return {}
    colours = palette
    plt, fig, axes = _panels(len(panels), 3 if len(values) == 1 else len(values), (5.0, 3.8))
    for ax, (dataset, grid, value, frame) in zip(axes, panels):
        for model in _models(frame):
            _line_band(ax, frame[frame["model"] == model].dropna(subset=[value]), grid, value, colours[model])
        x_label, y_label = grid_labels.get(grid, (grid, f"loss ({NATS})"))
        ax.set_title(f"{dataset}: " + (f"per {x_label.split('  ')[0]}" if value == "loss" else f"{value} per {grid}"))
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        if (frame[value] > 0).all() and frame[value].max() / frame[value].min() > 100:
            ax.set_yscale("log")
    handles = [_handle(plt, colours[m], m, marker="") for m in _models(curves)]
    _save(plt, fig, stem, options.get("title", f"{options['file']} (test set)"), handles, ncol=5)
    caption = options.get("caption", f"Each run's {options['file']}: line, mean over seeds; band, seed range.")
    return {Path(stem): caption}


# --- 5. training curves -------------------------------------------------------------------

def training_curves(summary: pd.DataFrame, stem: Path, runs_dir: Path, options: dict[str, Any],
                    palette: dict[str, tuple]) -> dict[Path, str]:
    """history.csv of one family's runs: rows = dataset, columns = ledger term and -ELBO,
    colour = model; validation (solid, band over seeds) and train (dashed) against optimizer steps."""
    written = {}
    colours = palette
    for family in summary["family"].unique():
        runs = summary[summary["family"] == family]
        history = _read_runs(runs, runs_dir, "history.csv")
        if history.empty:
            continue
        predicts = (runs["task"] != "density").all()
        # "objective": what a model trains on where it is not the ELBO (IWAE's -L_k, beta-VAE's D + beta R)
        columns = [t for t in (*_terms(runs), "neg_elbo", "objective")
                   if t in history and history[t].notna().any()]
        datasets = list(history["dataset"].unique())
        plt, fig, axes = _panels(len(datasets) * len(columns), len(columns), (4.4, 3.2))
        for i, dataset in enumerate(datasets):
            frame = history[history["dataset"] == dataset]
            for j, column in enumerate(columns):
                ax = axes[i * len(columns) + j]
                for model in _models(frame):
                    runs = frame[frame["model"] == model]
                    _line_band(ax, runs[runs["split"] == "val"], "step", column, colours[model], lw=1.4)
                    train = runs[runs["split"] == "train"].groupby("step")[column].mean()
                    ax.plot(train.index, train.to_numpy(), color=colours[model], ls="--", lw=0.8, alpha=0.8)
                # the first steps dwarf the rest: frame the last 90% of training
                late = frame[frame["step"] >= 0.1 * frame["step"].max()][column].dropna()
                if len(late):
                    low, high = late.min(), late.max()
                    # a constant term (a fixed prior KL) varies by float rounding: frame its value
                    flat = high - low <= 1e-6 * max(abs(high), abs(low))
                    pad = (0.05 * abs(high) or 0.1) if flat else 0.08 * (high - low)
                    ax.set_ylim(low - pad, high + pad)
                title = {"neg_elbo": "−ELBO", "objective": "own objective (what it trains: −L_k or D+βR)"}.get(column, column)
                ax.set_title(f"{dataset}: {title}", fontsize=10)
                ax.set_xlabel("optimizer step")
                ax.set_ylabel(NATS + (" (labels)" if predicts else ""))
        handles = [_handle(plt, colours[m], m, marker="") for m in _models(history)]
        handles += [_handle(plt, "0.3", "validation (band: seed range)", marker=""),
                    _handle(plt, "0.3", "train (mean over seeds)", marker="", ls="--", lw=0.8)]
        path = Path(stem)
        _save(plt, fig, path, f"Training curves of the {family} family: ledger terms against steps", handles, ncol=5)
        written[path] = (f"Every ledger term of the {family} models against optimizer steps on the validation split "
                         "(solid, band: seed range) and training batches (dashed), one row per dataset; the y-axis "
                         "frames the last 90% of training, so early steps may run off the top. A curve still "
                         "falling at the right edge has not converged; a widening gap between dashed and solid "
                         "lines is overfitting (the run keeps its best validation checkpoint).")
    return written


# --- 6. sample grids ----------------------------------------------------------------------

def _frame(data: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis limits of a 2-D scatter: the held-out data's range with a 15% margin, square."""
    low, high = data.min(0), data.max(0)
    centre, half = (low + high) / 2, 0.575 * (high - low).max()
    return (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)


def sample_grids(summary: pd.DataFrame, stem: Path, runs_dir: Path, options: dict[str, Any],
                 palette: dict[str, tuple]) -> dict[Path, str]:
    """For one dataset, the held-out data and the samples of each density model's first seed
    (samples.npz of its run), redrawn on common axes: one frame and grey scale for all."""
    from klbench.plots import SAMPLES_FILE, draw_samples, is_scatter, load_samples

    written = {}
    runs = _density(summary).sort_values("seed")
    colours = palette
    for dataset in runs["dataset"].unique():
        first = runs[runs["dataset"] == dataset].drop_duplicates("model")
        stored = {row["model"]: load_samples(path) for _, row in first.sort_values("order").iterrows()
                  if (path := _run_dir(runs_dir, row) / SAMPLES_FILE).exists()}
        if not stored:
            continue
        _, data, shape = next(iter(stored.values()))
        seed = int(first["seed"].min())
        size = (3.6, 3.9) if is_scatter(shape) else (3.6, 4.0) if len(shape) == 2 else (4.6, 3.2)
        plt, fig, axes = _panels(len(stored) + 1, 4, size)
        vmax = float(data.max())
        xlim, ylim = _frame(data) if is_scatter(shape) else (None, None)
        panels = [("held-out data", data, "0.3")] + [(m, samples, colours[m]) for m, (samples, _, _) in stored.items()]
        for ax, (name, points, colour) in zip(axes, panels):
            draw_samples(ax, points, shape, colour, vmax)
            title = name
            if is_scatter(shape):
                ax.set_xlim(*xlim)
                ax.set_ylim(*ylim)
                outside = ((points[:, 0] < xlim[0]) | (points[:, 0] > xlim[1])
                           | (points[:, 1] < ylim[0]) | (points[:, 1] > ylim[1])).mean()
                if outside >= 0.005:
                    title += f"\n({100 * outside:.0f}% of samples outside the frame)"
            elif len(shape) == 1:
                ax.set_ylim(data.min() - 0.1 * np.ptp(data), data.max() + 0.1 * np.ptp(data))
            ax.set_title(title, fontsize=11, fontweight="normal" if name == "held-out data" else "bold")
        path = Path(stem)
        _save(plt, fig, path, f"{dataset}: held-out data and samples of each model (seed {seed})")
        if is_scatter(shape):
            detail = ("Every panel has the held-out data's frame, so shapes compare directly; a panel's title "
                      "says how many samples fall outside it.")
        elif len(shape) == 2:
            detail = ("Images are what each model's sampler returns (a decoder's mean pixel probabilities, or "
                      "samples in data units), all on one grey scale.")
        else:
            detail = "The first 16 samples of each model as curves, on the data's value range."
        written[path] = (f"Held-out data and samples of every generative model on {dataset} (seed {seed}); "
                         f"compare them with the −ELBO of each model. {detail}")
    return written


# --- the plan: what is drawn, known before any run exists --------------------------------

# The drawings a family's declared figures (Family.figures) may name, and the three every plan has.
FIGURE_KINDS = {"plane": plane, "bound_vs_k": bound_vs_k, "curves": curves}
COMMON_KINDS = {"ledger_bars": ledger_bars, "training_curves": training_curves, "sample_grids": sample_grids}


@dataclass(frozen=True)
class PlannedFigure:
    """One comparison figure: its file stem, drawing, the runs it shows (of these families,
    and of this dataset only where `dataset` is set), the drawing's options, and where the
    report files it (category, subcategory)."""

    name: str
    kind: str
    families: tuple[str, ...]
    dataset: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    category: str = "all families"
    subcategory: str = "comparison"

    def runs(self, summary: pd.DataFrame) -> pd.DataFrame:
        rows = summary["family"].isin(self.families)
        if self.dataset is not None:
            rows &= summary["dataset"] == self.dataset
        return summary[rows]


def plan_figures(pairs: list[tuple[str, Family]]) -> list[PlannedFigure]:
    """The figures that runs of these (dataset, family) pairs make: the ledger bars of all of
    them, each family's training curves, a sample grid per dataset with a density model, and
    every figure the families declare (one figure per name, shared by the families that
    declare it). The workflow declares them as outputs; `write_all` draws them."""
    families = list(dict.fromkeys(family.name for _, family in pairs))
    by_name = {family.name: family for _, family in pairs}
    plan = [PlannedFigure("ledger_bars", "ledger_bars", tuple(families))]
    declared: dict[str, PlannedFigure] = {}
    for name in families:
        for figure in by_name[name].figures:
            if figure.kind not in FIGURE_KINDS:
                raise ValueError(f"family {name}: figure {figure.name} has unknown kind {figure.kind!r}; "
                                 f"kinds: {', '.join(FIGURE_KINDS)}")
            shared = declared.get(figure.name)
            if shared and (shared.kind, shared.options) != (figure.kind, dict(figure.options)):
                raise ValueError(f"families {', '.join(shared.families)} and {name} declare figure {figure.name} "
                                 "differently; give one of them another name")
            members = (shared.families if shared else ()) + (name,)
            declared[figure.name] = PlannedFigure(figure.name, figure.kind, members, options=dict(figure.options),
                                                  category=" and ".join(members))
    plan += list(declared.values())
    plan += [PlannedFigure(f"training_curves-{name}", "training_curves", (name,), category=name) for name in families]
    density_sets = dict.fromkeys(d for d, family in pairs if family.density)
    density = tuple(name for name in families if by_name[name].density)
    plan += [PlannedFigure(f"sample_grids-{d}", "sample_grids", density, dataset=d, category="samples", subcategory=d)
             for d in density_sets]
    return plan


def write_all(summary: pd.DataFrame, runs_dir: Path, out_dir: Path, plan: list[PlannedFigure]) -> dict[str, str]:
    """Every planned figure into out_dir (PNG and PDF); returns file stem -> caption."""
    out_dir, runs_dir = Path(out_dir), Path(runs_dir)
    summary = with_model_order(summary, [name for figure in plan for name in figure.families])
    palette = _palette(summary)
    written: dict[Path, str] = {}
    for figure in plan:
        draw = FIGURE_KINDS.get(figure.kind) or COMMON_KINDS[figure.kind]
        written.update(draw(figure.runs(summary), out_dir / figure.name, runs_dir, figure.options, palette))
    return {path.name: caption for path, caption in written.items()}


def plot_results(summary_csv: Path, runs_dir: Path, out_dir: Path, plan: list[PlannedFigure]) -> dict[str, str]:
    """What `klbench plot` calls: summary.csv + runs folder -> figures and captions.json in out_dir."""
    captions = write_all(pd.read_csv(summary_csv), runs_dir, out_dir, plan)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")
    return captions
