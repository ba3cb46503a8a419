"""Re-run a finished run and compare: is the result recomputable bit for bit?

`klbench verify RUN_DIR` reads the run's config.json, trains and evaluates it again in a
temporary directory (tracked in a throwaway MLflow store there, so the real store gets no
duplicate run) and compares the new ledger.json with the stored one, byte for byte and,
where they differ, number by number. Wall-clock times live in timing.json and are not
compared. A run trained in one job with other seeds (ledger `run.job_seeds`) is re-run in
that same job, all its seeds again, since that is what its stored ledger came from.
"""

import json
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from klbench.config import RunConfig
from klbench.errors import CheckpointError
from klbench.tracking import flatten


@dataclass(frozen=True)
class Difference:
    key: str  # dotted path in ledger.json, e.g. "terms.rate"
    stored: Any
    rerun: Any

    def describe(self) -> str:
        if _is_number(self.stored) and _is_number(self.rerun):
            gap = abs(self.stored - self.rerun)
            scale = max(abs(self.stored), abs(self.rerun)) or 1.0
            return f"{self.key}: {self.stored!r} vs {self.rerun!r} (abs {gap:.3g}, rel {gap / scale:.3g})"
        return f"{self.key}: {self.stored!r} vs {self.rerun!r}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_ledgers(stored: dict[str, Any], rerun: dict[str, Any]) -> list[Difference]:
    """Every leaf that differs (a key missing on one side counts, as None)."""
    a, b = dict(flatten(stored)), dict(flatten(rerun))
    differences = []
    for key in list(dict.fromkeys([*a, *b])):
        x, y = a.get(key), b.get(key)
        same = x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        if not same:
            differences.append(Difference(key, x, y))
    return differences


@dataclass(frozen=True)
class Verification:
    identical: bool  # ledger.json byte for byte
    differences: list[Difference]
    job_seeds: list[int]  # the seeds re-run together, as they were trained
    stacked: bool  # whether they trained as one stacked model


def verify_run(run_dir: Path) -> Verification:
    """Re-run the run stored in run_dir and compare its ledger.json with the stored one."""
    from klbench.run import execute_runs
    from klbench.tracking import init_store

    run_dir = Path(run_dir)
    try:
        run = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        stored_bytes = (run_dir / "ledger.json").read_bytes()
        stored = json.loads(stored_bytes)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{run_dir} is not a finished run: {error}") from None
    with tempfile.TemporaryDirectory(prefix="klbench-verify-") as scratch:
        uri = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        init_store(uri, [run.family])
        job = stored.get("run", {})
        seeds = job.get("job_seeds", [run.seed])
        outs = [Path(scratch) / f"seed{seed}" for seed in seeds]
        execute_runs([replace(run, seed=seed) for seed in seeds], outs, progress=False, tracking_uri=uri)
        rerun_bytes = (Path(scratch) / f"seed{run.seed}" / "ledger.json").read_bytes()
    return Verification(rerun_bytes == stored_bytes, compare_ledgers(stored, json.loads(rerun_bytes)), seeds,
                        bool(job.get("stacked", False)))
