"""Semi-supervised VAE "M2" as a KL ledger (Kingma, Rezende, Mohamed & Welling 2014,
"Semi-Supervised Learning with Deep Generative Models", sec. 2.2 and 3.1).

Generative model (Q, what we want), eq. 2:

    p(y) = Cat(y; 1/K)  (uniform over the K classes),  p(z) = N(z; 0, I),
    p(x | y, z) = d(x | h),  h = decoder([z, onehot(y)])   (likelihoods.DataLikelihood)

Inference model (P, what we have besides the data), eq. 4:

    q(z | x, y) = N(z; mu, diag(sigma^2)),  (mu, log sigma^2) = encoder([x, onehot(y)])
    q(y | x)    = Cat(y; softmax(classifier(x)))

For discrete data the encoder and decoder see the dequantized y_obs = (x + u) / L of
DataLikelihood.observe (the decoder's variable; its distortion then carries the D log L term
and bounds -log P(x)); binary and continuous x are used as they are. The classifier sees a
deterministic function of x, so that its predictions are reproducible: x itself, or for
discrete data (x + 1/2) / L, the centre of x's dequantization cell in the decoder's units.

Ledger terms, nats per example, unweighted; their sum is the negative ELBO.
Sign convention: here L(x, y) and U(x) are the bounds themselves, log p(x, y) >= L(x, y) and
log p(x) >= U(x), so the ledger sums to -L and -U. (The paper names the bounds -L(x, y) and
-U(x), i.e. its L and U are the losses, our -L and -U; the equations are the same.)

Labelled example (x, y), eq. 6:  -L(x, y) = rate + label_rate + distortion with

    rate       = KL(q(z|x,y) || p(z))                 closed form (kl.kl_normal_std_normal)
    label_rate = -log p(y) = log K                    the KL of the point mass on y to p(y)
    distortion = -E_{q(z|x,y)} log p(x | y, z)        Monte Carlo, reparameterized z

Unlabelled example x, eq. 7, with y summed out exactly over all K classes (never sampled):

    -U(x) = sum_k q(k|x) (-L(x, k)) - H(q(y|x))
          = rate + label_rate + distortion,
    rate       = sum_k q(k|x) KL(q(z|x,k) || p(z))
    label_rate = KL(q(y|x) || p(y)) = sum_k q(k|x) (log q(k|x) - log p(k))   (>= 0)
    distortion = sum_k q(k|x) E_{q(z|x,k)}[-log p(x | k, z)]

(the log K inside each -L(x, k) and the entropy H(q) together make label_rate).
-U(x) >= -log p(x), like a VAE's negative ELBO, and it is the held-out density bound this
family reports (`ledger_terms` treats every held-out example as unlabelled). The bound is
tight in q(y|x) exactly at the posterior q(k|x) = softmax_k L(x, k), where
-U(x) = -logsumexp_k L(x, k) (`combine_classes` is the one place the classes are combined).

Training objective, eqs. 8-9:  J^alpha = sum_labelled -L(x, y) + sum_unlabelled -U(x)
+ alpha_K * E_labelled[-log q(y|x)], with Kingma's alpha_K = 0.1 N. Per example and per
minibatch B_i that is

    mean_{B_i} (rate + label_rate + distortion)
      + (alpha N_train / N_labelled) * sum_{labelled n in B_i} -log q(y_n|x_n) / |B_i|,

alpha being the config's factor (default 0.1). An epoch's minibatches (equal size |B|)
hold every example once, so |B| times the sum of the step objectives over an epoch is
sum_n (rate + label_rate + distortion)_n + alpha N_train mean_labelled(-log q(y|x)): eq. 9
with alpha_K = alpha N_train. The classification term is a training term only (-L(x, y)
does not involve q(y|x), so without it q(y|x) would learn from unlabelled examples alone);
like beta in a beta-VAE it is not a ledger term, and the ledger never includes it.
One z draw per (example, class) in training.

Batches are (x, y), y = -1 marking an unlabelled example (`inputs`: the training split keeps
`labels` labels, balanced over the classes and fixed by `label_seed`, whatever the seed of
the run; the held-out splits keep all labels, for the classifier diagnostics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from klbench.classifier import ClassifierEvalConfig, classifier_diagnostics
from klbench.kl import kl_categorical, kl_normal_std_normal
from klbench.models.family import Diagnostics, Family, Rank, samples_run_figure
from klbench.models.likelihoods import LOGVAR_MAX, LOGVAR_MIN, DataLikelihood, mlp
from klbench.settings import setting

if TYPE_CHECKING:
    from klbench.data import Dataset
    from klbench.ledger import Ledger

# Training examples whose label is hidden carry this label.
UNLABELLED = -1
# The held-out ledger decodes K * samples rows per example; this many rows at most at once
# (16 samples, 10 classes and 1000 MNIST examples would otherwise hold ~0.5 GB per layer).
LEDGER_ROWS = 65_536


@dataclass(frozen=True)
class Config:
    """Hyperparameters of one M2 variant."""

    latent_dim: int = setting(16, "Dimensions of the continuous latent z.", minimum=1)
    hidden: list[int] = setting([256, 256], "Hidden widths of the encoder q(z|x,y); the decoder p(x|y,z) "
                                "uses them reversed.", items={"minimum": 1})
    classifier_hidden: list[int] = setting([256], "Hidden widths of the classifier q(y|x) (empty: linear).",
                                           items={"minimum": 1})
    labels: int = setting(100, "Labelled training examples (balanced across classes); the rest of the "
                          "training split is used unlabelled.", minimum=1)
    label_seed: int = setting(0, "Seed of the choice of labelled examples (the same for every training seed).",
                              minimum=0)
    alpha: float = setting(0.1, "Weight of the classification term per example, alpha in alpha*N of "
                           "Kingma et al. eq. 9 (training only, not a ledger term).", exclusiveMinimum=0)
    decoder_scale: Literal["diagonal", "isotropic", "amortized"] = setting(
        "diagonal", "Decoder std for continuous/discrete data: one per dimension, one shared, or amortized "
        "(a function of z and y).")


def combine_classes(log_q_y: Tensor, rate: Tensor, distortion: Tensor) -> dict[str, Tensor]:
    """The unlabelled terms of eq. 7 from per-class terms and q(y|x).

    log_q_y: log q(k|x), (B, K); rate, distortion: KL(q(z|x,k) || p(z)) and
    E_{q(z|x,k)}[-log p(x|k,z)] for every class k, (K, B). Returns (B,) each:
    rate = sum_k q_k rate_k, distortion = sum_k q_k distortion_k and
    label_rate = KL(q(y|x) || Uniform(K)), so that their sum is
    sum_k q_k (-L(x, k)) - H(q) with -L(x, k) = rate_k + distortion_k + log K.
    """
    q = log_q_y.exp().T  # (K, B)
    return {
        "rate": (q * rate).sum(0),
        "label_rate": kl_categorical(log_q_y, torch.zeros_like(log_q_y)),
        "distortion": (q * distortion).sum(0),
    }


class M2(nn.Module):
    """The M2 model and its ledger (module docstring)."""

    def __init__(self, config: Config, dim: int, kind: str, levels: int | None, classes: int, n_train: int):
        super().__init__()
        self.config, self.dim, self.kind, self.levels = config, dim, kind, levels
        self.classes, self.n_train, self.n_labelled = classes, n_train, config.labels
        latent = config.latent_dim
        self.likelihood = DataLikelihood(dim, kind, levels, config.decoder_scale)
        self.encoder = mlp([dim + classes, *config.hidden, 2 * latent])
        self.decoder = mlp([latent + classes, *reversed(config.hidden), self.likelihood.out_features])
        self.classifier = mlp([dim, *config.classifier_hidden, classes])

    # --- the pieces of P and Q -------------------------------------------------------

    def classifier_input(self, x: Tensor) -> Tensor:
        """What q(y|x) sees: x, or (x + 1/2) / L for discrete data (module docstring)."""
        if self.kind == "discrete":
            return (x + 0.5) / self.levels
        return x

    def log_predictive(self, x: Tensor) -> Tensor:
        """log q(y|x): (N, D) -> (N, K), on x's device."""
        device = self.classifier[0].weight.device
        logits = self.classifier(self.classifier_input(x.to(device)))
        return torch.log_softmax(logits, -1).to(x.device)

    def onehot(self, y: Tensor, like: Tensor) -> Tensor:
        """onehot(y) in like's dtype: (...,) -> (..., K)."""
        return F.one_hot(y, self.classes).to(like.dtype)

    def encode(self, x_obs: Tensor, y_onehot: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x,y) = N(mu, diag(exp(logvar))): x_obs (..., B, D), y_onehot (..., B, K) ->
        mu, logvar (..., B, L)."""
        mu, logvar = self.encoder(torch.cat([x_obs, y_onehot], -1)).chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def distortion(self, x_obs: Tensor, z: Tensor, y_onehot: Tensor) -> Tensor:
        """-log p(x|y,z) in nats: z (..., B, L), y_onehot broadcastable to (..., B, K) -> (..., B)."""
        y_onehot = y_onehot.expand(*z.shape[:-1], self.classes)
        out = self.decoder(torch.cat([z, y_onehot], -1))  # (..., B, D)
        return self.likelihood.nll(x_obs, out)

    def labelled_terms(self, x_obs: Tensor, y: Tensor, eps: Tensor) -> dict[str, Tensor]:
        """-L(x, y) of eq. 6 split into the ledger terms, (B,) each, for labels y (B,) and the
        noise eps (B, L) or (S, B, L) of z = mu + sigma * eps (distortion averaged over S)."""
        y_onehot = self.onehot(y, x_obs)  # (B, K)
        mu, logvar = self.encode(x_obs, y_onehot)  # (B, L)
        z = mu + eps * (0.5 * logvar).exp()  # (B, L) or (S, B, L)
        distortion = self.distortion(x_obs, z, y_onehot).reshape(-1, len(x_obs)).mean(0)  # (B,)
        return {
            "rate": kl_normal_std_normal(mu, logvar),
            "label_rate": torch.full_like(distortion, math.log(self.classes)),
            "distortion": distortion,
        }

    def per_class_terms(self, x_obs: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """KL(q(z|x,k) || p(z)) and E_{q(z|x,k)}[-log p(x|k,z)] for every class k, (K, B) each,
        from the noise eps (K, B, L) or (K, S, B, L) (distortion averaged over S)."""
        K, B = self.classes, len(x_obs)
        classes = self.onehot(torch.arange(K, device=x_obs.device), x_obs)  # (K, K)
        y_onehot = classes[:, None, :].expand(K, B, K)  # (K, B, K): class k for every example
        mu, logvar = self.encode(x_obs.expand(K, B, self.dim), y_onehot)  # (K, B, L)
        rate = kl_normal_std_normal(mu, logvar)  # (K, B)
        if eps.dim() == 4:  # (K, S, B, L): S draws per (class, example)
            mu, logvar, y_onehot = mu[:, None], logvar[:, None], y_onehot[:, None]
        z = mu + eps * (0.5 * logvar).exp()  # like eps
        distortion = self.distortion(x_obs, z, y_onehot).reshape(K, -1, B).mean(1)  # (K, B)
        return rate, distortion

    def unlabelled_terms(self, x_obs: Tensor, eps: Tensor, log_q_y: Tensor) -> dict[str, Tensor]:
        """-U(x) of eq. 7 split into the ledger terms, (B,) each, y summed out exactly:
        eps (K, B, L) or (K, S, B, L) as in per_class_terms, log_q_y = log q(y|x) (B, K)."""
        return combine_classes(log_q_y, *self.per_class_terms(x_obs, eps))

    # --- what the training loop and the evaluation call -------------------------------

    def loss(self, x: Tensor, y: Tensor, batch_index: int, num_batches: int,
             progress: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 9 per example (module docstring): the mean of the ledger terms (labelled rows
        -L(x, y), unlabelled rows -U(x)) plus the classification term, which is not a ledger
        term; and the detached ledger terms (B,). Every batch is weighted alike, so the batch
        position is unused."""
        B, L = len(x), self.config.latent_dim
        x_obs = self.likelihood.observe(x)
        log_q_y = self.log_predictive(x)  # (B, K)
        labelled = y != UNLABELLED  # (B,)
        y_known = y.clamp_min(0)  # any class for the unlabelled rows, whose labelled terms are dropped
        # Both sets of terms for every row, then each row's own: no boolean indexing, so no
        # host sync in the step; the labelled branch costs one decoder pass per row of K + 1.
        eps_l = torch.randn(B, L, dtype=x.dtype, device=x.device)
        eps_u = torch.randn(self.classes, B, L, dtype=x.dtype, device=x.device)
        as_labelled = self.labelled_terms(x_obs, y_known, eps_l)
        as_unlabelled = self.unlabelled_terms(x_obs, eps_u, log_q_y)
        terms = {name: torch.where(labelled, as_labelled[name], as_unlabelled[name]) for name in FAMILY.terms}
        neg_elbo = terms["rate"] + terms["label_rate"] + terms["distortion"]
        weight = self.config.alpha * self.n_train / self.n_labelled
        cross_entropy = -(log_q_y.gather(-1, y_known[:, None]).squeeze(-1) * labelled).sum()
        objective = neg_elbo.mean() + weight * cross_entropy / B
        return objective, {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def ledger_terms(self, x: Tensor, y: Tensor, samples: int) -> dict[str, Tensor]:
        """-U(x) terms of every example as unlabelled (y is ignored), with the distortion and
        the Monte Carlo z averaged over `samples` draws per class. Examples go through in
        chunks of at most LEDGER_ROWS decoder rows (K * samples per example)."""
        chunk = max(1, LEDGER_ROWS // (self.classes * samples))
        parts = []
        for x_part in x.split(chunk):
            x_obs = self.likelihood.observe(x_part)
            eps = torch.randn(self.classes, samples, len(x_part), self.config.latent_dim, dtype=x.dtype,
                              device=x.device)  # (K, S, B, L)
            parts.append(self.unlabelled_terms(x_obs, eps, self.log_predictive(x_part)))
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """x ~ p(y) p(z) p(x|y,z) in data units, (n, D), with y = 0, 1, ..., K-1, 0, ... in turn."""
        device = self.decoder[0].weight.device
        y = torch.arange(n, device=device) % self.classes
        z = torch.randn(n, self.config.latent_dim, device=device)
        out = self.decoder(torch.cat([z, self.onehot(y, z)], -1))
        return self.likelihood.sample(out)


def num_classes(dataset: Dataset) -> int:
    return int(dataset.y_train.max()) + 1


def build(config: Config, dataset: Dataset) -> M2:
    if dataset.target != "class":
        raise ValueError(f"M2 needs class labels; dataset {dataset.name} has {dataset.target} targets")
    inputs(dataset, "train", config)  # ValueError now if the split holds too few labels
    model = M2(config, dataset.dim, dataset.kind, dataset.levels, num_classes(dataset), len(dataset.x_train))
    # From log std 0 the decoder's std crawls down at about lr per step and the density does not
    # train: digits, 100 labels, 1,200 steps, -ELBO 204.7 nats (worse than uniform, 181.3) at rate
    # 0.01. From the data's std: 134.3. The strong decoder then ignores y unless the labels weigh
    # more (config.yaml sets alpha; accuracy 0.80 at alpha 0.1, 0.89 at 1, 0.90 at 3).
    model.likelihood.start_at_data_scale(model.decoder[-1], dataset.x_train)
    return model


def labelled_subset(y: Tensor, labels: int, classes: int, seed: int) -> Tensor:
    """Indices of `labels` examples of y (N,), labels // K of each class and one more of each
    of the first labels % K classes, drawn by a generator seeded with `seed` (sorted)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for k in range(classes):
        wanted = labels // classes + (k < labels % classes)
        members = torch.nonzero(y == k).flatten()
        if wanted > len(members):
            raise ValueError(f"labels={labels} needs {wanted} examples of class {k}; the training split has "
                             f"{len(members)}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:wanted]])
    return torch.cat(chosen).sort().values


def inputs(dataset: Dataset, split: str, config: Config) -> tuple[Tensor, Tensor]:
    """(x, y) of a split; in the training split every label but `labelled_subset`'s is -1."""
    x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
    if split != "train":
        return x, y
    if config.labels > len(y):
        raise ValueError(f"labels ({config.labels}) exceeds the {len(y)} training examples")
    keep = labelled_subset(y, config.labels, num_classes(dataset), config.label_seed)
    masked = torch.full_like(y, UNLABELLED)
    masked[keep] = y[keep]
    return x, masked


@torch.no_grad()
def diagnose(model: M2, dataset: Dataset, ledger: Ledger, config: ClassifierEvalConfig, out_dir: Path) -> Diagnostics:
    """The classifier q(y|x) on the test split (classifier.py) and the number of labels it had."""
    values = classifier_diagnostics(model.log_predictive, dataset.x_test, dataset.y_test, config.ece_bins, out_dir)
    values["labels"] = model.n_labelled
    return Diagnostics(values=values)


FAMILY = Family(
    name="m2",
    terms=("rate", "label_rate", "distortion"),
    data_kinds=("continuous", "binary", "discrete"),
    targets=("class",),
    ranks=(Rank("density", "neg_elbo"), Rank("classification", "test_log_lik", higher_is_better=True)),
    config=Config,
    build=build,
    diagnose=diagnose,
    run_figure=samples_run_figure,
    evaluate=ClassifierEvalConfig,
    headline=("accuracy", "test_log_lik", "ece"),
    inputs=inputs,
    infinite_data=False,  # a fixed set of labelled examples among N_train
)
