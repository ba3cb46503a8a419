"""The fork server: a job forked from it is the job it would be in its own process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import wait_for
from mlflow.tracking import MlflowClient

from klbench.forkserver import SOCKET_ENV, start_server, stop_server
from klbench.tracking import init_store

pytestmark = pytest.mark.slow

TINY = {"seeds": [0], "run": [{"datasets": ["checkerboard"], "models": ["vae"]}],
        "datasets": {"checkerboard": {"options": {"n_train": 500, "n_test": 200}}},
        # a model's own train block: the default's dataset and family budgets would beat a top-level one
        "models": {"vae": {"family": "vae", "train": {"steps": 16}}}, "evaluate": {"samples": 2},
        "families": {"vae": {"evaluate": {"iwae_k": [1, 8], "iwae_examples": 100}}}}


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A running fork server for this test; its socket is in $KLBENCH_FORK_SERVER."""
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    path = start_server(tmp_path / "server" / "fork_server.log", idle=60)
    assert path is not None, (tmp_path / "server" / "fork_server.log").read_text()
    pid = json.loads((tmp_path / "server" / "fork_server.json").read_text())["pid"]
    yield path, pid
    stop_server(path)
    monkeypatch.delenv(SOCKET_ENV, raising=False)


def train_command(repo: Path, config: Path, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "klbench"), "train", "--config", str(repo / "config" / "config.yaml"),
            "--config", str(config), "--dataset", "checkerboard", "--model", "vae", "--seed", "0",
            "--out", str(out), "--no-progress"]


def job_env(tmp_path: Path, socket: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if socket:
        env[SOCKET_ENV] = socket
    return env


def write(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_forked_job_writes_the_ledger_its_own_process_writes_and_skips_the_imports(repo, tmp_path, server):
    config = write(tmp_path / "tiny.yaml", TINY)
    subprocess.run(train_command(repo, config, tmp_path / "alone"), env=job_env(tmp_path, None), check=True,
                   capture_output=True, cwd=tmp_path)
    forked = subprocess.run(train_command(repo, config, tmp_path / "forked"), env=job_env(tmp_path, server[0]),
                            check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "done checkerboard/vae/seed0" in forked.stderr  # the job's own log lines reach the client's stderr
    assert (tmp_path / "forked" / "ledger.json").read_bytes() == (tmp_path / "alone" / "ledger.json").read_bytes()
    alone = json.loads((tmp_path / "alone" / "timing.json").read_text())["cpu"]
    child = json.loads((tmp_path / "forked" / "timing.json").read_text())["cpu"]
    # torch and MLflow were imported by the server, not by the job
    assert child["startup_s"] + child["store_open_s"] < 0.25 * (alone["startup_s"] + alone["store_open_s"])


def test_a_forked_job_reports_a_user_error_in_one_line_with_exit_code_2(repo, tmp_path, server):
    bad = subprocess.run([str(Path(sys.executable).parent / "klbench"), "train", "--config",
                          str(repo / "config" / "config.yaml"), "--dataset", "nope", "--model", "vae", "--seed", "0"],
                         env=job_env(tmp_path, server[0]), capture_output=True, text=True, cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["klbench: error: unknown dataset 'nope'; known datasets: "
                                               + bad.stderr.split("known datasets: ")[1].strip()]


def children_of(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def mlflow_statuses(tmp_path: Path) -> list[str]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae")
    return [] if experiment is None else [r.info.status for r in client.search_runs([experiment.experiment_id])]


@pytest.mark.parametrize("signum, status", [(signal.SIGKILL, "RUNNING"), (signal.SIGTERM, "FAILED")])
def test_a_signal_to_the_client_ends_its_forked_job_as_it_would_end_in_process(repo, tmp_path, server, signum,
                                                                               status):
    """SIGKILL: the child stops at once and its run stays RUNNING (the next attempt closes it as
    KILLED); SIGTERM: passed on, the job ends FAILED and leaves no files. Either way no child lingers."""
    _, server_pid = server
    init_store(f"sqlite:///{tmp_path / 'mlflow.db'}", ["vae"])  # before the test reads it while the job writes
    config = write(tmp_path / "long.yaml", {**TINY, "models": {"vae": {"family": "vae", "train": {"steps": 50000, "evaluations": 2000}}}})
    out = tmp_path / "run"
    client = subprocess.Popen(train_command(repo, config, out), env=job_env(tmp_path, server[0]), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    (child,) = wait_for(lambda: children_of(server_pid), 30, "the forked job")
    wait_for(lambda: mlflow_statuses(tmp_path) == ["RUNNING"], 60, "the job's MLflow run")
    client.send_signal(signum)
    client.wait(timeout=60)
    wait_for(lambda: child not in children_of(server_pid), 60, "the forked job to end")
    assert mlflow_statuses(tmp_path) == [status]
    assert not (out / "ledger.json").exists() and not list(out.glob(".staging/*"))
    if signum == signal.SIGTERM:
        assert client.returncode == 130 and "klbench: interrupted" in client.stderr.read()


def test_without_a_reachable_server_a_job_runs_in_its_own_process(repo, tmp_path):
    config = write(tmp_path / "tiny.yaml", TINY)
    stale = tmp_path / "gone.sock"
    stale.write_text("")  # a socket path left behind by a server that is gone
    result = subprocess.run(train_command(repo, config, tmp_path / "run"), env=job_env(tmp_path, str(stale)),
                            capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())["cpu"]
    assert timing["startup_s"] > 0.3  # it imported torch itself


def test_an_idle_server_exits_and_removes_its_socket(tmp_path, monkeypatch):
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    path = start_server(tmp_path / "fork_server.log", idle=1)
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    assert path is not None
    wait_for(lambda: not Path(path).exists(), 30, "the idle server to exit")


def test_a_forked_job_killed_on_its_own_fails_its_client_with_one_line(repo, tmp_path, server):
    """The OOM killer or a user may kill the forked child itself: its client must not hang or pass."""
    _, server_pid = server
    config = write(tmp_path / "long.yaml", {**TINY, "models": {"vae": {"family": "vae", "train": {"steps": 50000, "evaluations": 2000}}}})
    client = subprocess.Popen(train_command(repo, config, tmp_path / "run"), env=job_env(tmp_path, server[0]),
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    (child,) = wait_for(lambda: children_of(server_pid), 30, "the forked job")
    os.kill(child, signal.SIGKILL)
    assert client.wait(timeout=60) == 1
    assert client.stderr.read().strip().splitlines()[-1].startswith(
        "klbench: error: the job's process ended without an exit status (killed?)")
