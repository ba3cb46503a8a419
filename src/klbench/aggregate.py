"""Ledgers -> tables. Reads run directories' ledger.json files only (no models, no MLflow)."""

import json
from pathlib import Path
from typing import Any

import pandas as pd

from klbench.errors import DataError
from klbench.tracking import flatten

KEY_COLUMNS = ("dataset", "model", "family", "seed")


def read_ledger(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read ledger {path}: {error}") from None


def ledger_row(ledger: dict[str, Any]) -> dict[str, Any]:
    """One flat row: run keys, every ledger term, derived quantities, diagnostics, timing."""
    run = ledger["run"]
    row: dict[str, Any] = {k: run[k] for k in KEY_COLUMNS}
    row.update({"config_hash": run["config_hash"], "data_hash": run["data_hash"],
                "git_commit": run.get("git_commit"), "git_dirty": run.get("git_dirty")})
    row.update(ledger["terms"])
    row.update(ledger["derived"])
    row.update({k: v for k, v in flatten(ledger["diagnostics"]) if not isinstance(v, (list, dict))})
    return row


def read_timing(ledger_path: Path) -> dict[str, float]:
    """timing.json beside a ledger (wall-clock seconds), or nothing if it is absent."""
    path = Path(ledger_path).with_name("timing.json")
    return {f"timing.{k}": v for k, v in read_ledger(path).items()} if path.exists() else {}


def summary_table(ledger_paths: list[Path]) -> pd.DataFrame:
    """One row per run, sorted by dataset, model and seed."""
    rows = [{**ledger_row(read_ledger(p)), **read_timing(p)} for p in ledger_paths]
    if not rows:
        raise DataError("no ledgers to aggregate; run the training jobs first")
    return pd.DataFrame(rows).sort_values(list(KEY_COLUMNS[:2]) + ["seed"]).reset_index(drop=True)


def write_summary(ledger_paths: list[Path], out: Path) -> pd.DataFrame:
    table = summary_table(ledger_paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(out)
    return table
