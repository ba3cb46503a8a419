"""Where a run's time goes: wall-clock and CPU seconds per phase of one training process.

CPU time is `time.process_time()` (user + system of this process, threads included) and counts
from the interpreter's start, so what the process spent before the run began (start-up,
importing torch, the CLI) is its `startup` phase. The phases of a run: startup, data (loading
the dataset), store_open (reaching the MLflow store, importing mlflow included), train,
eval (the held-out ledger, diagnostics, run figure), logging (MLflow calls), and other (what
is left: building the model, writing the run directory). `fixed_share` is the share of CPU
that is not training or evaluation, the fixed cost of a run.
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
    """Accumulates wall and CPU seconds per phase; created at the start of a run."""

    def __init__(self) -> None:
        self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {"startup": self.cpu_start}

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - wall, time.process_time() - cpu)

    def record(self) -> dict[str, float | dict[str, float]]:
        """{"wall": {phase_s}, "cpu": {phase_s}, "max_rss_mb"} with `other` = the rest of the total."""
        wall_total, cpu_total = time.perf_counter() - self.wall_start, time.process_time()
        wall = {**self.wall, "other": wall_total - sum(self.wall.values()), "total": wall_total}
        cpu = {**self.cpu, "other": cpu_total - sum(self.cpu.values()), "total": cpu_total}
        # ru_maxrss is in KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        return {"wall": {f"{k}_s": v for k, v in wall.items()}, "cpu": {f"{k}_s": v for k, v in cpu.items()},
                "max_rss_mb": rss}
