"""The KL ledger: a model's negative ELBO split into named per-example terms.

Contract (DESIGN.md): every family reports, per example, the *unweighted* terms of its
KL objective in nats; their sum is the negative ELBO. Training may weight the terms
(beta, annealing); the ledger never does, so every run is comparable. The total is summed
here and nowhere else.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

@dataclass(frozen=True)
class Ledger:
    """Per-example terms, name -> tensor of shape (N,), in nats."""

    terms: dict[str, Tensor]

    def __post_init__(self) -> None:
        sizes = {name: value.shape for name, value in self.terms.items()}
        if not self.terms or len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
            raise ValueError(f"ledger terms must be non-empty 1-D tensors of one length, got {sizes}")

    @property
    def neg_elbo(self) -> Tensor:
        """-ELBO per example = the sum of the terms, shape (N,), float64.

        Summed in float64 so that mean(neg_elbo) = sum of the term means to double
        precision, the identity every table relies on."""
        return torch.stack([value.double() for value in self.terms.values()]).sum(0)

    def means(self) -> dict[str, float]:
        """Mean of every term and of neg_elbo over examples (float64), nats per example."""
        out = {name: value.double().mean().item() for name, value in self.terms.items()}
        out["neg_elbo"] = self.neg_elbo.mean().item()
        return out

    @classmethod
    def cat(cls, parts: list["Ledger"]) -> "Ledger":
        """Concatenate batch ledgers into one over the whole split."""
        names = list(parts[0].terms)
        return cls({name: torch.cat([part.terms[name] for part in parts]) for name in names})


class RunningMeans:
    """Accumulates term sums on the device without a host sync per batch, per seed.

    Terms arrive with a leading seed axis, (S, B). One `.item()` per batch costs a
    synchronisation (and on CPU a Python round trip per term); summing into a tensor and
    reading it once per evaluation keeps the loop as fast as a bare PyTorch loop.
    """

    def __init__(self) -> None:
        self._names: tuple[str, ...] = ()
        self._sums: Tensor | None = None  # (n_terms, S), in the order of _names
        self._count = 0

    def add(self, terms: dict[str, Tensor]) -> None:
        # one stack, one reduction and one in-place add per batch, whatever the number of terms
        batch_sums = torch.stack(list(terms.values())).detach().sum(-1)  # (n_terms, S)
        if self._sums is None:
            self._names, self._sums = tuple(terms), batch_sums
        else:
            self._sums += batch_sums
        self._count += next(iter(terms.values())).shape[-1]

    def means(self) -> list[dict[str, float]]:
        """Per seed: the mean of every term over the examples seen, and their sum neg_elbo."""
        out = []
        for values in (self._sums.double() / self._count).T.tolist():
            means = dict(zip(self._names, values))
            means["neg_elbo"] = sum(values)
            out.append(means)
        return out


def bits_per_dim(nats_per_example: float, dim: int) -> float:
    """Convert nats per example to bits per dimension: nats / (D ln 2)."""
    return nats_per_example / (dim * math.log(2.0))


def derived_quantities(
    neg_elbo: Tensor,
    dim: int,
    image_like: bool,
    entropy: float | Tensor | None,
    nll_bound: Tensor | None = None,
) -> dict[str, float]:
    """Quantities derived from a held-out ledger (nats per example unless `bpd`).

    neg_elbo: (N,) per example. entropy: the data entropy H, either the true value or,
    where the exact density is known, -log p(x) per example (N,) so that the gaps are
    paired estimates with far less noise. nll_bound: a tighter bound on -log q(x) (the
    IWAE bound at the largest k) for the first n <= N examples.

    - bpd = neg_elbo / (D ln 2), for image-like data.
    - kl_total = neg_elbo - H: KL(P||Q) over the joint, >= 0 up to estimation noise.
    - inference_gap = neg_elbo - nll_bound and model_gap = nll_bound - H, both on the
      first n examples; with n = N, kl_total = inference_gap + model_gap exactly.
    """
    mean = lambda t: t.double().mean().item()  # noqa: E731
    out = {"neg_elbo": mean(neg_elbo)}
    if image_like:
        out["bpd"] = bits_per_dim(out["neg_elbo"], dim)
    per_example_entropy = None
    if entropy is not None:
        per_example_entropy = entropy if isinstance(entropy, Tensor) else torch.full_like(neg_elbo, entropy)
        out["data_entropy"] = mean(per_example_entropy)
        out["kl_total"] = out["neg_elbo"] - out["data_entropy"]
    if nll_bound is not None:
        n = nll_bound.shape[0]
        out["nll_bound"] = mean(nll_bound)
        out["inference_gap"] = mean(neg_elbo[:n]) - out["nll_bound"]
        if per_example_entropy is not None:
            out["model_gap"] = out["nll_bound"] - mean(per_example_entropy[:n])
    return out
