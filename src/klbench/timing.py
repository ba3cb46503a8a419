"""Where a run's time goes: wall-clock and CPU seconds per phase of one training process.

CPU time is `time.process_time()` (user + system of this process, threads included) and counts
from the interpreter's start, so what the process spent before the job began (start-up,
importing torch, the CLI) is its `startup` phase. The phases: startup, data (loading the
dataset), store_open (reaching the MLflow store, importing mlflow included), train, eval (the
held-out ledger, diagnostics, run figure), logging (MLflow calls), and other (what is left:
building the models, writing the run directories).

One process trains the several seeds of a job. A phase is either one run's own (its
evaluation, its logging, its training when seeds train one by one) or shared by all of them
(start-up, data, opening the store, training a stacked group); a run's timing.json holds its
own phases plus an equal share of the shared ones, so summing timing.json over runs gives
the processes' totals. `fixed_share` is the share of CPU that is not training or evaluation.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("startup", "data", "store_open", "train", "eval", "logging", "other")
WORK = ("train", "eval")


class PhaseClock:
    """Wall and CPU seconds per phase of a job of `runs` runs; created when the job starts."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()
        # per run (index) or shared (None): phase -> seconds
        self.wall: dict[int | None, dict[str, float]] = {None: {}}
        self.cpu: dict[int | None, dict[str, float]] = {None: {"startup": self.cpu_start}}

    def add(self, name: str, wall: float, cpu: float, run: int | None = None) -> None:
        """Count seconds of a phase for one run, or (run=None) for all of them alike."""
        for table, value in ((self.wall, wall), (self.cpu, cpu)):
            phases = table.setdefault(run, {})
            phases[name] = phases.get(name, 0.0) + value

    @contextmanager
    def phase(self, name: str, run: int | None = None) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - wall, time.process_time() - cpu, run)

    def record(self, run: int) -> dict[str, float | int | dict[str, float]]:
        """Run `run`'s {"wall": {phase_s}, "cpu": {phase_s}, "max_rss_mb", "runs_in_process"}:
        its own phases, a 1/runs share of the shared ones and of the job's unaccounted rest (`other`)."""
        totals = {"wall": time.perf_counter() - self.wall_start, "cpu": time.process_time()}
        out: dict[str, float | int | dict[str, float]] = {}
        for kind, table in (("wall", self.wall), ("cpu", self.cpu)):
            accounted = sum(sum(phases.values()) for phases in table.values())
            share = {name: value / self.runs for name, value in table[None].items()}
            for name, value in table.get(run, {}).items():
                share[name] = share.get(name, 0.0) + value
            share["other"] = share.get("other", 0.0) + (totals[kind] - accounted) / self.runs
            share["total"] = sum(share.values())
            out[kind] = {f"{name}_s": value for name, value in share.items()}
        # ru_maxrss is in KiB on Linux, bytes on macOS
        out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin"
                                                                                else 2**10)
        out["runs_in_process"] = self.runs
        return out
