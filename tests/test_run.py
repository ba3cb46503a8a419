"""One run end to end through `execute_run` and the `klbench` command line."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from mlflow.tracking import MlflowClient

from klbench.config import RunConfig, load_config, resolve_run, validate_config
from klbench.errors import TrainingError
from klbench.plots import SAMPLES_FILE
from klbench.run import RUN_FILES, execute_run
from klbench.timing import PHASES

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = validate_config(load_config([repo / "config" / "config.yaml", repo / "config" / "smoke.yaml"]))
    run = resolve_run(config, "checkerboard", "vae", 0)
    return replace(run, train=replace(run.train, steps=16)), tmp_path


def runs_of(uri: str):
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("vae").experiment_id])


def test_a_run_writes_its_directory_and_one_finished_mlflow_run(tiny):
    run, tmp = tiny
    ledger = execute_run(run, tmp / "out", progress=False)
    assert {p.name for p in (tmp / "out").iterdir()} == set(RUN_FILES) | {SAMPLES_FILE}  # a generative run
    assert json.loads((tmp / "out" / "ledger.json").read_text()) == ledger
    assert RunConfig.from_dict(json.loads((tmp / "out" / "config.json").read_text())) == run
    state = torch.load(tmp / "out" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    tracked = json.loads((tmp / "out" / "mlflow.json").read_text())
    assert tracked["tracking_uri"] == f"sqlite:///{tmp / 'mlflow.db'}"
    (finished,) = runs_of(tracked["tracking_uri"])
    assert finished.info.run_id == tracked["run_id"] and finished.info.status == "FINISHED"
    timing = json.loads((tmp / "out" / "timing.json").read_text())
    for clock in ("wall", "cpu"):
        phases = {name: timing[clock][f"{name}_s"] for name in PHASES if f"{name}_s" in timing[clock]}
        assert all(phases[name] > 0 for name in ("data", "store_open", "train", "eval", "logging"))
        assert sum(phases.values()) == pytest.approx(timing[clock]["total_s"], rel=1e-9)
    # CPU counts from the interpreter's start: this test process has imported torch and mlflow long ago
    assert timing["cpu"]["startup_s"] > 1.0 and timing["max_rss_mb"] > 50
    assert "timing" not in ledger


def test_verify_finds_a_rerun_identical_byte_for_byte_and_names_a_changed_number(tiny):
    run, tmp = tiny
    execute_run(run, tmp / "a", progress=False)
    stored = (tmp / "a" / "ledger.json").read_bytes()
    result = klbench("verify", str(tmp / "a"), cwd=tmp)
    assert result.returncode == 0, result.stderr
    assert "identical (ledger.json byte for byte; re-run in its job with seeds 0, one by one)" in result.stdout
    assert len(runs_of(f"sqlite:///{tmp / 'mlflow.db'}")) == 1  # the re-run went to a throwaway store
    ledger = json.loads(stored)
    ledger["terms"]["rate"] += 1e-9
    (tmp / "a" / "ledger.json").write_text(json.dumps(ledger, indent=2) + "\n")
    result = klbench("verify", str(tmp / "a"), cwd=tmp)
    assert result.returncode == 1
    assert "differs in 1 value(s)" in result.stdout and "terms.rate:" in result.stdout and "abs 1e-09" in result.stdout


def test_a_diverging_run_fails_cleanly(tiny):
    run, tmp = tiny
    exploding = replace(run, train=replace(run.train, lr=1e12))
    with pytest.raises(TrainingError, match="NaN/inf"):
        execute_run(exploding, tmp / "out", progress=False)
    assert list((tmp / "out").iterdir()) == []  # nothing that looks like a result, no staging left
    (failed,) = runs_of(f"sqlite:///{tmp / 'mlflow.db'}")
    assert failed.info.status == "FAILED"


def klbench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "klbench.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_reports_user_errors_in_one_line(repo, tmp_path):
    result = klbench("train", "--config", str(repo / "config" / "config.yaml"), "--dataset", "mnist9k",
                     "--model", "vae", "--seed", "0", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown dataset 'mnist9k'; known datasets:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_evaluate_reproduces_the_ledger_and_rejects_a_corrupt_checkpoint(tiny, repo):
    run, tmp = tiny
    ledger = execute_run(run, tmp / "out", progress=False)
    result = klbench("evaluate", str(tmp / "out"), cwd=tmp)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["terms"] == ledger["terms"]
    (tmp / "out" / "model.pt").write_bytes(b"not a checkpoint")
    result = klbench("evaluate", str(tmp / "out"), cwd=tmp)
    assert result.returncode == 2
    assert result.stderr.startswith("klbench: error: cannot load checkpoint") and result.stderr.count("\n") == 1
