"""Three seeds of one (dataset, model): vectorized in one process against three processes.

Three ways to train seeds 0, 1, 2 of the default config's (dataset, model), each a real
`klbench train` command with its own MLflow SQLite store:

- processes:  three `klbench train` processes one after another (one seed each: what one
              job per seed costs: interpreter, imports, store, data, training, evaluation);
- one-by-one: one process, seeds trained one after another (train.stack_seeds false);
- stacked:    one process, the seeds trained as one stacked model (train.stack_seeds true);
- forked:     the pipeline's way: one job, seeds one by one, forked from a running fork server
              (klbench/forkserver.py), so it imports nothing itself;
- forked stacked: the same job with the seeds stacked.

Reported: wall seconds of each side, and the training seconds summed from the runs'
timing.json, with the ratios processes / stacked and processes / forked (whole job) and
one-by-one / stacked (training alone). The sides alternate within each repeat, so a ratio compares runs made
under the same machine load; the median over repeats is the headline.

    python tests/benchmarks/bench_seeds.py [--pairs checkerboard/vae ...] [--steps N] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from klbench.config import expand_models, load_config
from klbench.forkserver import SOCKET_ENV, start_server, stop_server

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PAIRS = ["checkerboard/vae", "eight_gaussians/vae", "checkerboard/ddpm-linear", "mnist5k/vae",
                 "mnist5k/ddpm-linear"]
SEEDS = (0, 1, 2)


def train(folder: Path, dataset: str, model: str, seeds: tuple[int, ...], stack: bool, steps: int | None,
          server: str | None = None) -> float:
    """One `klbench train` process for these seeds; its wall seconds."""
    override = folder / "override.yaml"
    values: dict = {"train": {"stack_seeds": stack}}
    if steps:  # a model's own train block is the most specific: it beats every dataset and family budget
        base = expand_models(load_config([REPO / "config" / "config.yaml"]))[model]["base"]
        values["models"] = {base: {"train": {"steps": steps}}}
    override.write_text(yaml.safe_dump(values))
    command = [sys.executable, "-m", "klbench.cli", "train", "--config", str(REPO / "config" / "config.yaml"),
               "--config", str(override), "--dataset", dataset, "--model", model, "--no-progress"]
    for seed in seeds:
        command += ["--seed", str(seed), "--out", str(folder / f"seed{seed}")]
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    if server:
        env[SOCKET_ENV] = server
        command[:3] = [str(Path(sys.executable).parent / "klbench")]  # the thin client, as the workflow calls it
    start = time.perf_counter()
    subprocess.run(command, cwd=folder, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def train_seconds(folder: Path) -> float:
    return sum(json.loads((folder / f"seed{s}" / "timing.json").read_text())["wall"]["train_s"] for s in SEEDS)


def measure(dataset: str, model: str, steps: int | None, scratch: Path, server: str) -> dict[str, float]:
    sides = {}
    for name in ("processes", "one-by-one", "stacked", "forked", "forked stacked"):
        folder = scratch / name.replace(" ", "-")
        folder.mkdir()
        if name == "processes":
            wall = sum(train(folder, dataset, model, (seed,), stack=False, steps=steps) for seed in SEEDS)
        else:
            wall = train(folder, dataset, model, SEEDS, stack=name.endswith("stacked"), steps=steps,
                         server=server if name.startswith("forked") else None)
        sides[name] = {"wall": wall, "train": train_seconds(folder)}
    return {
        "wall processes": sides["processes"]["wall"], "wall one-by-one": sides["one-by-one"]["wall"],
        "wall stacked": sides["stacked"]["wall"], "wall forked": sides["forked"]["wall"],
        "wall forked stacked": sides["forked stacked"]["wall"],
        "train one-by-one": sides["one-by-one"]["train"], "train stacked": sides["stacked"]["train"],
        "job: processes / stacked": sides["processes"]["wall"] / sides["stacked"]["wall"],
        "job: processes / forked": sides["processes"]["wall"] / sides["forked"]["wall"],
        "job: processes / forked stacked": sides["processes"]["wall"] / sides["forked stacked"]["wall"],
        "train: one-by-one / stacked": sides["one-by-one"]["train"] / sides["stacked"]["train"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, help="dataset/model pairs of the default config")
    parser.add_argument("--steps", type=int, help="override the config's training steps (default: the config's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"3 seeds, {args.repeats} repeats, median (min-max); wall seconds of the whole job, training seconds "
          "from timing.json")
    with tempfile.TemporaryDirectory() as server_dir:
        server = start_server(Path(server_dir) / "fork_server.log", idle=600)
        try:
            report(args, server)
        finally:
            stop_server(server)


def report(args: argparse.Namespace, server: str) -> None:
    for pair in args.pairs:
        dataset, model = pair.split("/")
        rows = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as scratch:
                rows.append(measure(dataset, model, args.steps, Path(scratch), server))
        print(f"\n{pair}")
        for key in rows[0]:
            values = [row[key] for row in rows]
            print(f"  {key:30s} {statistics.median(values):8.2f}  ({min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()
