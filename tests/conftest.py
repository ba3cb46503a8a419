import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def snakemake_command(workdir: Path, *configfiles: Path | str, args: tuple[str, ...] = (),
                      cores: int | None = 2) -> tuple[list[str], dict]:
    """Command and environment to run the real workflow on the default config plus
    `configfiles`, in workdir, with MLflow's default store there (cores None: a cluster
    executor's profile decides)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--configfile", *map(str, configfiles), *(["--cores", str(cores)] if cores else []), *args]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The rules call the `klbench` console script; find it beside this interpreter even
    # when the venv is not activated (e.g. `.venv/bin/python -m pytest`).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return command, env


def run_snakemake(workdir: Path, *configfiles: Path | str, args: tuple[str, ...] = (), check: bool = True,
                  cores: int = 2):
    command, env = snakemake_command(workdir, *configfiles, args=args, cores=cores)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"snakemake failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """The smoke pipeline, run once per session on MLflow's default SQLite store:
    (repo, workdir, validated config, the CompletedProcess)."""
    from klbench.config import load_config, validate_config

    workdir = tmp_path_factory.mktemp("smoke")
    result = run_snakemake(workdir, REPO / "config" / "smoke.yaml", cores=8)  # as the README runs it
    config = validate_config(load_config([REPO / "config" / "config.yaml", REPO / "config" / "smoke.yaml"]))
    return REPO, workdir, config, result


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch):
    """Tests choose their own MLflow store; a developer's MLFLOW_TRACKING_URI must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def repo() -> Path:
    return REPO


def pytest_configure(config):
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # The tests' models are tiny: one thread is fastest, and torch's default (all cores)
    # makes them crawl when anything else runs on a small machine.
    import torch

    torch.set_num_threads(1)


def wait_for(predicate, timeout: float, what: str):
    """predicate()'s first truthy value within timeout seconds, polled every 0.1 s; else fail."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def train_for_epochs(model, train, validation, epochs: int, batch_size: int, lr: float, evaluations: int = 2):
    """Train a model for `epochs` passes at a constant lr (no warm-up): the tests' fixed budgets.
    Returns (history, selection); the model ends at its best validation checkpoint."""
    import math

    from klbench.config import TrainConfig
    from klbench.train import fit_model

    steps = epochs * math.ceil(len(train[0]) / batch_size)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=0, schedule="constant",
                         evaluations=min(evaluations, steps))
    return fit_model(model, train, validation, config)


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    data = idx_bytes(array)
    if compress:
        Path(f"{path}.gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_grey_idx(folder: Path, n_train: int, n_test: int, seed: int = 1) -> Path:
    """MNIST's four IDX files in `folder`, with random grey-level 28x28 images and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), False)
        write_idx(folder / f"{part}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8), False)
    return folder
