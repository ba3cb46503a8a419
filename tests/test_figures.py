"""Comparison figures (klbench.figures) on small hand-made run directories with known numbers.

The ledgers have the format run.py writes, with what each run is ranked by taken from the
registered families' declarations. Each drawing is checked on what it drew: the figures are
captured as they are saved and their bars, lines, points and images compared with values
computed here, straight from the run files, not through klbench.aggregate or figures."""

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from klbench import figures
from klbench.aggregate import summary_table
from klbench.models import get_family
from klbench.models.family import Figure
from klbench.plots import SAMPLES_FILE, load_samples, save_samples

SEEDS = (0, 1)
ENTROPY = {"ring": 1.5, "pix": None}  # ring: toy 2-D data with known H; pix: 8x8 images
DIM = {"ring": 2, "pix": 64}
TARGET = {"ring": None, "pix": "class"}  # pix has class labels: BBB classifies it


class Model(NamedTuple):
    family: str
    bases: dict[str, float]  # dataset -> base value of its terms
    variant_of: str = ""  # the `models` entry (the model's own name if empty)
    sweep: dict = {}
    params: dict = {}


MODELS = {
    "vae": Model("vae", {"ring": 1.0, "pix": 40.0}),
    "beta_vae-b0.5": Model("vae", {"ring": 1.4, "pix": 38.0}, "beta_vae", {"beta": 0.5}, {"beta": 0.5}),
    "beta_vae-b2": Model("vae", {"ring": 0.6, "pix": 45.0}, "beta_vae", {"beta": 2.0}, {"beta": 2.0}),
    # named like a sweep point (NAME-<tag><value>), but no sweep: its ledger records none
    "x-h32": Model("vae", {"ring": 1.2}, params={"hidden": [32, 32]}),
    "ddpm-linear": Model("diffusion", {"ring": 0.9, "pix": 35.0}),
    "vdm-learned": Model("diffusion", {"pix": 33.0}, params={"process": "vdm", "schedule": "learned"}),
    "bbb-gauss": Model("bbb", {"pix": 0.3}),
}
SWEEP = {"beta_vae-b0.5": 0.5, "vae": 1.0, "beta_vae-b2": 2.0}  # the beta sweep, with the VAE at beta 1


def terms_of(family: str, base: float, seed: int) -> dict[str, float]:
    wobble = 0.05 * base * (seed - 0.5)
    if family == "vae":  # distortion below zero on ring: a continuous density
        return {"rate": base + wobble, "distortion": (1.2 - base if base < 5 else 3 * base) - 0.5 * wobble}
    if family == "diffusion":
        return {"prior": 0.01, "diffusion": base + wobble, "reconstruction": 0.5 * base}
    return {"complexity": 0.05, "nll": base + wobble}


def ledger(dataset: str, model: str, seed: int, spec: Model | None = None) -> dict:
    """A ledger.json as run.py writes it (of a model in MODELS, or of `spec`)."""
    spec = spec or MODELS[model]
    family = get_family(spec.family)
    base = spec.bases[dataset]
    terms = terms_of(spec.family, base, seed)
    neg_elbo = sum(terms.values())
    derived, diagnostics = {"neg_elbo": neg_elbo}, {}
    if ENTROPY[dataset] is not None and family.density:
        derived.update(data_entropy=ENTROPY[dataset], kl_total=neg_elbo - ENTROPY[dataset],
                       data_entropy_true=ENTROPY[dataset])
    if dataset == "pix" and family.density:
        derived["bpd"] = neg_elbo / (DIM[dataset] * np.log(2))
    if spec.family == "vae":
        iwae = {"1": neg_elbo + 0.01, "64": neg_elbo - 0.1 * base, "1024": neg_elbo - 0.12 * base}
        derived.update(nll_bound=iwae["1024"], inference_gap=neg_elbo - iwae["1024"])
        diagnostics = {"iwae_nll": iwae, "mutual_info": 0.8 * terms["rate"], "active_units": 2,
                       "bounds": {"h_minus_d": 0.0, "i_le_r": True}}
    if spec.family == "bbb":
        diagnostics = {"test_log_lik": -terms["nll"] + 0.01, "accuracy": 0.9, "ece": 0.02}
    ranks = family.ranks_for(TARGET[dataset])
    run = {"key": f"{dataset}/{model}/seed{seed}", "dataset": dataset, "model": model, "family": spec.family,
           "variant_of": spec.variant_of or model, "sweep": spec.sweep, "seed": seed, "config_hash": "c",
           "data_hash": "d", "split": {}, "dim": DIM[dataset], "kind": "continuous", "units": "nats per example",
           "task": ranks[0].task, "ranks": [dataclasses.asdict(r) for r in ranks], "headline": list(family.headline),
           "git_commit": "0" * 40, "git_dirty": False, "device": "cpu"}
    return {"run": run, "terms": terms, "derived": derived, "diagnostics": diagnostics,
            "train": {"steps": 60, "epochs": 6.0, "best_step": 60, "converged": True, "parameters": 10, "final": {}}}


def config_of(dataset: str, model: str, seed: int) -> dict:
    """config.json as run.py writes it (the parts the figures read)."""
    spec = MODELS[model]
    params = {**dataclasses.asdict(get_family(spec.family).config()), **spec.params}
    return {"dataset": dataset, "dataset_options": {}, "model": model, "family": spec.family, "params": params,
            "seed": seed, "variant_of": spec.variant_of or model, "sweep": spec.sweep}


def history(record: dict, evaluations: int = 6) -> pd.DataFrame:
    rows = []
    for k in range(1, evaluations + 1):
        for split, offset in (("train", -0.02), ("val", 0.0)):
            terms = {name: v * (1 + 1.0 / k) + offset for name, v in record["terms"].items()}
            rows.append({"step": 10 * k, "split": split, "lr": 1e-3, **terms, "neg_elbo": sum(terms.values()),
                         "wall_time": 0.1 * k})
    return pd.DataFrame(rows)


def loss_curve(model: str, base: float) -> pd.DataFrame:
    grid = np.linspace(0, 1, 16)
    loss = base * np.exp(-3 * grid) / np.exp(-3 * grid).mean() / len(grid)
    if model.startswith("vdm"):
        return pd.DataFrame({"log_snr": np.linspace(10, -10, 16), "loss": loss})
    return pd.DataFrame({"t": np.arange(1, 17), "loss": loss})


def write_samples(dataset: str, run_dir: Path, seed: int) -> None:
    """samples.npz as the training jobs write it, different for each seed; one ring sample
    lies far outside the data."""
    rng = np.random.default_rng(seed)
    shape = (2,) if dataset == "ring" else (8, 8)
    samples = rng.random((64, int(np.prod(shape))))
    data = np.random.default_rng(99).random((64, int(np.prod(shape))))
    if dataset == "ring":
        samples[0] = [40.0, 40.0]
    save_samples(run_dir / SAMPLES_FILE, samples, data, shape)


def build_runs(root: Path) -> Path:
    runs = root / "runs"
    for model, spec in MODELS.items():
        for dataset, base in spec.bases.items():
            for seed in SEEDS:
                run_dir = runs / dataset / model / f"seed{seed}"
                run_dir.mkdir(parents=True)
                record = ledger(dataset, model, seed)
                (run_dir / "ledger.json").write_text(json.dumps(record))
                (run_dir / "config.json").write_text(json.dumps(config_of(dataset, model, seed)))
                history(record).to_csv(run_dir / "history.csv", index=False)
                if spec.family == "diffusion":
                    loss_curve(model, base * (1 + 0.1 * seed)).to_csv(run_dir / "loss_curve.csv", index=False)
                if get_family(spec.family).density:
                    write_samples(dataset, run_dir, seed)
    return runs


def check_figure(stem: Path) -> None:
    import matplotlib.pyplot as plt

    png, pdf = Path(f"{stem}.png"), Path(f"{stem}.pdf")
    assert png.stat().st_size > 5_000 and pdf.stat().st_size > 2_000
    assert pdf.read_bytes()[:5] == b"%PDF-"
    height, width = plt.imread(png).shape[:2]
    assert 300 <= width <= 4000 and 250 <= height <= 4000, (png.name, width, height)


# --- expected values, straight from the run files ------------------------------------------

def run_dirs(runs_dir: Path, dataset: str, model: str) -> list[Path]:
    return [runs_dir / dataset / model / f"seed{seed}" for seed in SEEDS]


def ledgers(runs_dir: Path, dataset: str, model: str) -> list[dict]:
    return [json.loads((d / "ledger.json").read_text()) for d in run_dirs(runs_dir, dataset, model)]


def mean_over_seeds(runs_dir: Path, dataset: str, model: str, value) -> float:
    return float(np.mean([value(record) for record in ledgers(runs_dir, dataset, model)]))


def models_on(dataset: str, *families_: str) -> list[str]:
    return [m for m, spec in MODELS.items() if dataset in spec.bases and spec.family in families_]


# --- reading back what was drawn --------------------------------------------------------------

def panels(fig, prefix: str = "") -> dict[str, object]:
    """The figure's titled axes by title (a dataset's panels start with its name)."""
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title() and ax.get_title().startswith(prefix)}


def legend_colours(fig) -> dict[tuple, str]:
    """RGBA colour -> label of the figure legend's handles (models, ledger terms)."""
    colours = {}
    for handle, text in zip(fig.legends[0].legend_handles, fig.legends[0].get_texts()):
        colour = handle.get_facecolor() if hasattr(handle, "get_height") else handle.get_color()
        colours[tuple(np.round(to_rgba(colour), 6))] = text.get_text()
    return colours


def colour_key(colour) -> tuple:
    return tuple(np.round(to_rgba(colour), 6))


def lines_by_model(ax, fig, **style) -> dict[str, list]:
    """The lines of a panel drawn in a model's colour (with the given linestyle, if any)."""
    colours = legend_colours(fig)
    found: dict[str, list] = {}
    for line in ax.get_lines():
        model = colours.get(colour_key(line.get_color()))
        if model in MODELS and all(getattr(line, f"get_{k}")() == v for k, v in style.items()):
            found.setdefault(model, []).append(line)
    return found


def ordered(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with its model order, families in order of appearance (as write_all does
    with the plan's families)."""
    return figures.with_model_order(summary, list(dict.fromkeys(summary["family"])))


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """The runs folder and its summary table as the workflow reads it back (summary.csv)."""
    root = tmp_path_factory.mktemp("figures")
    runs = build_runs(root)
    summary_table(sorted(runs.glob("*/*/*/ledger.json"))).to_csv(root / "summary.csv", index=False)
    return runs, pd.read_csv(root / "summary.csv")


def plan_of(summary: pd.DataFrame) -> list[figures.PlannedFigure]:
    """The plan as `klbench plot` makes it: from the summary's (dataset, family) pairs."""
    pairs = summary[["dataset", "family"]].drop_duplicates()
    return figures.plan_figures([(d, get_family(f)) for d, f in pairs.itertuples(index=False)])


def capturing(drawn: dict):
    """figures._save that also keeps each Figure in `drawn` by its file stem's name."""
    save = figures._save

    def capture(plt, fig, stem, *args, **kwargs):
        drawn[Path(stem).name] = fig
        return save(plt, fig, stem, *args, **kwargs)

    return capture


@pytest.fixture
def saved(monkeypatch) -> list[str]:
    """Figures are laid out but not rendered to disk (fast); the list collects the file names
    each Figure.savefig call was given."""
    from matplotlib.figure import Figure as MplFigure

    names: list[str] = []
    monkeypatch.setattr(MplFigure, "savefig", lambda self, fname, *args, **kwargs: names.append(Path(fname).name))
    return names


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory):
    """Every planned figure through plot_results, with each matplotlib Figure captured as it
    is saved: (output folder, captions, {file stem: Figure})."""
    runs_dir, summary = runs
    out = tmp_path_factory.mktemp("out")
    summary.to_csv(out / "summary.csv", index=False)
    drawn = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "_save", capturing(drawn))
        captions = figures.plot_results(out / "summary.csv", runs_dir, out / "figures", plan_of(summary))
    return out, captions, drawn


# --- the plan -------------------------------------------------------------------------------

ALL_PAIRS = [("ring", "vae"), ("pix", "vae"), ("ring", "diffusion"), ("pix", "diffusion"), ("pix", "bbb")]


def test_plan_names_every_figure_with_its_report_category():
    plan = figures.plan_figures([(d, get_family(f)) for d, f in ALL_PAIRS])
    assert [f.name for f in plan] == [
        "ledger_bars", "rate_distortion", "iwae_vs_k", "diffusion_curves",
        "training_curves-vae", "training_curves-diffusion", "training_curves-bbb",
        "sample_grids-ring", "sample_grids-pix"]
    by_name = {f.name: f for f in plan}
    rows = {name: (f.kind, f.families, f.dataset, f.category, f.subcategory) for name, f in by_name.items()}
    assert rows == {
        "ledger_bars": ("ledger_bars", ("vae", "diffusion", "bbb"), None, "all families", "comparison"),
        "rate_distortion": ("plane", ("vae",), None, "vae", "comparison"),
        "iwae_vs_k": ("bound_vs_k", ("vae",), None, "vae", "comparison"),
        "diffusion_curves": ("curves", ("diffusion",), None, "diffusion", "comparison"),
        "training_curves-vae": ("training_curves", ("vae",), None, "vae", "comparison"),
        "training_curves-diffusion": ("training_curves", ("diffusion",), None, "diffusion", "comparison"),
        "training_curves-bbb": ("training_curves", ("bbb",), None, "bbb", "comparison"),
        "sample_grids-ring": ("sample_grids", ("vae", "diffusion"), "ring", "samples", "ring"),
        "sample_grids-pix": ("sample_grids", ("vae", "diffusion"), "pix", "samples", "pix"),
    }
    # a declared figure carries the options its family declared
    declared = {f.name: f for f in get_family("vae").figures}
    assert by_name["rate_distortion"].options == dict(declared["rate_distortion"].options)
    assert by_name["iwae_vs_k"].options == {"column": "iwae_nll"}


def test_plan_has_sample_grids_only_for_datasets_with_a_density_model():
    plan = figures.plan_figures([("pix", get_family("bbb")), ("ring", get_family("vae"))])
    assert [f.name for f in plan] == ["ledger_bars", "rate_distortion", "iwae_vs_k", "training_curves-bbb",
                                      "training_curves-vae", "sample_grids-ring"]
    assert [f.name for f in figures.plan_figures([("pix", get_family("bbb"))])] == [
        "ledger_bars", "training_curves-bbb"]


def test_a_figure_declared_by_two_families_is_one_figure_of_both():
    vae = get_family("vae")
    rate_distortion = next(f for f in vae.figures if f.name == "rate_distortion")
    other = dataclasses.replace(get_family("bbb"), name="bottleneck", figures=(rate_distortion,))
    plan = figures.plan_figures([("pix", vae), ("pix", other), ("ring", vae)])
    shared = [f for f in plan if f.name == "rate_distortion"]
    assert len(shared) == 1
    assert shared[0].families == ("vae", "bottleneck") and shared[0].category == "vae and bottleneck"
    assert shared[0].kind == "plane" and shared[0].options == dict(rate_distortion.options)
    assert [f.name for f in plan].count("ledger_bars") == 1
    # the shared figure shows the runs of both families, and only theirs
    summary = pd.DataFrame({"dataset": ["pix", "pix", "pix", "ring"], "family": ["vae", "bottleneck", "bbb", "vae"],
                            "model": ["a", "b", "c", "d"]})
    assert list(shared[0].runs(summary)["model"]) == ["a", "b", "d"]
    grid = next(f for f in plan if f.name == "sample_grids-pix")
    assert list(grid.runs(summary)["model"]) == ["a"]  # a sample grid shows its own dataset only


def test_plan_refuses_a_figure_kind_it_cannot_draw():
    odd = dataclasses.replace(get_family("vae"), name="odd", figures=(Figure("spiral", "no-such-kind"),))
    with pytest.raises(ValueError, match="no-such-kind"):
        figures.plan_figures([("ring", odd)])


# --- the fixture is what the code reads --------------------------------------------------------

def test_fixture_runs_have_every_metric_they_are_ranked_by(runs):
    """Each run's declared rank metrics are columns of the summary with values (a fixture key
    the code does not read, like test_loglik for test_log_lik, would fail here)."""
    _, summary = runs
    for _, row in summary.iterrows():
        for rank in json.loads(row["ranks"]):
            assert rank["metric"] in summary and pd.notna(row[rank["metric"]]), (row["model"], rank)
    bbb = summary[summary["family"] == "bbb"]
    assert set(bbb["task"]) == {"classification"}
    assert list(bbb["test_log_lik"]) == pytest.approx([-(0.3 + w) + 0.01 for w in (-0.0075, 0.0075)])


# --- every figure is written --------------------------------------------------------------------

def test_every_planned_figure_is_written_as_png_and_pdf(runs, written):
    _, summary = runs
    out, captions, drawn = written
    names = [f.name for f in plan_of(summary)]
    assert sorted(captions) == sorted(names) == sorted(drawn)
    for name, caption in captions.items():
        check_figure(out / "figures" / name)
        assert len(caption) > 40 and caption.endswith(".")
    assert json.loads((out / "figures" / "captions.json").read_text()) == captions
    # only the planned figures, each as PNG and PDF
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        [f"{n}.{ext}" for n in names for ext in ("png", "pdf")] + ["captions.json"])


# --- what each figure draws -----------------------------------------------------------------------

def test_ledger_bars_stack_each_terms_mean_over_seeds(runs, written):
    runs_dir, _ = runs
    fig = written[2]["ledger_bars"]
    expected_panels = {"pix: density of x": models_on("pix", "vae", "diffusion"),
                       "pix: labels y": models_on("pix", "bbb"),
                       "ring: density of x": models_on("ring", "vae", "diffusion")}
    found = panels(fig)
    assert {title.split("  ")[0] for title in found} == set(expected_panels)
    terms = legend_colours(fig)
    for title, ax in found.items():
        dataset = title.split(":")[0]
        models = [t.get_text() for t in ax.get_xticklabels()]
        assert sorted(models) == sorted(expected_panels[title.split("  ")[0]])
        heights: dict[str, list[float]] = {}
        for patch in sorted(ax.patches, key=lambda p: p.get_x()):
            heights.setdefault(terms[colour_key(patch.get_facecolor())], []).append(patch.get_height())
        families_here = {MODELS[m].family for m in models}
        assert set(heights) == {t for f in families_here for t in get_family(f).terms}
        for term, drawn in heights.items():
            expected = [mean_over_seeds(runs_dir, dataset, m, lambda r: r["terms"].get(term, 0.0)) for m in models]
            assert drawn == pytest.approx(expected), (title, term)
        # the black mark is the mean -ELBO (the sum of the terms), with the seeds' range
        (bars,) = ax.containers[-1:]
        totals = bars.lines[0].get_ydata()
        assert list(totals) == pytest.approx(
            [mean_over_seeds(runs_dir, dataset, m, lambda r: sum(r["terms"].values())) for m in models])
    assert "H = 1.500" in next(t for t in found if t.startswith("ring"))  # the ring's entropy is drawn


def test_training_curves_are_the_per_step_mean_of_history_over_seeds(runs, written):
    runs_dir, _ = runs
    drawn = written[2]
    for family in ("vae", "diffusion", "bbb"):
        fig = drawn[f"training_curves-{family}"]
        columns = [*get_family(family).terms, "neg_elbo"]
        datasets = [d for d in ("pix", "ring") if models_on(d, family)]
        found = panels(fig)
        assert set(found) == {f"{d}: {c}" if c != "neg_elbo" else f"{d}: −ELBO" for d in datasets for c in columns}
        for dataset in datasets:
            runs_of = {m: pd.concat([pd.read_csv(d / "history.csv") for d in run_dirs(runs_dir, dataset, m)])
                       for m in models_on(dataset, family)}
            for column in columns:
                ax = found[f"{dataset}: {column}" if column != "neg_elbo" else f"{dataset}: −ELBO"]
                test_lines = lines_by_model(ax, fig, linestyle="-")
                train_lines = lines_by_model(ax, fig, linestyle="--")
                assert set(test_lines) == set(train_lines) == set(runs_of)
                for model, history_ in runs_of.items():
                    for lines, split in ((test_lines, "val"), (train_lines, "train")):
                        expected = history_[history_["split"] == split].groupby("step")[column].mean()
                        (line,) = lines[model]
                        assert list(line.get_xdata()) == list(expected.index)
                        assert list(line.get_ydata()) == pytest.approx(list(expected)), (family, dataset, column)
                if family == "bbb":
                    assert "labels" in ax.get_ylabel()


def test_a_constant_term_is_framed_around_its_value_not_its_rounding(runs, tmp_path, monkeypatch):
    """DDPM's prior KL has no parameters: between batches it changes only by float rounding, and a
    frame that tight draws the rounding (an axis of 1e-13) rather than the value."""
    import shutil

    runs_dir, summary = runs
    copy = tmp_path / "runs"
    shutil.copytree(runs_dir, copy)
    for path in copy.glob("*/ddpm*/seed*/history.csv"):
        history = pd.read_csv(path)
        history["prior"] = 9.52e-7 + 1e-19 * np.arange(len(history))  # rounding-sized changes
        history.to_csv(path, index=False)
    summary = ordered(summary[summary["family"] == "diffusion"])
    drawn = {}
    monkeypatch.setattr(figures, "_save", capturing(drawn))
    figures.training_curves(summary, tmp_path / "t", copy, {}, figures._palette(summary))
    fig = drawn["t"]
    found = {title: ax for title, ax in panels(fig).items() if title.endswith(": prior")}
    assert found
    for title, ax in found.items():
        values = np.concatenate([line.get_ydata() for line in ax.lines])
        low, high = ax.get_ylim()
        assert low <= values.min() and values.max() <= high, title
        assert high - low >= 0.01 * np.abs(values).max(), title


def test_training_curves_band_is_the_seed_range(runs, written):
    runs_dir, _ = runs
    fig = written[2]["training_curves-vae"]
    ax = panels(fig)["ring: rate"]
    histories = [pd.read_csv(d / "history.csv") for d in run_dirs(runs_dir, "ring", "beta_vae-b0.5")]
    test = pd.concat(h[h["split"] == "val"] for h in histories)
    colour = next(c for c, label in legend_colours(fig).items() if label == "beta_vae-b0.5")
    (band,) = [c for c in ax.collections if colour_key(c.get_facecolor()[0])[:3] == colour[:3]]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(test["rate"].min()) and ys.max() == pytest.approx(test["rate"].max())


def test_bound_vs_k_draws_each_models_mean_bound_and_its_gain(runs, written):
    runs_dir, _ = runs
    fig = written[2]["iwae_vs_k"]
    ks = [1, 64, 1024]
    assert set(legend_colours(fig).values()) == {*models_on("ring", "vae"), "data entropy H"}
    for dataset in ("pix", "ring"):
        (top,) = panels(fig, dataset).values()
        (bottom,) = [ax for ax in fig.axes if not ax.get_title() and ax.get_ylabel().startswith("−L_k −")
                     and ax.get_position().x0 == pytest.approx(top.get_position().x0)]
        for ax, value in ((top, lambda r, k: r["diagnostics"]["iwae_nll"][str(k)]),
                          (bottom, lambda r, k: r["diagnostics"]["iwae_nll"][str(k)]
                           - r["diagnostics"]["iwae_nll"]["1"])):
            lines = lines_by_model(ax, fig)
            assert set(lines) == set(models_on(dataset, "vae"))
            for model, (line,) in lines.items():
                assert list(line.get_xdata()) == ks
                expected = [mean_over_seeds(runs_dir, dataset, model, lambda r: value(r, k)) for k in ks]
                assert list(line.get_ydata()) == pytest.approx(expected), (dataset, model)
        entropy = [line for line in top.get_lines() if line.get_linestyle() == "--"]
        assert [line.get_ydata()[0] for line in entropy] == ([1.5] if dataset == "ring" else [])


def sweep_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_color() == "0.4"]


def test_rate_distortion_plane_draws_means_and_joins_the_sweep_in_beta_order(runs, written):
    runs_dir, _ = runs
    fig = written[2]["rate_distortion"]
    found = panels(fig)
    assert set(found) == {"pix", "ring  (H = 1.500 nats)"}
    for title, ax in found.items():
        dataset = title.split()[0]
        mean = {m: (mean_over_seeds(runs_dir, dataset, m, lambda r: r["terms"]["rate"]),
                    mean_over_seeds(runs_dir, dataset, m, lambda r: r["terms"]["distortion"]))
                for m in models_on(dataset, "vae")}
        # large dots: each model's mean over seeds (x-h32 too: it is a model, not a sweep point)
        large = [tuple(xy) for c in ax.collections if len(c.get_sizes()) and c.get_sizes()[0] == 70
                 for xy in c.get_offsets()]
        assert np.array(sorted(large)) == pytest.approx(np.array(sorted(mean.values())))
        # the sweep: beta 0.5, 1 (the VAE, by its config) and 2, in that order; not x-h32
        (line,) = sweep_lines(ax)
        order = sorted(SWEEP, key=SWEEP.get)
        assert list(line.get_xdata()) == pytest.approx([mean[m][0] for m in order])
        assert list(line.get_ydata()) == pytest.approx([mean[m][1] for m in order])
        labels = sorted(t.get_text() for t in ax.texts)
        assert labels == ["β=0.5", "β=1", "β=2"]
        # the mutual information crosses: 0.8 R at the model's distortion
        crosses = [tuple(xy) for c in ax.collections if len(c.get_sizes()) and c.get_sizes()[0] == 40
                   for xy in c.get_offsets()]
        assert np.array(sorted(crosses)) == pytest.approx(np.array(sorted((0.8 * r, d) for r, d in mean.values())))


def hand_made_summary(tmp_path: Path, runs: dict[str, dict]) -> pd.DataFrame:
    """A summary of one-seed VAE runs on ring: model -> {rate, distortion, sweep, variant_of}."""
    paths = []
    for model, spec in runs.items():
        made = Model("vae", {"ring": 1.0}, spec.get("variant_of", ""), spec.get("sweep", {}))
        record = ledger("ring", model, 0, made)
        record["terms"] = {"rate": spec["rate"], "distortion": spec["distortion"]}
        path = tmp_path / model / "ledger.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
        paths.append(path)
    return ordered(summary_table(paths))


def test_plane_sweep_follows_the_recorded_sweep_values_not_the_model_names(tmp_path, saved):
    # names in alphabetical order a, b, c; the ledgers' beta values put them in order b, a, c;
    # x-h32 and y-b3 look like sweep points by name but record no sweep
    summary = hand_made_summary(tmp_path, {
        "a": {"rate": 1.0, "distortion": 5.0, "variant_of": "s", "sweep": {"beta": 1.0}},
        "b": {"rate": 3.0, "distortion": 2.0, "variant_of": "s", "sweep": {"beta": 0.5}},
        "c": {"rate": 0.2, "distortion": 9.0, "variant_of": "s", "sweep": {"beta": 2.0}},
        "x-h32": {"rate": 2.0, "distortion": 2.5},
        "y-b3": {"rate": 0.5, "distortion": 0.5},
    })
    options = {"x": "rate", "y": "distortion", "sweep": "beta"}
    palette = figures._palette(summary)
    captured = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "_save", capturing(captured))
        captions = figures.plane(summary, tmp_path / "plane", None, options, palette)
    assert "sweep" in captions[tmp_path / "plane"]
    (ax,) = panels(captured["plane"]).values()
    (line,) = sweep_lines(ax)
    assert list(line.get_xdata()) == [3.0, 1.0, 0.2] and list(line.get_ydata()) == [2.0, 5.0, 9.0]
    assert sorted(t.get_text() for t in ax.texts) == ["β=0.5", "β=1", "β=2"]


def test_plane_without_a_sweep_draws_no_sweep_line(tmp_path, saved):
    summary = hand_made_summary(tmp_path, {"x-h32": {"rate": 2.0, "distortion": 2.5},
                                           "x-h64": {"rate": 1.0, "distortion": 3.5}})
    captured = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "_save", capturing(captured))
        captions = figures.plane(summary, tmp_path / "plane", None,
                                 {"x": "rate", "y": "distortion", "sweep": "beta"}, figures._palette(summary))
    (ax,) = panels(captured["plane"]).values()
    assert sweep_lines(ax) == [] and len(ax.texts) == 0
    # neither the legend nor the caption speaks of a sweep that is not drawn
    assert set(legend_colours(captured["plane"]).values()) == {"x-h32", "x-h64"}
    assert "sweep" not in captions[tmp_path / "plane"]


def test_beta_sweep_includes_the_model_at_beta_one_by_its_config(runs):
    runs_dir, summary = runs
    vae = ordered(summary)
    vae = vae[(vae["family"] == "vae") & (vae["dataset"] == "ring")]
    assert figures._sweeps(vae, runs_dir, "beta") == [SWEEP]  # not x-h32: its hidden sizes differ
    # without config.json files only the variants whose ledgers record a beta sweep are known
    assert figures._sweeps(vae, None, "beta") == [{"beta_vae-b0.5": 0.5, "beta_vae-b2": 2.0}]
    assert figures._sweeps(vae, runs_dir, "k") == []


def test_two_sweeps_of_one_parameter_are_two_lines(tmp_path, saved):
    summary = hand_made_summary(tmp_path, {
        "s-b0.5": {"rate": 3.0, "distortion": 1.0, "variant_of": "s", "sweep": {"beta": 0.5}},
        "s-b2": {"rate": 1.0, "distortion": 3.0, "variant_of": "s", "sweep": {"beta": 2.0}},
        "t-b0.5": {"rate": 6.0, "distortion": 4.0, "variant_of": "t", "sweep": {"beta": 0.5}},
        "t-b2": {"rate": 4.0, "distortion": 6.0, "variant_of": "t", "sweep": {"beta": 2.0}},
    })
    assert figures._sweeps(summary, None, "beta") == [{"s-b0.5": 0.5, "s-b2": 2.0}, {"t-b0.5": 0.5, "t-b2": 2.0}]
    captured = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "_save", capturing(captured))
        figures.plane(summary, tmp_path / "plane", None, {"x": "rate", "y": "distortion", "sweep": "beta"},
                      figures._palette(summary))
    (ax,) = [a for a in captured["plane"].axes if a.get_title()]
    lines = sorted(tuple(map(tuple, line.get_xydata())) for line in sweep_lines(ax))
    assert lines == [((3.0, 1.0), (1.0, 3.0)), ((6.0, 4.0), (4.0, 6.0))]


def test_plane_labels_each_mean_with_the_annotated_metric(tmp_path, saved):
    summary = hand_made_summary(tmp_path, {"a": {"rate": 1.0, "distortion": 2.0}, "b": {"rate": 2.0, "distortion": 1.0}})
    summary["accuracy"] = summary["model"].map({"a": 0.9, "b": 0.75})
    captured = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "_save", capturing(captured))
        captions = figures.plane(summary, tmp_path / "plane", None,
                                 {"x": "rate", "y": "distortion", "annotate": "accuracy"}, figures._palette(summary))
    (ax,) = [a for a in captured["plane"].axes if a.get_title()]
    assert sorted(text.get_text() for text in ax.texts) == ["accuracy 0.750", "accuracy 0.900"]
    assert "labelled with its accuracy" in captions[tmp_path / "plane"]


def test_a_single_k_still_draws_the_bound_figure(tmp_path, saved):
    summary = hand_made_summary(tmp_path, {"a": {"rate": 1.0, "distortion": 2.0}})
    summary = summary.drop(columns=[c for c in summary if c.startswith("iwae_nll.")]).assign(**{"iwae_nll.4": 2.5})
    captions = figures.bound_vs_k(summary, tmp_path / "iwae", None, {"column": "iwae_nll"}, figures._palette(summary))
    assert list(captions) == [tmp_path / "iwae"]


def test_a_figure_declared_differently_by_two_families_is_refused():
    from dataclasses import replace

    vae = get_family("vae")
    other = replace(vae, name="other", figures=(replace(vae.figures[0], options={"x": "rate", "y": "rate"}),))
    with pytest.raises(ValueError, match="declare figure rate_distortion differently"):
        figures.plan_figures([("ring", vae), ("ring", other)])


def test_diffusion_curves_are_the_mean_loss_over_seeds_on_each_grid(runs, written):
    runs_dir, _ = runs
    fig = written[2]["diffusion_curves"]
    found = [ax for ax in fig.axes if ax.get_title()]
    grids = {(ax.get_title().split(":")[0], "t" if ax.get_xlabel() == "timestep t" else "log_snr"): ax for ax in found}
    assert set(grids) == {("pix", "t"), ("pix", "log_snr"), ("ring", "t")}  # DDPM and VDM never share an axis
    for (dataset, grid), ax in grids.items():
        lines = lines_by_model(ax, fig)
        expected_models = [m for m in models_on(dataset, "diffusion") if m.startswith("vdm") == (grid == "log_snr")]
        assert set(lines) == set(expected_models)
        for model, (line,) in lines.items():
            curves = pd.concat([pd.read_csv(d / "loss_curve.csv") for d in run_dirs(runs_dir, dataset, model)])
            expected = curves.groupby(grid)["loss"].mean()
            assert list(line.get_xdata()) == pytest.approx(list(expected.index))
            assert list(line.get_ydata()) == pytest.approx(list(expected)), (dataset, model)


def test_sample_grids_redraw_the_first_seeds_samples_of_every_density_model(runs, written):
    runs_dir, _ = runs
    drawn = written[2]
    ring = drawn["sample_grids-ring"]
    found = panels(ring)
    models = models_on("ring", "vae", "diffusion")
    assert {title.split("\n")[0] for title in found} == {"held-out data", *models}
    for title, ax in found.items():
        name = title.split("\n")[0]
        (points,) = [c.get_offsets() for c in ax.collections]
        _, data, _ = load_samples(run_dirs(runs_dir, "ring", models[0])[0] / SAMPLES_FILE)
        if name == "held-out data":
            assert np.asarray(points) == pytest.approx(data)
            continue
        first, second = (load_samples(d / SAMPLES_FILE)[0] for d in run_dirs(runs_dir, "ring", name))
        assert np.asarray(points) == pytest.approx(first) and not np.allclose(points, second)
        assert "(2% of samples outside the frame)" in title  # the one sample at (40, 40) of 64
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        assert x1 - x0 == pytest.approx(y1 - y0) and x0 <= data[:, 0].min() and x1 >= data[:, 0].max()
    pix = panels(drawn["sample_grids-pix"])
    assert set(pix) == {"held-out data", *models_on("pix", "vae", "diffusion")}  # no classifier
    for name, ax in pix.items():
        if name == "held-out data":
            continue
        first = load_samples(run_dirs(runs_dir, "pix", name)[0] / SAMPLES_FILE)[0]
        (image,) = ax.images
        grid = np.asarray(image.get_array())
        # the grid tiles 8x8 images with one-pixel gutters: image i at row i // 8, column i % 8
        for i in (0, 9, 63):
            r, c = divmod(i, 8)
            assert grid[9 * r: 9 * r + 8, 9 * c: 9 * c + 8] == pytest.approx(first[i].reshape(8, 8))


# --- captions, absent families and missing files ------------------------------------------------

def test_captions_mention_entropy_only_where_known(runs, tmp_path, saved):
    _, summary = runs
    summary = ordered(summary)
    palette = figures._palette(summary)
    vae = summary[summary["family"] == "vae"]
    options = dict(next(f for f in get_family("vae").figures if f.name == "rate_distortion").options)
    pix = figures.plane(vae[vae["dataset"] == "pix"], tmp_path / "rd", None, options, palette)
    assert "R + D = H" not in pix[tmp_path / "rd"]
    assert "R + D = H" in figures.plane(vae, tmp_path / "rd", None, options, palette)[tmp_path / "rd"]


@pytest.mark.parametrize("family, dataset, absent", [
    ("vae", "ring", {"diffusion_curves", "training_curves-diffusion", "training_curves-bbb"}),
    ("bbb", "pix", {"rate_distortion", "iwae_vs_k", "diffusion_curves", "training_curves-vae",
                    "training_curves-diffusion", "sample_grids-pix"}),
    ("diffusion", "ring", {"rate_distortion", "iwae_vs_k", "training_curves-vae", "training_curves-bbb"}),
])
def test_absent_family_gives_no_figure_and_no_error(runs, tmp_path, saved, family, dataset, absent):
    runs_dir, summary = runs
    runs_of = summary[(summary["family"] == family) & (summary["dataset"] == dataset)]
    plan = figures.plan_figures([(dataset, get_family(family))])
    assert not absent & {f.name for f in plan}
    captions = figures.write_all(runs_of, runs_dir, tmp_path, plan)
    assert set(captions) == {f.name for f in plan}  # what the workflow declares is what is written
    assert sorted(saved) == sorted(f"{f.name}.{ext}" for f in plan for ext in ("png", "pdf"))


def test_missing_run_files_are_skipped(runs, tmp_path, saved):
    """Runs without loss_curve.csv / history.csv / samples.npz give no curve, not an error."""
    _, summary = runs
    summary = ordered(summary)
    palette = figures._palette(summary)
    empty = tmp_path / "no-runs"
    options = dict(get_family("diffusion").figures[0].options)
    assert figures.curves(summary, tmp_path / "d", empty, options, palette) == {}
    assert figures.training_curves(summary, tmp_path / "t", empty, {}, palette) == {}
    assert figures.sample_grids(summary, tmp_path / "s", empty, {}, palette) == {}
    assert saved == []


# --- helpers ------------------------------------------------------------------------------------

def test_models_are_ordered_by_family_then_entry_then_swept_value():
    rows = [("vae", "vae", None), ("vae", "beta_vae-b10", 10.0), ("vae", "beta_vae-b2", 2.0),
            ("vae", "beta_vae-b0.25", 0.25), ("vae", "x-h32", None), ("diffusion", "ddpm", None),
            ("vae", "iwae-k5", None)]
    summary = pd.DataFrame(rows, columns=["family", "model", "sweep_value"]).assign(
        variant_of=lambda s: s["model"].str.replace(r"-b[\d.]+$", "", regex=True))

    def order(families):
        return figures.with_model_order(summary, families).sort_values("order")["model"].tolist()

    # numeric order of the swept value (0.25 < 2 < 10), not the names' (b0.25 < b10 < b2)
    assert order(["vae", "diffusion"]) == [
        "beta_vae-b0.25", "beta_vae-b2", "beta_vae-b10", "iwae-k5", "vae", "x-h32", "ddpm"]
    # families in the order given (the plan's), any other after them in order of appearance
    assert order(["diffusion"]) == [
        "ddpm", "beta_vae-b0.25", "beta_vae-b2", "beta_vae-b10", "iwae-k5", "vae", "x-h32"]


def test_merge_close_joins_labels_of_coinciding_points():
    points = pd.DataFrame({"rate": [0.0, 0.001, 3.0], "distortion": [5.0, 5.0, 1.0]})
    assert [labels for _, labels in figures._merge_close(points, [4, 2, 0.5])] == [[4, 2], [0.5]]


def test_sample_frames_hold_the_data_and_are_square():
    data = np.random.default_rng(1).normal(size=(500, 2)) * [3.0, 0.5] + [10.0, -2.0]
    (x0, x1), (y0, y1) = figures._frame(data)
    assert x1 - x0 == pytest.approx(y1 - y0)
    assert (data[:, 0] > x0).all() and (data[:, 0] < x1).all() and (data[:, 1] > y0).all() and (data[:, 1] < y1).all()
