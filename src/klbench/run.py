"""One run = one job = one directory (DESIGN.md, "Run directory contract").

`execute_run` trains one model on one dataset with one seed, evaluates it on the
held-out split, tracks it in MLflow and writes the run directory. Files are written
into a staging folder first and moved into place only after everything succeeded,
ledger.json last, so a failed or killed job never leaves a run that looks complete.
"""

import csv
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from klbench.config import RunConfig
from klbench.data import load_dataset
from klbench.errors import ConfigError, OutputError
from klbench.evaluate import evaluate
from klbench.models import get_family
from klbench.provenance import device_name, git_state, resolve_device, versions
from klbench.timing import PHASES, PhaseClock
from klbench.tracking import RunTracker, flatten, resolve_tracking_uri
from klbench.train import fit, seed_everything

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
    """Train, evaluate, track; return the ledger dict written to out_dir/ledger.json.

    tracking_uri, if given, is used as is (verify uses a throwaway store); otherwise
    MLFLOW_TRACKING_URI, the run's config, or sqlite:///mlflow.db here."""
    clock = PhaseClock()
    torch.set_num_threads(run.threads)
    device = resolve_device(run.device)
    family = get_family(run.family)
    with clock.phase("data"):
        dataset = load_dataset(run.dataset, **run.dataset_options)
    if not family.supports(dataset.kind, dataset.target):
        raise ConfigError(f"model family '{run.family}' cannot train on {run.dataset} "
                          f"({dataset.kind} data, targets: {dataset.target or 'none'})")

    out_dir = Path(out_dir)
    staging = out_dir / ".staging"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        clear_run_files(out_dir)  # a re-run replaces the whole run, never half of it
    except OSError as error:
        raise OutputError(f"cannot write the run directory {out_dir}: {error.strerror}; "
                          "choose another --out or results_dir") from None

    provenance = {**git_state(), "device": device_name(device), **{f"version.{k}": v for k, v in versions().items()}}
    tags = {"dataset": run.dataset, "family": run.family, "model": run.model, "seed": run.seed,
            "config_hash": run.config_hash(), "data_hash": dataset.data_hash, **provenance}
    uri = tracking_uri or resolve_tracking_uri(run.tracking_uri)
    tracker = RunTracker(uri, run.family, run.run_key, tags, run.to_dict())
    try:
        tracker.start()
        seed_everything(run.seed)
        model = family.build(run.params, dataset).to(device)
        train_tensors = tuple(t.to(device) for t in family.inputs(dataset, "train", run.params))
        test_tensors = tuple(t.to(device) for t in family.inputs(dataset, "test", run.params))

        def on_epoch(epoch: int, means: dict[str, dict[str, float]]) -> None:
            metrics = {f"{split}/{k}": v for split, values in means.items() for k, v in values.items()}
            tracker.log_metrics(metrics, step=epoch)
            if not progress and "test" in means:
                _log_line(f"epoch {epoch}/{run.train.epochs}  train neg_elbo {means['train']['neg_elbo']:.4f}"
                          f"  test neg_elbo {means['test']['neg_elbo']:.4f}")

        with untracked(clock, "train", tracker):
            history = fit(model, train_tensors, test_tensors, run.train, on_epoch=on_epoch, progress=progress)
        torch.save(model.state_dict(), staging / "model.pt")
        write_history(staging / "history.csv", history)
        write_json(staging / "config.json", run.to_dict())

        with clock.phase("eval"):
            seed_everything(run.seed)  # the evaluation's Monte Carlo draws do not depend on training length
            model = model.cpu()
            evaluation = evaluate(model, family, dataset, run.evaluate, staging, run.params)
            result = evaluation.ledger
            family.run_figure(model, dataset, staging, run.run_key)

        final_train = next(row for row in reversed(history) if row["split"] == "train")
        tracker.log_metrics(
            {**metrics_of("test", result["terms"]), **metrics_of("test", result["derived"]),
             **metrics_of("test", result["diagnostics"])},
            step=run.train.epochs,
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
            "train": {"epochs": run.train.epochs, "parameters": sum(p.numel() for p in model.parameters()),
                      "final": {k: v for k, v in final_train.items() if k not in ("epoch", "split", "wall_time")}},
        }
        write_json(staging / "ledger.json", ledger)
        # every file but timing.json is logged before timing.json is written, so that it counts that
        # logging too; it is the only cost it leaves out, with closing the run
        tracker.log_artifacts(sorted(p for p in staging.iterdir() if p.is_file()))
        clock.add("store_open", tracker.open_seconds, tracker.open_cpu_seconds)
        clock.add("logging", tracker.seconds, tracker.cpu_seconds)
        timing = clock.record()
        write_json(staging / "timing.json", timing)
        tracker.log_artifacts([staging / "timing.json"])
        missing = [name for name in RUN_FILES if not (staging / name).exists()]
        if missing:
            raise RuntimeError(f"run {run.run_key} did not produce {', '.join(missing)} (a bug in its family)")
        files = sorted(p.name for p in staging.iterdir() if p.name != "ledger.json") + ["ledger.json"]
        for name in files:  # ledger.json last: its presence means the run is complete
            os.replace(staging / name, out_dir / name)
        staging.rmdir()
        tracker.finish("FINISHED")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        clear_run_files(out_dir)  # only this run's files can be here: they were removed at the start
        try:
            tracker.finish("FAILED")
        except Exception as error:  # the original error matters more than a failed status update
            _log_line(f"could not mark the MLflow run FAILED: {error}")
        raise
    cpu = timing["cpu"]
    fixed = 1 - (cpu["train_s"] + cpu["eval_s"]) / cpu["total_s"]
    _log_line(f"done {run.run_key}: test neg_elbo {ledger['derived']['neg_elbo']:.4f} nats; CPU {cpu['total_s']:.1f} s: "
              + ", ".join(f"{name} {cpu[f'{name}_s']:.2f}" for name in PHASES) + f" (fixed cost {100 * fixed:.0f}%)")
    return ledger


@contextmanager
def untracked(clock: PhaseClock, name: str, tracker: RunTracker) -> Iterator[None]:
    """A phase of the clock less the MLflow logging done inside it (which counts as logging)."""
    wall, cpu = tracker.seconds, tracker.cpu_seconds
    with clock.phase(name):
        yield
    clock.add(name, -(tracker.seconds - wall), -(tracker.cpu_seconds - cpu))
