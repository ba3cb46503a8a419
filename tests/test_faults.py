"""Faults that hit long parallel pipelines, produced for real: a diverging job under
--keep-going, a job SIGKILLed mid-training and re-run, 8 processes writing one SQLite
store at once."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_snakemake, snakemake_command, wait_for
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

# Two checkerboard runs of the VAE: `vae` trains normally, `boom` diverges (lr 1e12).
TWO_RUNS = {
    "seeds": [0],
    "run": [{"datasets": ["checkerboard"], "models": ["vae", "boom"]}],
    "datasets": {"checkerboard": {"options": {"n_train": 1000, "n_test": 300}}},
    # a model's own train block: the default's dataset and family budgets would beat a top-level one
    "models": {"vae": {"family": "vae", "train": {"steps": 16}}, "boom": {"family": "vae", "train": {"lr": 1.0e12, "steps": 16}}},
    "evaluate": {"samples": 2},
    "families": {"vae": {"evaluate": {"iwae_k": [1, 8], "iwae_examples": 100}}},
}


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def mlflow_runs(workdir: Path) -> dict[str, list]:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vae").experiment_id], max_results=1000)
    by_name: dict[str, list] = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    return by_name


def test_a_diverging_job_fails_alone_with_one_line_and_keep_going_finishes_the_rest(tmp_path):
    config = write_config(tmp_path / "two.yaml", TWO_RUNS)
    result = run_snakemake(tmp_path, config, args=("--keep-going",), check=False)
    assert result.returncode != 0  # the pipeline reports the failure ...
    runs = tmp_path / "results" / "runs" / "checkerboard"
    assert (runs / "vae" / "seed0" / "ledger.json").exists()  # ... and the healthy job finished
    assert not list((runs / "boom" / "seed0").glob("*"))  # nothing half-written (a missing folder globs empty)
    log = (tmp_path / "results" / "logs" / "train" / "checkerboard" / "boom" / "seeds0.log").read_text()
    last = log.strip().splitlines()[-1]
    # whichever sees it first: the summed training loss, or the validation ledger after the step
    assert re.match(r"klbench: error: (training loss became NaN/inf by|validation ledger is NaN/inf at) step \d+ "
                    r"\(seed 0\); lower train.lr", last), last
    assert "Traceback" not in log
    tracked = mlflow_runs(tmp_path)
    assert [r.info.status for r in tracked["checkerboard/boom/seed0"]] == ["FAILED"]
    assert [r.info.status for r in tracked["checkerboard/vae/seed0"]] == ["FINISHED"]


def training_job_pid(workdir: Path, out: str) -> int | None:
    """The pid of the `klbench train` process writing `out` (relative to workdir), found by
    its command line and working directory."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = (entry / "cwd").resolve()
        except OSError:
            continue
        if cwd == workdir.resolve() and out.encode() in argv and any(a.endswith(b"/klbench") for a in argv):
            return int(entry.name)
    return None


def test_a_sigkilled_job_is_rerun_cleanly_and_its_stale_run_closed_as_killed(tmp_path):
    long = {**TWO_RUNS, "run": [{"datasets": ["checkerboard"], "models": ["vae"]}],
            "models": {"vae": {"family": "vae", "train": {"steps": 40000, "evaluations": 2000}}}}
    config = write_config(tmp_path / "long.yaml", long)
    command, env = snakemake_command(tmp_path, config)
    run_dir = tmp_path / "results" / "runs" / "checkerboard" / "vae" / "seed0"
    log = tmp_path / "results" / "logs" / "train" / "checkerboard" / "vae" / "seeds0.log"
    pipeline = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for(lambda: training_job_pid(tmp_path, "results/runs/checkerboard/vae/seed0"), 120,
                       "the training job to start")
        wait_for(lambda: log.exists() and "step 40/" in log.read_text(), 180, "two evaluations of training")
        os.kill(pid, signal.SIGKILL)
        pipeline.wait(timeout=120)
    finally:
        pipeline.kill()
    assert pipeline.returncode != 0
    assert not (run_dir / "ledger.json").exists()
    (stale,) = mlflow_runs(tmp_path)["checkerboard/vae/seed0"]
    assert stale.info.status == "RUNNING"  # SIGKILL leaves no chance to close it

    write_config(config, {**long, "models": {"vae": {"family": "vae", "train": {"steps": 16}}}})
    run_snakemake(tmp_path, config, args=("--rerun-incomplete",))
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["train"]["steps"] == 16
    assert not (run_dir / ".staging").exists()
    statuses = {r.info.run_id: r.info.status for r in mlflow_runs(tmp_path)["checkerboard/vae/seed0"]}
    assert statuses[stale.info.run_id] == "KILLED"
    assert sorted(statuses.values()) == ["FINISHED", "KILLED"]


WRITER = textwrap.dedent("""
    import sys
    from klbench.tracking import RunTracker
    uri, index, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tracker = RunTracker(uri, "vae", f"concurrency/writer{index}/seed0", {"writer": index}, {"steps": steps})
    tracker.start()
    for step in range(steps):
        tracker.log_metrics({f"train/term{j}": index + step / 1000 + j for j in range(10)}, step=step)
        tracker.flush()  # every step its own SQLite write: the worst case for lock contention
    tracker.finish("FINISHED")
""")


def test_eight_processes_writing_one_sqlite_store_lose_no_metric(tmp_path):
    from klbench.tracking import init_store

    uri, steps = f"sqlite:///{tmp_path / 'mlflow.db'}", 40
    init_store(uri, ["vae"])
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(i), str(steps)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    outputs = [w.communicate(timeout=300) for w in writers]
    for writer, (_, err) in zip(writers, outputs):
        assert writer.returncode == 0, err[-2000:]
        assert "database is locked" not in err
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("vae").experiment_id], max_results=100)
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        index = int(run.data.tags["writer"])
        for j in range(10):
            history = client.get_metric_history(run.info.run_id, f"train/term{j}")
            assert sorted((m.step, m.value) for m in history) == [(s, index + s / 1000 + j) for s in range(steps)]
