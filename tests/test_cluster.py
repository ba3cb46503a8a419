"""Scale-out on real engines, on this machine: the smoke pipeline through a one-node SLURM
cluster (`--workflow-profile workflow/profiles/slurm`, jobs checked in `sacct`), and against
an `mlflow server` on PostgreSQL with 8 parallel jobs: every metric counted back, the UI in a
browser, and a server killed mid-pipeline. Services start on loopback (tests/services.py);
a test skips, saying why, where they cannot."""

import importlib.util
import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, snakemake_command, wait_for
from services import CHROMIUM, NO_CHROMIUM, MlflowServer, Postgres, SlurmCluster, Unavailable, check_mlflow_ui
from klbench.config import expand_models, run_grid, seed_blocks
from klbench.tracking import SUPERSEDED_TAG

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SMOKE = REPO / "config" / "smoke.yaml"


def grid_of(config) -> dict[str, str]:
    """run key -> family of every run the config trains."""
    variants = expand_models(config)
    return {f"{d}/{m}/seed{s}": variants[m]["family"] for d, m, s in run_grid(config)}


def finished(client: MlflowClient, families: set[str], superseded: bool = False) -> list:
    """The FINISHED runs in the store: the current ones (those a comparison counts), or the older
    ones that a re-run of their key tagged superseded (README, "Browse runs in MLflow")."""
    experiments = [client.get_experiment_by_name(f).experiment_id for f in sorted(families)]
    runs = client.search_runs(experiments, filter_string="attributes.status = 'FINISHED'", max_results=5000)
    return [run for run in runs if (run.data.tags.get(SUPERSEDED_TAG) == "true") == superseded]


def finished_runs(client: MlflowClient, families: set[str]) -> Counter:
    """How many current FINISHED runs each run key has in the store."""
    return Counter(run.info.run_name for run in finished(client, families))


def run(command: list[str], env: dict, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    return result, time.perf_counter() - start


# --- SLURM -----------------------------------------------------------------------------------


def started(service, module: str, extra: str, what: str):
    """Start a service of tests/services.py, or skip saying why it cannot run here."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f'{module} is not installed (pip install -e ".[{extra}]")')
    try:
        return service.start()
    except Unavailable as why:
        pytest.skip(f"no {what} on this machine: {why}")


@pytest.fixture(scope="module")
def slurm():
    cluster = SlurmCluster()
    yield started(cluster, "snakemake_executor_plugin_slurm", "slurm", "one-node SLURM cluster")
    cluster.stop()


def test_the_smoke_pipeline_runs_through_slurm_and_every_training_job_is_in_sacct(slurm, smoke, tmp_path):
    _, _, config, _ = smoke
    # the profile's 40 s before the first status check suits a real cluster; 5 s keeps this short
    command, env = snakemake_command(tmp_path, SMOKE, cores=None, args=(
        "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"),
        "--slurm-init-seconds-before-status-checks", "5"))
    result, seconds = run(command, env)
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"SLURM smoke pipeline: {seconds:.1f} s wall")

    grid = grid_of(config)
    for key in grid:
        assert json.loads((tmp_path / "results" / "runs" / key / "ledger.json").read_text())["run"]["key"] == key
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert finished_runs(client, set(grid.values())) == Counter(list(grid))  # one FINISHED run per key, no other

    # every training job went through the scheduler and its accounting; the local rules did not
    run_id = re.search(r"SLURM run ID: (\S+)", result.stdout + result.stderr).group(1)
    jobs = slurm.sacct("--name", run_id, "--format", "JobID,State,Comment%200")
    pairs = {(d, m) for d, m, _ in run_grid(config)}
    blocks = seed_blocks(config["seeds"], config["seeds_per_job"])
    assert len(jobs) == len(pairs) * len(blocks)
    assert {state for _, state, _ in jobs} == {"COMPLETED"}
    # the plugin's job comment: the rule (one per block of seeds) and the wildcards (dataset, model)
    expected = {f"rule_train_seeds_{'_'.join(map(str, block))}_wildcards_{d}_{m}" for d, m in pairs for block in blocks}
    assert {comment for _, _, comment in jobs} == expected


# --- MLflow server on PostgreSQL ---------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres():
    database = Postgres()
    yield started(database, "psycopg", "server", "PostgreSQL")
    database.stop()


def tracking_server(postgres: Postgres, name: str, folder: Path) -> MlflowServer:
    server = MlflowServer(postgres.create_database(name), folder / "artifacts")
    server.upgrade()  # README: `mlflow db upgrade` before the first start
    return server.start()


@pytest.fixture(scope="module")
def server_smoke(postgres, tmp_path_factory):
    """The smoke pipeline with 8 parallel jobs against an mlflow server on PostgreSQL."""
    folder = tmp_path_factory.mktemp("server-smoke")
    server = tracking_server(postgres, "mlflow_smoke", folder)
    (folder / "server.yaml").write_text(f"tracking_uri: {server.url}\n")
    command, env = snakemake_command(folder / "work", SMOKE, folder / "server.yaml", cores=8)
    result, seconds = run(command, env)
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"PostgreSQL smoke pipeline (--cores 8): {seconds:.1f} s wall")
    yield server, folder / "work"
    server.stop()


def metric_points(client: MlflowClient, families: set[str]) -> dict[str, dict[tuple[str, int], float]]:
    """run key -> every (metric, step) -> value logged to its FINISHED run."""
    experiments = [client.get_experiment_by_name(f).experiment_id for f in sorted(families)]
    points = {}
    for found in client.search_runs(experiments, filter_string="attributes.status = 'FINISHED'", max_results=5000):
        points[found.info.run_name] = {(key, m.step): m.value for key in found.data.metrics
                                       for m in client.get_metric_history(found.info.run_id, key)}
    return points


def test_every_metric_logged_to_the_server_by_8_parallel_jobs_is_there(server_smoke, smoke):
    """The same pipeline on the default SQLite store is the reference: its runs are deterministic,
    so every (metric, step, value) it holds must be on the server too, and nothing else."""
    server, workdir = server_smoke
    _, sqlite_workdir, config, _ = smoke
    grid = grid_of(config)
    client = MlflowClient(server.url)
    assert finished_runs(client, set(grid.values())) == Counter(list(grid))
    on_server = metric_points(client, set(grid.values()))
    reference = metric_points(MlflowClient(f"sqlite:///{sqlite_workdir / 'mlflow.db'}"), set(grid.values()))
    counts = {key: len(points) for key, points in on_server.items()}
    assert counts == {key: len(points) for key, points in reference.items()}
    for key in grid:
        assert on_server[key].keys() == reference[key].keys(), key
        for point, value in reference[key].items():
            assert on_server[key][point] == pytest.approx(value, rel=1e-12, abs=1e-300), (key, point)
    print(f"metric points counted back from the server: {sum(counts.values())} in {len(counts)} runs "
          f"(reference SQLite store: {sum(len(p) for p in reference.values())})")
    # and the files agree with the store: the validation curve of every run, step by step
    for key in grid:
        history = (workdir / "results" / "runs" / key / "history.csv").read_text().splitlines()
        val_rows = [row for row in history[1:] if ",val," in f",{row},"]
        assert len([p for p in on_server[key] if p[0] == "val/neg_elbo"]) == len(val_rows), key


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_the_mlflow_ui_of_the_server_shows_the_runs(server_smoke, smoke, tmp_path):
    server, _ = server_smoke
    _, _, config, _ = smoke
    check_mlflow_ui(server.url, MlflowClient(server.url), grid_of(config), tmp_path / "server-runs.png")


def test_a_server_killed_mid_pipeline_fails_its_jobs_in_one_line_and_a_rerun_finishes_them(postgres, smoke,
                                                                                          tmp_path):
    _, _, config, _ = smoke
    grid = grid_of(config)
    server = tracking_server(postgres, "mlflow_kill", tmp_path)
    try:
        (tmp_path / "server.yaml").write_text(f"tracking_uri: {server.url}\n")
        workdir = tmp_path / "work"
        command, env = snakemake_command(workdir, SMOKE, tmp_path / "server.yaml", cores=8)
        pipeline = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        output = []
        client = MlflowClient(server.url)

        def running():
            experiments = [e.experiment_id for e in client.search_experiments()]
            return client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")

        # kill the server once Snakemake has one training job done and another job's runs are open
        # (one training job per CPU runs at a time: the next may not have opened its runs yet)
        for line in pipeline.stdout:
            output.append(line)
            if server.process is not None and re.search(r"Finished jobid: \d+ \(Rule: train_seeds", line):
                wait_for(running, 120, "a training job with open MLflow runs")
                server.kill()
        pipeline.wait(timeout=600)
        assert server.process is None and pipeline.returncode != 0, "".join(output)[-3000:]
        done = {key for key in grid if (workdir / "results" / "runs" / key / "ledger.json").exists()}
        assert 0 < len(done) < len(grid)

        failed = []
        for log in sorted((workdir / "results" / "logs" / "train").rglob("*.log")):
            text = log.read_text()
            if "klbench: error:" in text:
                failed.append(log)
                errors = [line for line in text.splitlines() if line.startswith("klbench: error:")]
                assert len(errors) == 1 and server.url in errors[0], text[-2000:]
                assert "Traceback" not in text, text[-3000:]
        assert failed
        print(f"server killed after {len(done)} of {len(grid)} runs; {len(failed)} jobs failed, e.g.\n"
              + next(line for line in failed[0].read_text().splitlines() if line.startswith("klbench: error:")))

        server.start()  # the same port and database: the jobs find their runs again
        result, seconds = run([*command, "--rerun-incomplete"], env)  # (the default profile sets it too)
        assert result.returncode == 0, result.stderr[-4000:]
        assert finished_runs(client, set(grid.values())) == Counter(list(grid))  # one current FINISHED run per key
        # a job whose runs reached FINISHED just before the server died (so its run directories
        # never appeared) ran again: its older FINISHED runs are tagged superseded by the new ones
        current = {run.info.run_name: run.info.run_id for run in finished(client, set(grid.values()))}
        for older in finished(client, set(grid.values()), superseded=True):
            assert older.data.tags["klbench.superseded_by"] == current[older.info.run_name]
        experiments = [client.get_experiment_by_name(f).experiment_id for f in sorted(set(grid.values()))]
        others = Counter(r.info.status for r in client.search_runs(
            experiments, filter_string="attributes.status != 'FINISHED'", max_results=5000))
        assert set(others) <= {"FAILED", "KILLED"} and sum(others.values()) > 0  # the interrupted attempts
        print(f"rerun after restart: {seconds:.1f} s; interrupted attempts left {dict(others)}")
    finally:
        server.stop()
