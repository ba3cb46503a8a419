"""Throughput of klbench's shared training loop vs a minimal plain-PyTorch loop.

Same data (mnist5k, binarized, 4000 training images), same architecture (the default
config's VAE: 784-128-128-(2x8) encoder, 8-128-128-784 Bernoulli decoder, SiLU), same
batch size, same thread count. Four sides:

- minimal: what one would write by hand: a bare encoder/decoder (`MinimalVAE`), a plain
  loop, no ledger, no checks, no tracking, one held-out -ELBO pass at the end;
- loop:    klbench's `fit` driving that same `MinimalVAE`, with every epoch's metrics sent to
           a real MLflow SQLite store: the cost of the shared loop, ledger and logging alone;
- klbench: the real path a job takes: `fit` on klbench's `VAE` (logvar clamping, general
           (k, B, L) shapes), with the same tracking;
- stacked: three seeds of klbench's VAE trained as one stacked model (train.stack_seeds),
           its time divided by three: the cost per seed trained.

`fit` scores the held-out set after its last epoch, so every side does. The sides alternate,
so each repeat is a set measured under the same machine load; the headline is the median
over repeats of the per-repeat throughput ratio (robust to load that drifts over the run),
printed beside the ratio of median throughputs.

    python tests/benchmarks/bench_train_loop.py [--epochs 2] [--repeats 31] [--threads 1]
"""

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from klbench.batches import Passes
from klbench.config import TrainConfig
from klbench.data import load_dataset
from klbench.models.vae import VAE, Config
from klbench.seeds import OneSeed, StackedSeeds
from klbench.tracking import RunTracker, init_store
from klbench.train import fit

HIDDEN, LATENT, BATCH = [128, 128], 8, 128
STACKED = 3


class MinimalVAE(nn.Module):
    """The default VAE written by hand: the textbook ELBO and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                     nn.Linear(128, 2 * LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                     nn.Linear(128, 784))

    def ledger_terms(self, batch: Tensor, samples: int = 1) -> dict[str, Tensor]:
        mu, logvar = self.encoder(batch).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rate = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        distortion = nn.functional.binary_cross_entropy_with_logits(self.decoder(z), batch, reduction="none").sum(-1)
        return {"rate": rate, "distortion": distortion}

    def loss(self, batch: Tensor, batch_index: int, num_batches: int) -> tuple[Tensor, dict[str, Tensor]]:
        terms = self.ledger_terms(batch)
        return (terms["rate"] + terms["distortion"]).mean(), terms


def minimal_loop(x: Tensor, x_test: Tensor, epochs: int) -> None:
    """Plain PyTorch: the same steps, and a held-out pass half-way and at the end (as fit's two evaluations)."""
    model = MinimalVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps, step = epochs * math.ceil(len(x) / BATCH), 0
    while step < steps:
        for idx in torch.randperm(len(x)).split(BATCH):
            loss, _ = model.loss(x[idx], 0, 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step in (round(steps / 2), steps):
                with torch.no_grad():
                    model.loss(x_test, 0, 0)[0].item()
            if step == steps:
                break


def fit_loop(group: OneSeed | StackedSeeds, x: Tensor, x_test: Tensor, epochs: int, tracker: RunTracker) -> None:
    # the fewest evaluations fit makes: two, half-way and at the last step; a constant lr like the plain loop
    config = TrainConfig(steps=epochs * math.ceil(len(x) / BATCH), batch_size=BATCH, lr=1e-3, warmup=0,
                         schedule="constant", evaluations=2)
    fit(group, Passes(group, (x,), BATCH), (x_test,), config,
        on_eval=lambda step, per_seed: tracker.log_metrics(
            {f"{s}/{k}": v for s, m in per_seed[0].items() for k, v in m.items()}, step=step),
        progress=False)


def klbench_vae() -> VAE:
    config = Config(latent_dim=LATENT, hidden=HIDDEN, beta=1.0, k=1, prior="standard", prior_components=1,
                    decoder_scale="diagonal")
    return VAE(config, 784, "binary")


def stacked_vaes(seeds: int) -> StackedSeeds:
    return StackedSeeds([klbench_vae() for _ in range(seeds)], [torch.Generator().manual_seed(s) for s in range(seeds)],
                        list(range(seeds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist5k")
    x, x_test = data.x_train, data.x_test
    examples = args.epochs * len(x)

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        init_store(uri, ["bench"])
        tracker = RunTracker(uri, "bench", "bench/vae/seed0", {}, {"epochs": args.epochs})
        tracker.start()
        sides: dict[str, Callable[[int], None]] = {
            "minimal": lambda epochs: minimal_loop(x, x_test, epochs),
            "loop": lambda epochs: fit_loop(OneSeed(MinimalVAE(), 0), x, x_test, epochs, tracker),
            "klbench": lambda epochs: fit_loop(OneSeed(klbench_vae(), 0), x, x_test, epochs, tracker),
            # three seeds at once; its time is divided by 3 below: the cost per seed trained
            "stacked": lambda epochs: fit_loop(stacked_vaes(STACKED), x, x_test, epochs, tracker),
        }
        for run_side in sides.values():  # warm-up of every path
            run_side(1)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, run_side in sides.items():
                torch.manual_seed(0)
                start = time.perf_counter()
                run_side(args.epochs)
                times[name].append((time.perf_counter() - start) / (STACKED if name == "stacked" else 1))
        tracker.finish("FINISHED")
        tracking_seconds = tracker.seconds

    print(f"threads={args.threads} epochs={args.epochs} repeats={args.repeats} batch={BATCH}")
    for name, seconds in times.items():
        print(f"{name:>8}: {examples / statistics.median(seconds):10.0f} examples/s  "
              f"(median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s)")
    print(f"MLflow time inside the loop and klbench sides: {tracking_seconds:.3f} s in total")
    for name in ("loop", "klbench", "stacked"):
        paired = [m / t for m, t in zip(times["minimal"], times[name])]
        of_medians = statistics.median(times["minimal"]) / statistics.median(times[name])
        print(f"throughput ratio {name} / minimal: {statistics.median(paired):.3f} (median over {len(paired)} "
              f"repeats, from {min(paired):.3f} to {max(paired):.3f}; ratio of medians {of_medians:.3f})")


if __name__ == "__main__":
    main()
