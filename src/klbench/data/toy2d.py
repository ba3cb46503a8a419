"""Two-dimensional toy distributions with a known density: eight_gaussians, checkerboard, two_moons.

Each loader draws train, test and validation sets from the distribution with generators
derived from the data seed (independent streams), so the sets are identical on every call.
By default (n_train None) a run trains on fresh draws from the exact sampler for every batch
(infinite data): x_train is then a fixed reference draw of N_TRAIN points (statistics, and
families that need a finite training set), and the validation set is a draw of its own. With
an integer n_train the training set is that finite draw and the validation split is cut from it. Each carries its exact log-density (two_moons: up to quadrature error, below 1e-10
nats) and the true differential entropy in nats.
Labels are the mixture component that generated each point. Entropies that need Monte
Carlo use a fixed seed of their own (they belong to the distribution, not to the data seed)
and are cached in-process.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from klbench.data.dataset import Dataset, hash_tensors
from klbench.data.split import check_count, check_seed, generators

N_TRAIN, N_TEST, N_VAL = 10_000, 2_000, 2_000
ENTROPY_SEED = 2_718_281

Sampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _monte_carlo_entropy(sample: Sampler, log_density: Callable[[torch.Tensor], torch.Tensor], n: int) -> tuple[float, float]:
    """H = E_p[-log p(x)] estimated from n float64 draws: (sample mean, its standard error)."""
    x, _ = sample(n, torch.Generator().manual_seed(ENTROPY_SEED))
    nll = -log_density(x)
    return nll.mean().item(), (nll.std() / math.sqrt(n)).item()


def _toy(name: str, sample: Sampler, log_density: Callable[[torch.Tensor], torch.Tensor], entropy: tuple[float, float],
         n_train: int | None, n_test: int, n_val: int, seed: int,
         on_support: Callable[[np.ndarray], dict[str, float]]) -> Dataset:
    infinite = n_train is None
    n_train = N_TRAIN if infinite else check_count(name, "n_train", n_train)
    n_test = check_count(name, "n_test", n_test)
    n_val = check_count(name, "n_val", n_val)
    seed = check_seed(name, seed)
    train_generator, test_generator, val_generator = generators(seed, 3)
    x_train, y_train = sample(n_train, train_generator)
    x_test, y_test = sample(n_test, test_generator)
    x_train, x_test = x_train.float(), x_test.float()
    x_val = y_val = None
    split = {"n_train": n_train, "n_test": n_test, "seed": seed,
             "how": "train and test drawn independently from the distribution (separate seeded streams)"}
    if infinite:
        x_val, y_val = sample(n_val, val_generator)
        x_val = x_val.float()
        split = {"n_train": None, "n_test": n_test, "seed": seed,
                 "how": "training batches drawn fresh from the exact sampler (infinite data); test and "
                        "validation drawn once from separate seeded streams",
                 "reference_train_draw": n_train, "validation": {"n_val": n_val, "how": "own seeded stream"}}
    return Dataset(
        name=name, kind="continuous", x_train=x_train, x_test=x_test, shape=(2,), split=split,
        data_hash=hash_tensors(x_train, x_test, y_train, y_test, x_val, y_val),
        y_train=y_train, y_test=y_test, entropy=entropy[0], entropy_se=entropy[1], log_density=log_density,
        x_val=x_val, y_val=y_val, sampler=_float32(sample) if infinite else None, on_support=on_support,
    )


def _float32(sample: Sampler) -> Sampler:
    def draw(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sample(n, generator)
        return x.float(), y

    return draw


# --- eight_gaussians ---------------------------------------------------------------------------

RING_RADIUS, RING_STD, RING_COMPONENTS = 2.0, 0.2, 8
_ring_angles = 2 * math.pi * torch.arange(RING_COMPONENTS, dtype=torch.float64) / RING_COMPONENTS
RING_CENTERS = RING_RADIUS * torch.stack([_ring_angles.cos(), _ring_angles.sin()], dim=1)


def _ring_sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randint(RING_COMPONENTS, (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return RING_CENTERS[k] + RING_STD * noise, k


def eight_gaussians_log_density(x: torch.Tensor) -> torch.Tensor:
    """log p(x) = logsumexp_k [-|x - mu_k|^2 / (2 s^2)] - log 8 - log(2 pi s^2), float64, (N, 2) -> (N,)."""
    x = x.to(torch.float64)
    norm = math.log(RING_COMPONENTS) + math.log(2 * math.pi * RING_STD**2)
    d2 = ((x[:, None, :] - RING_CENTERS) ** 2).sum(-1)
    return torch.logsumexp(-d2 / (2 * RING_STD**2), dim=1) - norm


@functools.cache
def _ring_entropy() -> tuple[float, float]:
    return _monte_carlo_entropy(_ring_sample, eight_gaussians_log_density, 200_000)


# A sample is on a Gaussian mode within 3 standard deviations of its centre; a mode is covered
# when at least a quarter of its fair share (1/8) of the samples lies on it.
MODE_RADIUS, MODE_COVERED = 3 * RING_STD, 0.25 / RING_COMPONENTS


def eight_gaussians_support(samples: np.ndarray) -> dict[str, float]:
    """on_support: the share of samples within 3 s of a centre; modes_covered: how many of the
    8 modes hold at least a quarter of their fair share (1/32) of the samples."""
    distance = np.linalg.norm(samples[:, None, :] - RING_CENTERS.numpy()[None], axis=-1)  # (n, 8)
    on_mode = distance <= MODE_RADIUS
    return {"on_support": float(on_mode.any(1).mean()),
            "modes_covered": int((on_mode.mean(0) >= MODE_COVERED).sum())}


def eight_gaussians(n_train: int | None = None, n_test: int = N_TEST, n_val: int = N_VAL, seed: int = 0) -> Dataset:
    """Equal mixture of 8 isotropic Gaussians: p(x) = (1/8) sum_k N(x; mu_k, s^2 I).

    Centers mu_k = 2 (cos(2 pi k/8), sin(2 pi k/8)), s = 0.2. Entropy by Monte Carlo with the
    exact log-density (200,000 seeded float64 draws; standard error about 0.002). The modes
    barely overlap: the true value is about 4e-4 nats below log 8 + 1 + log(2 pi s^2) = 1.6981.
    """
    return _toy("eight_gaussians", _ring_sample, eight_gaussians_log_density, _ring_entropy(), n_train, n_test, n_val,
                seed, eight_gaussians_support)


# --- checkerboard ------------------------------------------------------------------------------

# Lower-left corners (i, j) of the black unit squares of the 4x4 board on [-2, 2]^2: i + j even.
BOARD_CORNERS = torch.tensor([(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0], dtype=torch.float64)


def _board_sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randint(len(BOARD_CORNERS), (n,), generator=generator)
    return BOARD_CORNERS[k] + torch.rand(n, 2, generator=generator, dtype=torch.float64), k


def checkerboard_log_density(x: torch.Tensor) -> torch.Tensor:
    """log p(x) = -log 8 on the black squares, -inf elsewhere, float64, (N, 2) -> (N,).

    Squares are taken closed: their edges are a null set, and counting them in keeps a
    sample that float32 rounding pushes onto an edge from getting density zero.
    """
    x = x.to(torch.float64)[:, None, :]
    inside = ((x >= BOARD_CORNERS) & (x <= BOARD_CORNERS + 1)).all(-1).any(-1)
    return torch.full(inside.shape, -math.log(len(BOARD_CORNERS)), dtype=torch.float64).masked_fill_(~inside, -math.inf)


def checkerboard_support(samples: np.ndarray) -> dict[str, float]:
    """on_support: the share of samples inside the black squares."""
    inside = np.isfinite(checkerboard_log_density(torch.from_numpy(np.asarray(samples, dtype=np.float64))).numpy())
    return {"on_support": float(inside.mean())}


def checkerboard(n_train: int | None = None, n_test: int = N_TEST, n_val: int = N_VAL, seed: int = 0) -> Dataset:
    """Uniform on the 8 black unit squares of a 4x4 board on [-2, 2]^2 (floor(x) + floor(y) even).

    p(x) = 1/8 on the black squares (total area 8), so H = log 8 exactly (entropy_se 0).
    """
    return _toy("checkerboard", _board_sample, checkerboard_log_density, (math.log(8), 0.0), n_train, n_test, n_val,
                seed, checkerboard_support)


# --- two_moons ---------------------------------------------------------------------------------

MOON_NOISE = 0.1
# Moon B = MOON_B_OFFSET - (cos t, sin t): moon A reflected through the point (0.5, 0.25).
MOON_B_OFFSET = torch.tensor([1.0, 0.5], dtype=torch.float64)
# Quadrature over theta in [0, pi]: composite Gauss-Legendre, 100 panels x 20 nodes = 2000 nodes.
# Gauss-Legendre (unlike the midpoint rule) stays accurate when the integrand peaks sharply at
# an end of the arc, which it does for points beyond the moons' tips.
QUADRATURE_PANELS, QUADRATURE_ORDER = 100, 20
# Points per block of two_moons_log_density: its (2 x block, 2000) table stays near 32 MB.
CHUNK = 1024


def _moon_quadrature() -> torch.Tensor:
    """(3, M): rows cos(theta_i), sin(theta_i), log w_i, where (1/pi) int_0^pi f ~ sum_i w_i f(theta_i)."""
    nodes, weights = np.polynomial.legendre.leggauss(QUADRATURE_ORDER)  # on [-1, 1], weights sum to 2
    width = math.pi / QUADRATURE_PANELS
    starts = width * np.arange(QUADRATURE_PANELS)[:, None]
    theta = torch.from_numpy((starts + width * (nodes + 1) / 2).ravel())
    log_w = torch.from_numpy(np.log(np.tile(weights, QUADRATURE_PANELS) / (2 * QUADRATURE_PANELS)))
    return torch.stack([theta.cos(), theta.sin(), log_w])


MOON_QUADRATURE = _moon_quadrature()


def _moons_sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    moon = torch.randint(2, (n,), generator=generator)
    theta = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    arc = torch.stack([theta.cos(), theta.sin()], dim=1)
    on_curve = torch.where(moon[:, None] == 0, arc, MOON_B_OFFSET - arc)
    return on_curve + MOON_NOISE * torch.randn(n, 2, generator=generator, dtype=torch.float64), moon


def two_moons_log_density(x: torch.Tensor) -> torch.Tensor:
    """log p(x) for two_moons, exact up to quadrature over theta, float64, (N, 2) -> (N,).

    p(x) = (1/2) sum_moons (1/pi) int_0^pi N(x; m(theta), s^2 I) dtheta, with the theta
    integral by composite Gauss-Legendre quadrature (100 panels of 20 nodes; weights w_i sum
    to 1). It agrees with an 80,001-node Simpson rule to 1e-10 nats or better, also far off the
    moons, and stays finite far from them.
    With z = x (moon A) or z = (1, 0.5) - x (moon B), |z - u(theta)|^2 = |z|^2 + 1 - 2 z.u(theta),
    so the log of the quadrature sum is logsumexp_i(z.u(theta_i) / s^2 + log w_i) - (|z|^2 + 1) / (2 s^2).
    """
    x = x.to(torch.float64)
    norm = math.log(2) + math.log(2 * math.pi * MOON_NOISE**2)
    out = []
    for block in x.split(CHUNK):
        z = torch.cat([block, MOON_B_OFFSET - block])  # (2B, 2): moon A rows, then moon B rows
        # One matmul gives z.u(theta_i) / s^2 + log w_i; then logsumexp by hand, in place:
        # this (2B, M) table is the whole cost of the entropy estimate.
        a = torch.cat([z / MOON_NOISE**2, z.new_ones(len(z), 1)], dim=1) @ MOON_QUADRATURE
        top = a.amax(1, keepdim=True)
        per_node = a.sub_(top).exp_().sum(1).log_() + top[:, 0]
        per_moon = (per_node - ((z * z).sum(1) + 1) / (2 * MOON_NOISE**2)).view(2, -1)
        out.append(torch.logsumexp(per_moon, dim=0) - norm)
    return torch.cat(out)


@functools.cache
def _moons_entropy() -> tuple[float, float]:
    return _monte_carlo_entropy(_moons_sample, two_moons_log_density, 40_000)


def _arc_distance(z: np.ndarray) -> np.ndarray:
    """Distance of points z (n, 2) to the upper unit half circle {(cos t, sin t): t in [0, pi]}."""
    to_circle = np.abs(np.linalg.norm(z, axis=1) - 1)
    to_ends = np.minimum(np.linalg.norm(z - [1, 0], axis=1), np.linalg.norm(z + [1, 0], axis=1))
    return np.where(z[:, 1] >= 0, to_circle, to_ends)


def two_moons_support(samples: np.ndarray) -> dict[str, float]:
    """on_support: the share of samples within 3 noise standard deviations of either moon's arc."""
    distance = np.minimum(_arc_distance(samples), _arc_distance(MOON_B_OFFSET.numpy() - samples))
    return {"on_support": float((distance <= 3 * MOON_NOISE).mean())}


def two_moons(n_train: int | None = None, n_test: int = N_TEST, n_val: int = N_VAL, seed: int = 0) -> Dataset:
    """Two noisy half circles (sklearn's geometry) as a proper distribution.

    Pick moon A or B with probability 1/2 and theta ~ U(0, pi); moon A is at (cos theta, sin theta),
    moon B at (1 - cos theta, 0.5 - sin theta); add N(0, 0.1^2) noise per coordinate.
    log_density is exact up to quadrature (see two_moons_log_density); entropy by Monte Carlo
    with it (40,000 seeded float64 draws, cached in-process).
    """
    return _toy("two_moons", _moons_sample, two_moons_log_density, _moons_entropy(), n_train, n_test, n_val, seed,
                two_moons_support)
