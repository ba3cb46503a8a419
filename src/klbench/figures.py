"""Comparison figures across runs: the summary table and run-directory files -> PNG and PDF.

Each figure function takes the summary table (one row per run, `aggregate.summary_table`)
and, where it needs per-run files, the runs folder (`{runs}/{dataset}/{model}/seed{seed}/`),
writes `{stem}.png` and `{stem}.pdf` and returns {stem: caption}; it returns {} and writes
nothing where the runs it compares are absent (e.g. no diffusion runs). Values are nats
per example; image-like datasets get bits per dimension on a second axis. Spread over
seeds is the range (min to max), drawn as a band or as every seed's point.
Reads files, never models.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from klbench.ledger import FAMILY_TERMS as TERMS  # in stacking order
from klbench.plots import _pyplot as _plain_pyplot

NATS = "nats per example"
GENERATIVE = ("vae", "diffusion")  # density models of x; BBB models labels y given x
# The grid variable of a diffusion loss_curve.csv, preferred first: DDPM's KL_t per step and
# VDM's loss per unit log-SNR are different quantities and must not share an axis.
GRID_COLUMNS = ("t", "log_snr")
GRID_UNITS = {"t": "KL_t (nats per example, per step)", "log_snr": "nats per example per unit log-SNR"}
GRID_LABELS = {"log_snr": "log-SNR  λ = log(α²/σ²)", "t": "timestep t"}
SWEEP_NAME = re.compile(r"^(?P<base>.+)-(?P<tag>[a-z_]+)(?P<value>\d+(?:\.\d*)?(?:e-?\d+)?)$")  # NAME-<tag><value>


# --- shared helpers ---------------------------------------------------------------------

def _sort_key(model: str) -> tuple:
    """Variants of a sweep in numeric order: beta_vae-b0.25 < beta_vae-b2 < beta_vae-b4."""
    match = SWEEP_NAME.match(model)
    return (match["base"], match["tag"], float(match["value"])) if match else (model, "", 0.0)


def _pyplot():
    import seaborn as sns

    plt = _plain_pyplot()
    sns.set_theme(style="whitegrid", context="notebook")
    return plt


def _models(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["model"].unique(), key=_sort_key)


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
                                       seed=row["seed"])
              for _, row in summary.iterrows() if (path := _run_dir(runs_dir, row) / name).exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _line_band(ax, frame: pd.DataFrame, x: str, y: str, colour, label: str | None = None, **style) -> None:
    """Mean over seeds as a line, min-max over seeds as a band."""
    stats = frame.groupby(x)[y].agg(["mean", "min", "max"]).reset_index()
    ax.plot(stats[x], stats["mean"], color=colour, label=label, **style)
    ax.fill_between(stats[x], stats["min"], stats["max"], color=colour, alpha=0.2, lw=0)


def _family(summary: pd.DataFrame, families) -> pd.DataFrame:
    return summary[summary["family"].isin(families)]


# --- 1. rate-distortion -----------------------------------------------------------------

def _beta_sweeps(vae: pd.DataFrame, runs_dir: Path | None) -> dict[str, float]:
    """model -> beta for the models of a beta sweep: variants named NAME-b<beta> and, where
    config.json shows it, any model with the same parameters but beta (e.g. vae at beta 1)."""
    params = {}
    if runs_dir is not None:
        for _, row in vae.drop_duplicates("model").iterrows():
            path = _run_dir(runs_dir, row) / "config.json"
            if path.exists():
                params[row["model"]] = json.loads(path.read_text()).get("params", {})
    tagged = {m: float(match["value"]) for m in vae["model"].unique()
              if (match := SWEEP_NAME.match(m)) and match["tag"] == "b"}
    if not tagged or not params:
        return tagged
    rest = lambda p: json.dumps({k: v for k, v in p.items() if k != "beta"}, sort_keys=True)  # noqa: E731
    swept = {rest(params[m]) for m in tagged if m in params}
    betas = {m: float(p["beta"]) for m, p in params.items() if "beta" in p and rest(p) in swept}
    return {**tagged, **betas}


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


def rate_distortion(summary: pd.DataFrame, stem: Path, runs_dir: Path | None = None) -> dict[Path, str]:
    """Per dataset, each VAE's (rate, distortion): seeds as small points, the mean as a large one;
    the beta sweep joined in beta order; R + D = H where H is known; I(X;Z) as a cross."""
    vae = _family(summary, ["vae"])
    if vae.empty or not {"rate", "distortion"} <= set(vae.columns):
        return {}
    colours = _palette(summary)
    datasets = list(vae["dataset"].unique())
    plt, fig, axes = _panels(len(datasets), 3, (5.4, 5.0))
    has_h = has_i = has_ceiling = False
    for ax, dataset in zip(axes, datasets):
        runs = vae[vae["dataset"] == dataset]
        means = runs.groupby("model")[["rate", "distortion"] + [c for c in ["mutual_info"] if c in runs]].mean()
        for model in _models(runs):
            seeds, mean = runs[runs["model"] == model], means.loc[model]
            ax.scatter(seeds["rate"], seeds["distortion"], s=12, color=colours[model], alpha=0.45, lw=0)
            ax.scatter(mean["rate"], mean["distortion"], s=70, color=colours[model], edgecolor="k", lw=0.6,
                       zorder=4)
            if pd.notna(mean.get("mutual_info")):
                has_i = True
                ax.plot([mean["mutual_info"], mean["rate"]], [mean["distortion"]] * 2, color=colours[model],
                        lw=0.8, ls=":", zorder=3)
                ax.scatter(mean["mutual_info"], mean["distortion"], marker="x", s=40, color=colours[model], zorder=4)
        ceiling = runs["mutual_info_max"].max() if "mutual_info_max" in runs else np.nan
        if has_i and "mutual_info" in means and (means["mutual_info"] > 0.9 * ceiling).any():
            has_ceiling = True  # the estimate of I cannot exceed log N: near it, I is a lower bound
            ax.axvline(ceiling, color="0.5", ls="-.", lw=1)
        sweep = _beta_sweeps(runs, runs_dir)
        if len(sweep) > 1:
            order = sorted(sweep, key=sweep.get)
            points = means.loc[order, ["rate", "distortion"]]
            ax.plot(points["rate"], points["distortion"], color="0.4", lw=1, zorder=2)
            for (r, d), betas in _merge_close(points, [sweep[m] for m in order]):
                ax.annotate("β=" + ", ".join(f"{b:g}" for b in betas), (r, d), xytext=(6, 5),
                            textcoords="offset points", fontsize=8, color="0.25")
        entropy = _entropy(summary, dataset)
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
        ax.set_xlabel(f"rate R = KL(e(z|x) ‖ m(z))  ({NATS})")
        ax.set_ylabel(f"distortion D = −E log d(x|z)\n({NATS})")
    handles = [_handle(plt, colours[m], m, ls="") for m in _models(vae)]
    handles.append(_handle(plt, "0.4", "β sweep (β = weight of R in training)", marker=""))
    if has_h:
        handles.append(_handle(plt, "k", "R + D = H (shaded: infeasible, −ELBO < H)", marker="", ls="--"))
    if has_i:
        handles.append(_handle(plt, "0.3", "mutual information I(X;Z) (H − D ≤ I ≤ R; dotted: to R)",
                               marker="x", ls=""))
    if has_ceiling:
        handles.append(_handle(plt, "0.5", "log N: ceiling of the I estimate (N test examples)", marker="", ls="-."))
    _save(plt, fig, stem, "Rate-distortion plane of the VAE variants (test set)", handles, ncol=4)
    caption = ("Rate against distortion on held-out data, one panel per dataset: large dots are means over "
               "seeds, small dots single seeds, and the grey line traces the β sweep; points further down-left "
               "have a smaller −ELBO = R + D.")
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

def ledger_bars(summary: pd.DataFrame, stem: Path) -> dict[Path, str]:
    """Stacked mean ledger terms per model, one panel per dataset and task (density of x,
    or labels y for BBB), each with its own y scale."""
    families = [f for f in TERMS if f in set(summary["family"])]
    if not families:
        return {}
    import seaborn as sns

    term_names = [t for f in families for t in TERMS[f] if t in summary]
    term_colours = dict(zip(term_names, sns.color_palette("Set2", len(term_names))))
    tasks = [("density of x", GENERATIVE), ("labels y (BBB)", ("bbb",))]
    panels = [(d, name, fams) for d in summary["dataset"].unique() for name, fams in tasks
              if summary[(summary["dataset"] == d) & summary["family"].isin(fams)].size]
    width = max(len(_models(summary[summary["dataset"] == d])) for d, _, _ in panels)
    plt, fig, axes = _panels(len(panels), 3 if width <= 8 else 2, (max(4.6, 0.62 * width + 1.2), 4.6))
    has_h = has_bound = False
    for ax, (dataset, task, fams) in zip(axes, panels):
        runs = summary[(summary["dataset"] == dataset) & summary["family"].isin(fams)]
        family_of = runs.drop_duplicates("model").set_index("model")["family"]
        models = sorted(family_of.index, key=lambda m: (list(TERMS).index(family_of[m]), _sort_key(m)))
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
        ax.set_ylabel(NATS + (" (of the labels)" if fams == ("bbb",) else ""))
        _bpd_axis(ax, _bpd_per_nat(runs, dataset) if fams == GENERATIVE else None)
    handles = [plt.Rectangle((0, 0), 1, 1, color=term_colours[t], label=t) for t in term_names]
    handles.append(_handle(plt, "k", "−ELBO = sum of terms (bar: seed range)", marker="_", ls="", ms=14, mew=1.5))
    if has_bound:
        handles.append(_handle(plt, "k", "tighter bound −L_k (IWAE, largest k)", marker="v", ls=""))
    if has_h:
        handles.append(_handle(plt, "k", "data entropy H of the test examples", marker="", ls="--"))
    _save(plt, fig, stem, "Where the nats go: mean held-out ledger terms", handles, ncol=4)
    caption = ("Each bar stacks a model's mean held-out ledger terms (their sum is the −ELBO, written above "
               "the bar, with its seed range); panels have their own scale, and BBB's nats are of labels, not "
               "inputs.")
    if has_h:
        caption += (" The dashed line is the data entropy H: the height above it, KL in the label, is the "
                    "KL(P‖Q) the model still pays.")
    return {Path(stem): caption}


# --- 3. IWAE bound against k --------------------------------------------------------------

def iwae_vs_k(summary: pd.DataFrame, stem: Path) -> dict[Path, str]:
    """-L_k against k (log axis): mean and seed range per model, one panel per dataset;
    k = 1 is the ELBO. A second row shows the same curves less their k = 1 value."""
    columns = {int(c.split(".", 1)[1]): c for c in summary.columns
               if c.startswith("iwae_nll.") and c.split(".", 1)[1].isdigit() and summary[c].notna().any()}
    if len(columns) < 2:
        return {}
    ks = sorted(columns)
    runs = summary.dropna(subset=[columns[k] for k in ks], how="all")
    long = runs[["dataset", "model", "seed"] + [columns[k] for k in ks]].melt(
        id_vars=["dataset", "model", "seed"], var_name="k", value_name="bound").dropna()
    long["k"] = long["k"].str.split(".").str[1].astype(int)
    long["gain"] = long["bound"] - long.groupby(["dataset", "model", "seed"])["bound"].transform(
        lambda s: s[long.loc[s.index, "k"] == min(ks)].mean())
    colours = _palette(summary)
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


# --- 4. diffusion loss curves -------------------------------------------------------------

def diffusion_curves(summary: pd.DataFrame, runs_dir: Path, stem: Path) -> dict[Path, str]:
    """Each diffusion run's loss_curve.csv (loss per timestep or per log-SNR), mean over seeds
    with a band, one panel per dataset, grid variable and loss column, hue = model."""
    curves = _read_runs(_family(summary, ["diffusion"]), runs_dir, "loss_curve.csv")
    if curves.empty:
        return {}
    keys = {"dataset", "model", "family", "seed"}
    grids = [g for g in GRID_COLUMNS if g in curves] or [curves.columns[0]]
    values = [c for c in curves.select_dtypes("number").columns if c not in keys | set(GRID_COLUMNS) | set(grids)]
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
    colours = _palette(summary)
    plt, fig, axes = _panels(len(panels), 3 if len(values) == 1 else len(values), (5.0, 3.8))
    for ax, (dataset, grid, value, frame) in zip(axes, panels):
        for model in _models(frame):
            _line_band(ax, frame[frame["model"] == model].dropna(subset=[value]), grid, value, colours[model])
        ax.set_title(f"{dataset}: " + (f"per {GRID_LABELS.get(grid, grid).split('  ')[0]}" if value == "loss"
                                         else f"{value} per {grid}"))
        ax.set_xlabel(GRID_LABELS.get(grid, grid))
        ax.set_ylabel(GRID_UNITS.get(grid, f"loss ({NATS})"))
        if (frame[value] > 0).all() and frame[value].max() / frame[value].min() > 100:
            ax.set_yscale("log")
    handles = [_handle(plt, colours[m], m, marker="") for m in _models(curves)]
    _save(plt, fig, stem, "Diffusion loss along the noise schedule (test set)", handles, ncol=5)
    caption = ("Per-example diffusion loss along each model's noise grid (line: mean over seeds, band: seed "
               "range): where a curve is high is where the model pays most of its diffusion-term nats. DDPM "
               "panels show KL_t per timestep t, VDM panels the loss per unit log-SNR; their areas, not their "
               "heights, compare.")
    return {Path(stem): caption}


# --- 5. training curves -------------------------------------------------------------------

def training_curves(summary: pd.DataFrame, runs_dir: Path, stem: Path) -> dict[Path, str]:
    """history.csv per family: one figure per family, rows = dataset, columns = ledger term and
    -ELBO, colour = model; test (solid, band over seeds) and train (dashed) in each panel."""
    written = {}
    colours = _palette(summary)
    for family, terms in TERMS.items():
        history = _read_runs(_family(summary, [family]), runs_dir, "history.csv")
        if history.empty:
            continue
        columns = [t for t in (*terms, "neg_elbo") if t in history and history[t].notna().any()]
        datasets = list(history["dataset"].unique())
        plt, fig, axes = _panels(len(datasets) * len(columns), len(columns), (4.4, 3.2))
        for i, dataset in enumerate(datasets):
            frame = history[history["dataset"] == dataset]
            for j, column in enumerate(columns):
                ax = axes[i * len(columns) + j]
                for model in _models(frame):
                    runs = frame[frame["model"] == model]
                    _line_band(ax, runs[runs["split"] == "test"], "epoch", column, colours[model], lw=1.4)
                    train = runs[runs["split"] == "train"].groupby("epoch")[column].mean()
                    ax.plot(train.index, train.to_numpy(), color=colours[model], ls="--", lw=0.8, alpha=0.8)
                # the first epochs dwarf the rest: frame the last 90% of training
                late = frame[frame["epoch"] >= max(2, 0.1 * frame["epoch"].max())][column].dropna()
                if len(late):
                    low, high = late.min(), late.max()
                    pad = 0.08 * (high - low) or 0.05 * abs(high) or 0.1
                    ax.set_ylim(low - pad, high + pad)
                ax.set_title(f"{dataset}: {column}" if column != "neg_elbo" else f"{dataset}: −ELBO", fontsize=10)
                ax.set_xlabel("epoch")
                ax.set_ylabel(NATS + (" (labels)" if family == "bbb" else ""))
        handles = [_handle(plt, colours[m], m, marker="") for m in _models(history)]
        handles += [_handle(plt, "0.3", "test (band: seed range)", marker=""),
                    _handle(plt, "0.3", "train (mean over seeds)", marker="", ls="--", lw=0.8)]
        path = Path(f"{stem}-{family}")
        _save(plt, fig, path, f"Training curves of the {family} family: ledger terms per epoch", handles, ncol=5)
        written[path] = (f"Every ledger term of the {family} models per epoch on held-out data (solid, band: seed "
                         "range) and training data (dashed), one row per dataset; the y-axis frames the last 90% "
                         "of training, so early epochs may run off the top. A widening gap between dashed and "
                         "solid lines is overfitting.")
    return written


# --- 6. sample grids ----------------------------------------------------------------------

def _frame(data: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis limits of a 2-D scatter: the held-out data's range with a 15% margin, square."""
    low, high = data.min(0), data.max(0)
    centre, half = (low + high) / 2, 0.575 * (high - low).max()
    return (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)


def sample_grids(summary: pd.DataFrame, runs_dir: Path, stem: Path) -> dict[Path, str]:
    """Per dataset, the held-out data and the samples of each generative model's first seed
    (samples.npz of its run), redrawn on common axes: one frame and grey scale for all."""
    from klbench.plots import SAMPLES_FILE, draw_samples, is_scatter, load_samples

    written = {}
    runs = _family(summary, GENERATIVE).sort_values("seed")
    colours = _palette(summary)
    for dataset in runs["dataset"].unique():
        first = runs[runs["dataset"] == dataset].drop_duplicates("model")
        stored = {row["model"]: load_samples(path) for _, row in first.iterrows()
                  if (path := _run_dir(runs_dir, row) / SAMPLES_FILE).exists()}
        if not stored:
            continue
        stored = {m: stored[m] for m in sorted(stored, key=_sort_key)}
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
        path = Path(f"{stem}-{dataset}")
        _save(plt, fig, path, f"{dataset}: held-out data and samples of each model (seed {seed})")
        if is_scatter(shape):
            detail = ("Every panel has the held-out data's frame, so shapes compare directly; a panel's title "
                      "says how many samples fall outside it.")
        elif len(shape) == 2:
            detail = ("VAE images are decoder means (pixel probabilities), diffusion images samples in data "
                      "units, all on one grey scale.")
        else:
            detail = "The first 16 samples of each model as curves, on the data's value range."
        written[path] = (f"Held-out data and samples of every generative model on {dataset} (seed {seed}); "
                         f"compare them with the −ELBO of each model. {detail}")
    return written


# --- everything ---------------------------------------------------------------------------

def figure_names(runs: list[tuple[str, str]]) -> list[str]:
    """The figures write_all makes for runs of these (dataset, family) pairs, known before
    any run exists, so that the workflow can declare them as outputs."""
    families = {family for _, family in runs}
    names = ["ledger_bars"]
    if "vae" in families:
        names += ["rate_distortion", "iwae_vs_k"]
    if "diffusion" in families:
        names.append("diffusion_curves")
    names += [f"training_curves-{family}" for family in sorted(families)]
    names += [f"sample_grids-{d}" for d in dict.fromkeys(d for d, family in runs if family in GENERATIVE)]
    return names


def write_all(summary: pd.DataFrame, runs_dir: Path, out_dir: Path) -> dict[str, str]:
    """Every figure that the runs allow into out_dir (PNG and PDF); returns file stem -> caption."""
    out_dir, runs_dir = Path(out_dir), Path(runs_dir)
    written = {
        **rate_distortion(summary, out_dir / "rate_distortion", runs_dir),
        **ledger_bars(summary, out_dir / "ledger_bars"),
        **iwae_vs_k(summary, out_dir / "iwae_vs_k"),
        **diffusion_curves(summary, runs_dir, out_dir / "diffusion_curves"),
        **training_curves(summary, runs_dir, out_dir / "training_curves"),
        **sample_grids(summary, runs_dir, out_dir / "sample_grids"),
    }
    return {path.name: caption for path, caption in written.items()}


def plot_results(summary_csv: Path, runs_dir: Path, out_dir: Path) -> dict[str, str]:
    """What `klbench plot` calls: summary.csv + runs folder -> figures and captions.json in out_dir."""
    captions = write_all(pd.read_csv(summary_csv), runs_dir, out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")
    return captions
