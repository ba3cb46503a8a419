"""Throughput of klbench's shared training loop vs a minimal plain-PyTorch loop.

Same data (mnist5k, binarized, 4000 training images), same architecture (the default
config's VAE: 784-128-128-(2x8) encoder, 8-128-128-784 Bernoulli decoder, SiLU), same
batch size, same thread count. klbench's side is the real path a job takes: `fit` with the
ledger accumulated every batch, the NaN check, and every epoch's train metrics sent to a
real MLflow SQLite store; held-out evaluation is timed separately, since the minimal loop
has none. The two loops alternate, and the ratio of median throughputs is printed.

    python tests/benchmarks/bench_train_loop.py [--epochs 5] [--repeats 5] [--threads 1]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from klbench.config import TrainConfig
from klbench.data import load_dataset
from klbench.models.vae import VAE, Config
from klbench.tracking import RunTracker, init_store
from klbench.train import fit, held_out_ledger

HIDDEN, LATENT, BATCH = [128, 128], 8, 128


def minimal_loop(x: torch.Tensor, epochs: int) -> None:
    """What one would write by hand: no ledger, no checks, no tracking."""
    encoder = nn.Sequential(nn.Linear(784, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 784))
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(BATCH):
            batch = x[idx]
            mu, logvar = encoder(batch).chunk(2, -1)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            distortion = nn.functional.binary_cross_entropy_with_logits(decoder(z), batch, reduction="none").sum(-1)
            rate = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
            loss = (rate + distortion).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def klbench_loop(x: torch.Tensor, x_test: torch.Tensor, epochs: int, tracker: RunTracker) -> None:
    config = Config(latent_dim=LATENT, hidden=HIDDEN, beta=1.0, k=1, prior="standard", prior_components=1,
                    decoder_scale="diagonal")
    model = VAE(config, 784, "binary")
    # eval_every > epochs: no held-out pass inside the timed loop (timed on its own below)
    fit(model, (x,), (x_test,), TrainConfig(epochs=epochs, batch_size=BATCH, lr=1e-3, eval_every=10**9),
        on_epoch=lambda epoch, means: tracker.log_metrics(
            {f"{s}/{k}": v for s, m in means.items() for k, v in m.items()}, step=epoch),
        progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
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
        klbench_loop(x, x_test, 1, tracker)  # warm-up of both paths
        minimal_loop(x, 1)
        times: dict[str, list[float]] = {"minimal": [], "klbench": []}
        for _ in range(args.repeats):
            for name in ("minimal", "klbench"):
                torch.manual_seed(0)
                start = time.perf_counter()
                minimal_loop(x, args.epochs) if name == "minimal" else klbench_loop(x, x_test, args.epochs, tracker)
                times[name].append(time.perf_counter() - start)
        tracker.finish("FINISHED")
        tracking_seconds = tracker.seconds

    model = VAE(Config(LATENT, HIDDEN, 1.0, 1, "standard", 1, "diagonal"), 784, "binary")
    start = time.perf_counter()
    held_out_ledger(model, (x_test,), samples=1)
    eval_seconds = time.perf_counter() - start

    throughput = {name: examples / statistics.median(t) for name, t in times.items()}
    print(f"threads={args.threads} epochs={args.epochs} repeats={args.repeats} batch={BATCH}")
    for name, value in throughput.items():
        print(f"{name:>8}: {value:10.0f} examples/s  (median of {[round(t, 3) for t in times[name]]} s)")
    print(f"MLflow time inside the klbench loops: {tracking_seconds:.3f} s in total")
    print(f"one held-out ledger pass (1000 images, per eval epoch): {eval_seconds:.3f} s")
    print(f"throughput ratio klbench / minimal: {throughput['klbench'] / throughput['minimal']:.3f}")


if __name__ == "__main__":
    main()
