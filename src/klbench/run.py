"""One run = one directory and one MLflow run (DESIGN.md, "Run directory contract"); one
job = the seeds of one (dataset, model) in one process.

`execute_runs` trains the seeds, evaluates each on the held-out split, tracks each in
MLflow and writes each run directory. Files are written into staging folders first and
moved into place only after every seed succeeded, ledger.json last, so a failed or killed
job never leaves a run that looks complete.
"""

import csv
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from klbench.batches import FreshDraws, Passes, data_generator
from klbench.config import RunConfig
from klbench.data import Dataset, load_dataset
from klbench.errors import ConfigError, OutputError
from klbench.evaluate import evaluate
from klbench.models import get_family
from klbench.provenance import device_name, git_state, resolve_device, versions
from klbench.seeds import OneSeed, StackedSeeds, generator_after
from klbench.timing import PHASES, PhaseClock
from klbench.tracking import RunTracker, flatten, resolve_tracking_uri
from klbench.train import Selection, fit, seed_everything

# ledger.json holds only what the run computed, so that the same config, seed and thread
# count give it byte for byte (`klbench verify`); wall-clock and CPU times go to timing.json.
RUN_FILES = ("config.json", "history.csv", "model.pt", "samples.png", "mlflow.json", "timing.json", "ledger.json")


def write_json(path: Path, values: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in history for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def metrics_of(split: str, values: dict[str, Any]) -> dict[str, float]:
    """`{split}/{name}` metrics from a (nested) dict of numbers; booleans become 0/1."""
    return {f"{split}/{k}": float(v) for k, v in flatten(values) if isinstance(v, (int, float))}


def clear_run_files(out_dir: Path) -> None:
    """Remove the files of a previous attempt at this run (the directory is the run's own;
    the log, which Snakemake keeps elsewhere, is never here)."""
    for path in out_dir.iterdir():
        if path.is_file():
            path.unlink()


def _log_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def execute_run(
    run: RunConfig, out_dir: Path, progress: bool | None = None, tracking_uri: str | None = None
) -> dict[str, Any]:
    """One run as a job of its own: `execute_runs([run], [out_dir])`; returns its ledger."""
    return execute_runs([run], [out_dir], progress=progress, tracking_uri=tracking_uri)[0]


def check_one_job(runs: list[RunConfig]) -> None:
    """The runs of one job are seeds of one (dataset, model, config)."""
    if not runs:
        raise ConfigError("a training job needs at least one run")
    first = {k: v for k, v in runs[0].to_dict().items() if k != "seed"}
    for run in runs[1:]:
        if {k: v for k, v in run.to_dict().items() if k != "seed"} != first:
            raise ConfigError(f"runs {runs[0].run_key} and {run.run_key} differ in more than their seed; "
                              "one job trains the seeds of one dataset, model and config")
    seeds = [run.seed for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"a job lists a seed twice: {seeds}")


class RunOutput:
    """One run's directory: files are written to a staging folder and moved in only at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.staging = self.out_dir / ".staging"
        try:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            clear_run_files(self.out_dir)  # a re-run replaces the whole run, never half of it
        except OSError as error:
            raise OutputError(f"cannot write the run directory {self.out_dir}: {error.strerror}; "
                              "choose another --out or results_dir") from None

    def publish(self, run_key: str) -> None:
        missing = [name for name in RUN_FILES if not (self.staging / name).exists()]
        if missing:
            raise RuntimeError(f"run {run_key} did not produce {', '.join(missing)} (a bug in its family)")
        files = sorted(p.name for p in self.staging.iterdir() if p.name != "ledger.json") + ["ledger.json"]
        for name in files:  # ledger.json last: its presence means the run is complete
            os.replace(self.staging / name, self.out_dir / name)
        self.staging.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        clear_run_files(self.out_dir)  # only this run's files can be here: they were removed at the start


def execute_runs(
    runs: list[RunConfig], out_dirs: list[Path], progress: bool | None = None, tracking_uri: str | None = None
) -> list[dict[str, Any]]:
    """Train, evaluate and track the seeds of one (dataset, model) in this process; return
    their ledgers, each also written to its out_dir/ledger.json.

    The dataset is loaded and the MLflow store opened once for all of them. With
    train.stack_seeds the seeds train as one stacked model (seeds.py), else one by one;
    either way each seed's result is what it would be alone. Every run gets its own
    directory and MLflow run. The job is all or nothing: run directories appear only once
    every seed has finished, and on any error every run of the job is marked FAILED.

    tracking_uri, if given, is used as is (verify uses a throwaway store); otherwise
    MLFLOW_TRACKING_URI, the runs' config, or sqlite:///mlflow.db here."""
    check_one_job(runs)
    clock = PhaseClock(len(runs))
    first = runs[0]
    torch.set_num_threads(first.threads)
    device = resolve_device(first.device)
    family = get_family(first.family)
    with clock.phase("data"):
        dataset = load_dataset(first.dataset, **first.dataset_options).with_validation(first.train.validation)
    if not family.supports(dataset.kind, dataset.target):
        raise ConfigError(f"model family '{first.family}' cannot train on {first.dataset} "
                          f"({dataset.kind} data, targets: {dataset.target or 'none'})")

    outputs = [RunOutput(out_dir) for out_dir in out_dirs]
    provenance = {**git_state(), "device": device_name(device), **{f"version.{k}": v for k, v in versions().items()}}
    uri = tracking_uri or resolve_tracking_uri(first.tracking_uri)
    trackers = [RunTracker(uri, run.family, run.run_key,
                           {"dataset": run.dataset, "family": run.family, "model": run.model, "seed": run.seed,
                            "config_hash": run.config_hash(), "data_hash": dataset.data_hash, **provenance},
                           run.to_dict()) for run in runs]
    ledgers = []
    try:
        for i, tracker in enumerate(trackers):
            tracker.start(store=trackers[0] if i else None)
        clock.add("store_open", trackers[0].open_seconds, trackers[0].open_cpu_seconds)
        train_tensors = tuple(t.to(device) for t in family.inputs(dataset, "train", first.params))
        val_tensors = tuple(t.to(device) for t in family.inputs(dataset, "val", first.params))
        models, states = [], []
        for run in runs:  # each seed starts from what it would start from alone
            seed_everything(run.seed)
            models.append(family.build(run.params, dataset).to(device))
            states.append(torch.get_rng_state())  # where a lone seed's training draws would begin
        stacked = first.train.stack_seeds and getattr(models[0], "stackable", True)
        if stacked:
            generators = [generator_after(state, device) for state in states]
            groups = [(list(range(len(runs))), StackedSeeds(models, generators, [run.seed for run in runs]))]
        else:
            groups = [([i], OneSeed(model, run.seed)) for i, (run, model) in enumerate(zip(runs, models))]
        fits: dict[int, tuple[list, Selection]] = {}
        for members, group in groups:
            if not stacked:  # a lone seed draws from the global RNG: from where it stood after building it
                torch.set_rng_state(states[members[0]])
            batches = batch_source(group, dataset, family, train_tensors, first.train.batch_size, device)
            fits.update(zip(members, train_group(group, members, runs, trackers, clock, batches, val_tensors,
                                                 progress)))
            for i, model in zip(members, group.models()):
                models[i] = model
        training = {"data": "fresh draws per batch" if isinstance(batches, FreshDraws) else "passes over the "
                    "training split" + (" (inputs redrawn per batch)" if dataset.redraw is not None else ""),
                    "epochs": batches.epochs(first.train.steps)}
        # which seeds shared this process, and whether they trained stacked: what `verify` re-runs
        job = {"job_seeds": [run.seed for run in runs], "stacked": stacked}
        for i, (run, output, tracker) in enumerate(zip(runs, outputs, trackers)):
            ledgers.append(evaluate_run(run, family, dataset, models[i], fits[i], training, output.staging, tracker,
                                        {**provenance, **job}, clock, i))
        # every file but timing.json is logged before it is written, so that it counts that
        # logging too; it is the only cost it leaves out, with closing the run
        for output, tracker in zip(outputs, trackers):
            tracker.log_artifacts(sorted(p for p in output.staging.iterdir() if p.is_file()))
        for i, tracker in enumerate(trackers):
            clock.add("logging", tracker.seconds, tracker.cpu_seconds, run=i)
        timings = [clock.record(i) for i in range(len(runs))]  # one moment: the shares add up to the job
        for output, tracker, timing in zip(outputs, trackers, timings):
            write_json(output.staging / "timing.json", timing)
            tracker.log_artifacts([output.staging / "timing.json"])
        for run, output in zip(runs, outputs):
            output.publish(run.run_key)
        for tracker in trackers:
            tracker.finish("FINISHED")
    except BaseException:
        for output in outputs:
            output.discard()
        for tracker in trackers:
            try:
                tracker.finish("FAILED")
            except Exception as error:  # the original error matters more than a failed status update
                _log_line(f"could not mark the MLflow run {tracker.run_key} FAILED: {error}")
        raise
    for run, ledger, timing in zip(runs, ledgers, timings):
        cpu = timing["cpu"]
        fixed = 1 - (cpu["train_s"] + cpu["eval_s"]) / cpu["total_s"]
        _log_line(f"done {run.run_key}: test neg_elbo {ledger['derived']['neg_elbo']:.4f} nats; CPU {cpu['total_s']:.1f} s"
                  f" (its share of a process of {len(runs)} runs): "
                  + ", ".join(f"{name} {cpu[f'{name}_s']:.2f}" for name in PHASES) + f" (fixed cost {100 * fixed:.0f}%)")
    return ledgers


def batch_source(group: OneSeed | StackedSeeds, dataset: Dataset, family, train_tensors: tuple, batch_size: int,
                 device: torch.device) -> Passes | FreshDraws:
    """Fresh draws where the dataset has a sampler and the family can use them, else passes over the split."""
    generators = [data_generator(seed) for seed in group.seeds]
    if dataset.sampler is not None and family.infinite_data:
        return FreshDraws(group, dataset.sampler, batch_size, family.targets is not None, generators, device)
    return Passes(group, train_tensors, batch_size, dataset.redraw, generators)


def train_group(group: OneSeed | StackedSeeds, members: list[int], runs: list[RunConfig], trackers: list[RunTracker],
                clock: PhaseClock, batches: Passes | FreshDraws, val_tensors: tuple,
                progress: bool | None) -> list[tuple[list, Selection]]:
    """Fit one group of the job's seeds, with live per-seed metrics; return each seed's history and selection."""
    config = runs[members[0]].train

    def on_eval(step: int, per_seed: list[dict[str, dict[str, float]]]) -> None:
        for i, means in zip(members, per_seed):
            trackers[i].log_metrics({f"{split}/{k}": v for split, values in means.items() for k, v in values.items()},
                                    step=step)
        if not progress:
            _log_line(f"step {step}/{config.steps}  " + "  ".join(
                f"seed{runs[i].seed} train {m['train']['neg_elbo']:.4f} val {m['val']['neg_elbo']:.4f}"
                + (f" (own objective {m['val']['objective']:.4f})" if "objective" in m["val"] else "")
                for i, m in zip(members, per_seed)))

    logged = [(trackers[i].seconds, trackers[i].cpu_seconds) for i in members]
    wall, cpu = time.perf_counter(), time.process_time()
    histories, selections = fit(group, batches, val_tensors, config, on_eval=on_eval, progress=progress)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # training time less the MLflow logging done inside it (which counts as each run's logging)
    for i, (before_wall, before_cpu) in zip(members, logged):
        wall -= trackers[i].seconds - before_wall
        cpu -= trackers[i].cpu_seconds - before_cpu
    for i in members:
        clock.add("train", wall / len(members), cpu / len(members), run=i)
    return list(zip(histories, selections))


def evaluate_run(run: RunConfig, family, dataset, model, fitted: tuple[list, Selection], training: dict[str, Any],
                 staging: Path, tracker: RunTracker, provenance: dict[str, Any], clock: PhaseClock,
                 index: int) -> dict[str, Any]:
    """Write one trained run's files into its staging folder and log its test metrics; return its ledger."""
    history, selection = fitted
    torch.save(model.state_dict(), staging / "model.pt")
    write_history(staging / "history.csv", history)
    write_json(staging / "config.json", run.to_dict())
    with clock.phase("eval", run=index):
        seed_everything(run.seed)  # the evaluation's Monte Carlo draws do not depend on training length
        model = model.cpu()
        evaluation = evaluate(model, family, dataset, run.evaluate, staging, run.params)
        result = evaluation.ledger
        result["diagnostics"].update(family.run_figure(model, dataset, staging, run.run_key) or {})
    final_train = next(row for row in reversed(history) if row["split"] == "train")
    tracker.log_metrics(
        {**metrics_of("test", result["terms"]), **metrics_of("test", result["derived"]),
         **metrics_of("test", result["diagnostics"]), **metrics_of("train", selection.to_dict())},
        step=run.train.steps,
    )
    tracker.log_curves({f"test/curve/{name}": values for name, values in evaluation.curves.items()})
    write_json(staging / "mlflow.json", tracker.describe())
    ranks = family.ranks_for(dataset.target)
    ledger = {
        "run": {"key": run.run_key, "dataset": run.dataset, "model": run.model, "family": run.family,
                "variant_of": run.variant_of, "sweep": run.sweep, "seed": run.seed,
                "config_hash": run.config_hash(), "data_hash": dataset.data_hash,
                "split": dataset.split, "dim": dataset.dim, "kind": dataset.kind, "units": "nats per example",
                # what aggregation ranks and tabulates this run by, as its family declares
                "task": ranks[0].task, "ranks": [dataclasses.asdict(r) for r in ranks],
                "headline": list(family.headline), **provenance},
        **result,
        "train": {"steps": run.train.steps, **training, "batch_size": run.train.batch_size,
                  "parameters": sum(p.numel() for p in model.parameters()), **selection.to_dict(),
                  "converged_tol": run.train.converged_tol,
                  "final": {k: v for k, v in final_train.items() if k not in ("step", "split", "lr", "wall_time")},
                  "best_val": selection.best},
    }
    write_json(staging / "ledger.json", ledger)
    return ledger
