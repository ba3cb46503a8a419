"""Training throughput: klbench against pythae on the same VAE, data, batch size and epochs.

Both train a Bernoulli VAE with the encoder 784-512-512-(2x20) and the decoder 20-512-512-784
(SiLU) on mnist5k's 4000 binarized training images with Adam (lr 1e-3), batch 128, and score
the 1000 held-out images after every epoch:

- klbench: `fit` on klbench's VAE, every epoch's train and test ledger sent to a real MLflow
           SQLite store (what a job does);
- pythae:  pythae's `TrainingPipeline` with the same encoder and decoder networks (klbench's
           `mlp`) as its BaseEncoder/BaseDecoder, `reconstruction_loss="bce"`, its eval set the held-out images.

pythae is not a klbench dependency; install it beside klbench for this benchmark only:

    pip install pythae                     # with torch==2.13.0 pinned as in the README
    python tests/benchmarks/bench_pythae.py [--epochs 3] [--repeats 5] [--threads 1]

The sides alternate within each repeat; the headline is the median over repeats of the
per-repeat ratio pythae seconds / klbench seconds (above 1: klbench is faster).
"""

import argparse
import math
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from klbench.batches import Passes
from klbench.config import TrainConfig
from klbench.data import load_dataset
from klbench.models.likelihoods import mlp
from klbench.models.vae import VAE, Config
from klbench.seeds import OneSeed
from klbench.tracking import RunTracker, init_store
from klbench.train import fit

HIDDEN, LATENT, BATCH, LR = [512, 512], 20, 128, 1e-3


def klbench_seconds(x: torch.Tensor, x_test: torch.Tensor, epochs: int, scratch: Path) -> float:
    torch.manual_seed(0)
    model = VAE(Config(latent_dim=LATENT, hidden=HIDDEN), 784, "binary")
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    init_store(uri, ["vae"])
    tracker = RunTracker(uri, "vae", "bench/pythae/seed0", {}, {})
    tracker.start()

    def on_eval(step: int, per_seed: list) -> None:
        tracker.log_metrics({f"{split}/{k}": v for split, values in per_seed[0].items() for k, v in values.items()},
                            step=step)

    # pythae's trainer: a constant learning rate and a held-out pass after every epoch
    steps = epochs * math.ceil(len(x) / BATCH)
    config = TrainConfig(steps=steps, batch_size=BATCH, lr=LR, warmup=0, schedule="constant",
                         evaluations=max(2, epochs))
    start = time.perf_counter()
    group = OneSeed(model, seed=0)
    fit(group, Passes(group, (x,), BATCH), (x_test,), config, on_eval=on_eval, progress=False)
    seconds = time.perf_counter() - start
    tracker.finish("FINISHED")
    return seconds


def pythae_seconds(x: torch.Tensor, x_test: torch.Tensor, epochs: int, scratch: Path) -> float:
    from pythae.models import VAE as PythaeVAE
    from pythae.models import VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig

    class Encoder(BaseEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp([784, *HIDDEN, 2 * LATENT])

        def forward(self, x):
            mu, log_var = self.net(x.reshape(len(x), -1)).chunk(2, -1)
            return ModelOutput(embedding=mu, log_covariance=log_var)

    class Decoder(BaseDecoder):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp([LATENT, *reversed(HIDDEN), 784])

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))  # pythae's bce takes probabilities

    torch.manual_seed(0)
    config = VAEConfig(input_dim=(784,), latent_dim=LATENT, reconstruction_loss="bce")
    model = PythaeVAE(config, encoder=Encoder(), decoder=Decoder())
    training = BaseTrainerConfig(output_dir=str(scratch / "pythae"), num_epochs=epochs, learning_rate=LR,
                                 per_device_train_batch_size=BATCH, per_device_eval_batch_size=1000,
                                 optimizer_cls="Adam", no_cuda=True)
    pipeline = TrainingPipeline(training_config=training, model=model)
    start = time.perf_counter()
    pipeline(train_data=x, eval_data=x_test)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("pythae").setLevel(logging.WARNING)
    data = load_dataset("mnist5k")
    x, x_test = data.x_train, data.x_test
    ratios, seconds = [], {"klbench": [], "pythae": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            ours = klbench_seconds(x, x_test, args.epochs, Path(scratch))
            theirs = pythae_seconds(x, x_test, args.epochs, Path(scratch))
        seconds["klbench"].append(ours)
        seconds["pythae"].append(theirs)
        ratios.append(theirs / ours)
        print(f"klbench {ours:.2f} s, pythae {theirs:.2f} s, ratio {theirs / ours:.2f}", flush=True)
    print(f"\n{args.epochs} epochs of {len(x)} images, batch {BATCH}, {args.threads} thread(s), {args.repeats} repeats")
    for side, values in seconds.items():
        print(f"  {side:8s} median {statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})")
    print(f"  pythae / klbench: median per-repeat ratio {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
