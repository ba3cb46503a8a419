"""What a model family declares: the one contract between a family module and the rest of klbench.

A family module (models/vae.py, models/diffusion/, ...) defines `FAMILY = Family(...)` and
registers it with one line in models/__init__.py. Training, evaluation, tracking, aggregation,
figures and the report learn everything they need about the family from this declaration and
from what its runs write into ledger.json; no module outside models/ names a family.

The model that `build(config, dataset)` returns is an nn.Module with

    loss(*batch, batch_index, num_batches, progress) -> (objective, terms)     for training
    ledger_terms(*batch, samples) -> terms                           for evaluation

terms being per-example tensors (B,) in nats, unweighted, named as `Family.terms` (DESIGN.md,
"The ledger contract"); the objective is a scalar and may weight them (beta, annealing).
A model that trains on something other than the ELBO its ledger sums to (IWAE's -L_k, a
beta-VAE's distortion + beta rate) names it in the attribute `own_objective` (a label such as
"-L_5") and provides

    own_objective_terms(*batch, samples) -> {"objective": (B,)}          for model selection

so that its checkpoint is chosen, and its convergence judged, on what it optimises.
batch_index of num_batches is the batch's position in the epoch (for minibatch KL weighting);
progress = step / steps in (0, 1] is how far training has come (for a warm-up of a term's
weight); it defaults to 1, the objective of a trained model.
A batch is what `inputs(dataset, split, config)` returns, row-sliced: (x,) by default, (x, y)
for a family that needs targets.

The seeds of a job train as one stacked model under torch.func.vmap (seeds.py) when
train.stack_seeds is on. For that, loss and ledger_terms draw their noise only with
torch.randn/rand(_like) and take no data-dependent branches on it. A model whose training step
cannot run under vmap (it registers gradient hooks, say) sets the attribute `stackable = False`;
its seeds then train one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from klbench.config import EvalConfig

if TYPE_CHECKING:
    from klbench.data import Dataset
    from klbench.ledger import Ledger

# What a run is judged on: the density of x, or the prediction of real or class targets y.
TASKS = ("density", "regression", "classification")
TARGET_TASK = {"real": "regression", "class": "classification"}


@dataclass(frozen=True)
class Rank:
    """A task the family is ranked on, by which metric (a column of the summary table: a ledger
    term, a derived quantity or a diagnostic) and in which direction."""

    task: str
    metric: str
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")


@dataclass(frozen=True)
class Figure:
    """A comparison figure across runs that the family's runs appear in: `kind` names a drawing
    of figures.py (FIGURE_KINDS), `name` the file stem under results/figures/, `options` what
    the drawing needs (columns to plot, axis labels, the swept parameter). Families that declare
    the same name share the figure."""

    name: str
    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Diagnostics:
    """What a family's evaluation adds to its ledger.

    values: numbers (nested dicts allowed) for ledger.json's "diagnostics" and MLflow.
    nll_bound: a per-example bound on -log q(x) tighter than the ELBO, for the first
        n <= N held-out examples (gives inference_gap / model_gap), or None.
    curves: name -> values on a fixed grid (e.g. the loss per log-SNR), logged to MLflow
        with step = grid index; the family also writes them as CSV into the run directory.
    """

    values: dict[str, Any]
    nll_bound: Tensor | None = None
    curves: dict[str, list[float]] = field(default_factory=dict)


def default_inputs(family: Family) -> Callable[[Dataset, str, Any], tuple[Tensor, ...]]:
    def inputs(dataset: Dataset, split: str, config: Any) -> tuple[Tensor, ...]:
        x = getattr(dataset, f"x_{split}")
        return (x, getattr(dataset, f"y_{split}")) if family.targets else (x,)

    return inputs


@dataclass(frozen=True, eq=False)
class Family:
    """A model family's declaration (compared and hashed by identity).

    name: the family's name in configs, MLflow experiments and tables.
    terms: its ledger term names, in the order tables and bars show them.
    data_kinds: the dataset kinds (continuous, binary, discrete) its x may be.
    targets: the target types (real, class) it needs y to be; None if it models x alone.
    ranks: the tasks it is ranked on; a "density" rank applies to every run, a "regression" or
        "classification" rank to runs on data with real or class targets. The first that
        applies is the run's primary task (its panel in the ledger bars, its paired metric).
    config: the frozen settings dataclass of its hyperparameters (klbench.settings.setting
        fields: defaults, limits and meaning in one place).
    evaluate: the settings dataclass of its evaluation (EvalConfig or a subclass).
    build(config, dataset) -> nn.Module.
    diagnose(model, dataset, ledger, evaluate_config, out_dir) -> Diagnostics.
    run_figure(model, dataset, out_dir, title) -> dict | None: writes the run's samples.png (and
        any files the comparison figures read, e.g. samples.npz). It runs after diagnose, into
        the same out_dir, so it may draw from the files diagnose wrote there. What it returns
        joins the ledger's diagnostics: numbers measured on what it drew (a density model's
        share of samples on the data's support), so the samples are drawn once.
    figures: the comparison figures its runs appear in, besides those of every family
        (ledger bars, training curves and, for density models, sample grids).
    headline: diagnostics shown beside the terms in the Markdown ledger tables.
    inputs(dataset, split, config) -> the batch tensors of a split (default: (x,) or (x, y)).
    infinite_data: whether its training objective is a per-example expectation, so that it can
        train on fresh draws of the data where a dataset has a sampler (infinite data). False
        for an objective that depends on the training set's size N (BBB's KL / N, M2's share of
        labels): it trains on the dataset's finite training split.
    """

    name: str
    terms: tuple[str, ...]
    data_kinds: tuple[str, ...]
    targets: tuple[str, ...] | None
    ranks: tuple[Rank, ...]
    config: type
    build: Callable[[Any, Dataset], nn.Module]
    diagnose: Callable[[nn.Module, Dataset, Ledger, Any, Path], Diagnostics]
    run_figure: Callable[[nn.Module, Dataset, Path, str], dict[str, float] | None]
    evaluate: type = EvalConfig
    figures: tuple[Figure, ...] = ()
    headline: tuple[str, ...] = ()
    inputs: Callable[[Dataset, str, Any], tuple[Tensor, ...]] | None = None
    infinite_data: bool = True

    def __post_init__(self) -> None:
        if self.inputs is None:
            object.__setattr__(self, "inputs", default_inputs(self))
        if not issubclass(self.evaluate, EvalConfig):
            raise TypeError(f"family {self.name}: evaluate must subclass klbench.config.EvalConfig")

    def supports(self, kind: str, target: str | None) -> bool:
        """Whether the family can train on a dataset of this kind and target type."""
        return kind in self.data_kinds and (self.targets is None or target in self.targets)

    def ranks_for(self, target: str | None) -> tuple[Rank, ...]:
        """The ranks that apply to a run on data with this target type (module docstring)."""
        return tuple(r for r in self.ranks if r.task == "density" or r.task == TARGET_TASK.get(target))

    @property
    def density(self) -> bool:
        """Whether the family models x (and draws samples of it)."""
        return any(r.task == "density" for r in self.ranks)


# Samples drawn for a density model's run figure: a 2-D scatter shows a cloud, an image grid 64.
SCATTER_SAMPLES, IMAGE_SAMPLES = 2000, 64


def samples_run_figure(model: nn.Module, dataset: Dataset, out_dir: Path, title: str) -> dict[str, float] | None:
    """The run figure of a density model: model.sample(n) -> (n, D) in data units, drawn beside
    held-out data as samples.png and stored with them in samples.npz (for the sample grids).
    Returns the samples' share on the data's support where the dataset can tell (Dataset.on_support)."""
    from klbench.plots import SAMPLES_FILE, samples_figure, save_samples

    samples = model.sample(IMAGE_SAMPLES if len(dataset.shape) > 1 else SCATTER_SAMPLES).cpu().numpy()
    data = dataset.x_test.numpy()
    samples_figure(samples, data, dataset.shape, title, out_dir / "samples.png")
    save_samples(out_dir / SAMPLES_FILE, samples, data[: len(samples)], dataset.shape)
    return None if dataset.on_support is None else dataset.on_support(samples.astype("float64"))
