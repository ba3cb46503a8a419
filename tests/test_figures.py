"""Comparison figures (klbench.figures) on small hand-made run directories with known numbers:
every applicable figure is written as PNG and PDF, and an absent family gives no figure."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from klbench import figures
from klbench.aggregate import summary_table
from klbench.plots import SAMPLES_FILE, save_samples

SEEDS = (0, 1)
ENTROPY = {"ring": 1.5, "pix": None}  # ring: toy 2-D data with known H; pix: 8x8 images
DIM = {"ring": 2, "pix": 64}
MODELS = {  # model -> (family, {dataset: base value of its terms})
    "vae": ("vae", {"ring": 1.0, "pix": 40.0}),
    "beta_vae-b0.5": ("vae", {"ring": 1.4, "pix": 38.0}),
    "beta_vae-b2": ("vae", {"ring": 0.6, "pix": 45.0}),
    "ddpm-linear": ("diffusion", {"ring": 0.9, "pix": 35.0}),
    "vdm-learned": ("diffusion", {"pix": 33.0}),
    "bbb-gauss": ("bbb", {"pix": 0.3}),
}


def terms_of(family: str, base: float, seed: int) -> dict[str, float]:
    wobble = 0.05 * base * (seed - 0.5)
    if family == "vae":  # distortion below zero on ring: a continuous density
        return {"rate": base + wobble, "distortion": 1.2 - base if base < 5 else 3 * base}
    if family == "diffusion":
        return {"prior": 0.01, "diffusion": base + wobble, "reconstruction": 0.5 * base}
    return {"complexity": 0.05, "nll": base + wobble}


def ledger(dataset: str, model: str, family: str, seed: int, base: float) -> dict:
    terms = terms_of(family, base, seed)
    neg_elbo = sum(terms.values())
    derived, diagnostics = {"neg_elbo": neg_elbo}, {}
    if ENTROPY[dataset] is not None and family != "bbb":
        derived.update(data_entropy=ENTROPY[dataset], kl_total=neg_elbo - ENTROPY[dataset],
                       data_entropy_true=ENTROPY[dataset])
    if dataset == "pix" and family != "bbb":
        derived["bpd"] = neg_elbo / (DIM[dataset] * np.log(2))
    if family == "vae":
        iwae = {"1": neg_elbo + 0.01, "64": neg_elbo - 0.1 * base, "1024": neg_elbo - 0.12 * base}
        derived.update(nll_bound=iwae["1024"], inference_gap=neg_elbo - iwae["1024"])
        diagnostics = {"iwae_nll": iwae, "mutual_info": 0.8 * terms["rate"], "active_units": 2,
                       "bounds": {"h_minus_d": 0.0, "i_le_r": True}}
    if family == "bbb":
        diagnostics = {"test_loglik": -terms["nll"], "accuracy": 0.9, "ece": 0.02}
    run = {"dataset": dataset, "model": model, "family": family, "seed": seed, "config_hash": "c",
           "data_hash": "d", "git_commit": "0" * 40, "git_dirty": False}
    return {"run": run, "terms": terms, "derived": derived, "diagnostics": diagnostics}


def history(record: dict, epochs: int = 6) -> pd.DataFrame:
    rows = []
    for epoch in range(1, epochs + 1):
        for split, offset in (("train", -0.02), ("test", 0.0)):
            terms = {k: v * (1 + 1.0 / epoch) + offset for k, v in record["terms"].items()}
            rows.append({"epoch": epoch, "split": split, **terms, "neg_elbo": sum(terms.values()),
                         "wall_time": 0.1 * epoch})
    return pd.DataFrame(rows)


def loss_curve(model: str, base: float) -> pd.DataFrame:
    grid = np.linspace(0, 1, 16)
    loss = base * np.exp(-3 * grid) / np.exp(-3 * grid).mean() / len(grid)
    if model.startswith("vdm"):
        return pd.DataFrame({"log_snr": np.linspace(10, -10, 16), "loss": loss})
    return pd.DataFrame({"t": np.arange(1, 17), "loss": loss})


def write_samples(dataset: str, run_dir: Path) -> None:
    """samples.npz as the training jobs write it; one ring sample lies far outside the data."""
    rng = np.random.default_rng(0)
    shape = (2,) if dataset == "ring" else (8, 8)
    samples, data = rng.random((64, int(np.prod(shape)))), rng.random((64, int(np.prod(shape))))
    if dataset == "ring":
        samples[0] = [40.0, 40.0]
    save_samples(run_dir / SAMPLES_FILE, samples, data, shape)


def build_runs(root: Path) -> Path:
    runs = root / "runs"
    for model, (family, bases) in MODELS.items():
        for dataset, base in bases.items():
            for seed in SEEDS:
                run_dir = runs / dataset / model / f"seed{seed}"
                run_dir.mkdir(parents=True)
                record = ledger(dataset, model, family, seed, base)
                (run_dir / "ledger.json").write_text(json.dumps(record))
                params = {"hidden": [8], "beta": 0.5 if "b0.5" in model else 2.0 if "b2" in model else 1.0}
                (run_dir / "config.json").write_text(json.dumps({"model": model, "params": params}))
                history(record).to_csv(run_dir / "history.csv", index=False)
                if family == "diffusion":
                    loss_curve(model, base * (1 + 0.1 * seed)).to_csv(run_dir / "loss_curve.csv", index=False)
                if seed == 0 and family in figures.GENERATIVE:
                    write_samples(dataset, run_dir)
    return runs


def check_figure(stem: Path) -> None:
    import matplotlib.pyplot as plt

    png, pdf = Path(f"{stem}.png"), Path(f"{stem}.pdf")
    assert png.stat().st_size > 5_000 and pdf.stat().st_size > 2_000
    assert pdf.read_bytes()[:5] == b"%PDF-"
    height, width = plt.imread(png).shape[:2]
    assert 300 <= width <= 4000 and 250 <= height <= 4000, (png.name, width, height)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    runs = build_runs(tmp_path_factory.mktemp("figures"))
    return runs, summary_table(sorted(runs.glob("*/*/*/ledger.json")))


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    runs_dir, summary = runs
    out = tmp_path_factory.mktemp("out")
    summary.to_csv(out / "summary.csv", index=False)
    return out, figures.plot_results(out / "summary.csv", runs_dir, out / "figures")


def summary_of(out: Path):
    import pandas as pd

    return pd.read_csv(out / "summary.csv")


def test_write_all_writes_every_figure(written):
    out, captions = written
    assert set(captions) == {"rate_distortion", "ledger_bars", "iwae_vs_k", "diffusion_curves",
                             "training_curves-vae", "training_curves-diffusion", "training_curves-bbb",
                             "sample_grids-ring", "sample_grids-pix"}
    for name, caption in captions.items():
        check_figure(out / "figures" / name)
        assert len(caption) > 40 and caption.endswith(".")
    assert json.loads((out / "figures" / "captions.json").read_text()) == captions
    runs = list(zip(summary_of(out)["dataset"], summary_of(out)["family"]))
    assert set(figures.figure_names(runs)) == set(captions)  # the workflow's outputs match what is written
    # only the figures named in the captions, each as PNG and PDF
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        [f"{n}.{ext}" for n in captions for ext in ("png", "pdf")] + ["captions.json"])


def test_captions_mention_entropy_only_where_known(runs, tmp_path):
    runs_dir, summary = runs
    pix = summary[summary["dataset"] == "pix"]
    assert "R + D = H" not in figures.rate_distortion(pix, tmp_path / "rd", runs_dir)[tmp_path / "rd"]
    assert "R + D = H" in figures.rate_distortion(summary, tmp_path / "rd", runs_dir)[tmp_path / "rd"]


@pytest.mark.parametrize("family, dataset, absent", [
    ("vae", "ring", {"diffusion_curves", "training_curves-diffusion", "training_curves-bbb"}),
    ("bbb", "pix", {"rate_distortion", "iwae_vs_k", "diffusion_curves", "training_curves-vae",
                    "training_curves-diffusion", "sample_grids-pix"}),
    ("diffusion", "ring", {"rate_distortion", "iwae_vs_k", "training_curves-vae", "training_curves-bbb"}),
])
def test_absent_family_gives_no_figure_and_no_error(runs, tmp_path, family, dataset, absent):
    runs_dir, summary = runs
    runs_of = summary[(summary["family"] == family) & (summary["dataset"] == dataset)]
    captions = figures.write_all(runs_of, runs_dir, tmp_path)
    assert captions and not absent & set(captions)
    assert set(captions) == set(figures.figure_names([(dataset, family)]))  # what the workflow declares
    for name in absent:
        assert not (tmp_path / f"{name}.png").exists() and not (tmp_path / f"{name}.pdf").exists()
    for name in captions:
        check_figure(tmp_path / name)


def test_missing_run_files_are_skipped(runs, tmp_path):
    """Runs without loss_curve.csv / history.csv / samples.npz give no curve, not an error."""
    _, summary = runs
    empty = tmp_path / "no-runs"
    assert figures.diffusion_curves(summary, empty, tmp_path / "d") == {}
    assert figures.training_curves(summary, empty, tmp_path / "t") == {}
    assert figures.sample_grids(summary, empty, tmp_path / "s") == {}
    assert not list(tmp_path.glob("*.png"))


def test_beta_sweep_includes_the_model_at_beta_one(runs):
    runs_dir, summary = runs
    vae = summary[(summary["family"] == "vae") & (summary["dataset"] == "ring")]
    assert figures._beta_sweeps(vae, runs_dir) == {"vae": 1.0, "beta_vae-b0.5": 0.5, "beta_vae-b2": 2.0}
    # without config.json files only the NAME-b<beta> variants are known to be a sweep
    assert figures._beta_sweeps(vae, None) == {"beta_vae-b0.5": 0.5, "beta_vae-b2": 2.0}


def test_models_sort_in_sweep_order():
    names = ["vae", "beta_vae-b4", "beta_vae-b0.25", "beta_vae-b2", "iwae-k5", "iwae-k50"]
    assert sorted(names, key=figures._sort_key) == [
        "beta_vae-b0.25", "beta_vae-b2", "beta_vae-b4", "iwae-k5", "iwae-k50", "vae"]


def test_merge_close_joins_labels_of_coinciding_points():
    points = pd.DataFrame({"rate": [0.0, 0.001, 3.0], "distortion": [5.0, 5.0, 1.0]})
    assert [labels for _, labels in figures._merge_close(points, [4, 2, 0.5])] == [[4, 2], [0.5]]


def test_sample_frames_hold_the_data_and_are_square():
    data = np.random.default_rng(1).normal(size=(500, 2)) * [3.0, 0.5] + [10.0, -2.0]
    (x0, x1), (y0, y1) = figures._frame(data)
    assert x1 - x0 == pytest.approx(y1 - y0)
    assert (data[:, 0] > x0).all() and (data[:, 0] < x1).all() and (data[:, 1] > y0).all() and (data[:, 1] < y1).all()


def test_sample_grids_redraw_the_stored_samples_of_every_generative_model(runs, tmp_path):
    runs_dir, summary = runs
    captions = figures.sample_grids(summary, runs_dir, tmp_path / "s")
    assert set(captions) == {tmp_path / "s-ring", tmp_path / "s-pix"}
    assert "frame" in captions[tmp_path / "s-ring"] and "grey scale" in captions[tmp_path / "s-pix"]
    for stem in captions:
        check_figure(stem)
