"""Regression datasets: the toy curve's formula, ranges and streams; diabetes' split and standardization."""

import math

import numpy as np
import pytest
import torch

from klbench.data import PROFILES, load_dataset
from klbench.data.regression import CURVE_NOISE, OOD_RANGES, TRAIN_RANGE, curve
from klbench.data.split import generators
from klbench.errors import DataError


@pytest.fixture(scope="module")
def toy():
    return load_dataset("toy_curve")


@pytest.fixture(scope="module")
def diabetes():
    return load_dataset("diabetes")


@pytest.mark.parametrize("name, n_train, n_test, dim", [("toy_curve", 1024, 512, 1), ("diabetes", 353, 89, 10)])
def test_shapes_kinds_and_profile(name, n_train, n_test, dim):
    data = load_dataset(name)
    assert data.kind == "continuous" and data.target == "real" and PROFILES[name] == (data.kind, data.target)
    assert data.x_train.shape == (n_train, dim) and data.x_test.shape == (n_test, dim) and data.shape == (dim,)
    assert data.y_train.shape == (n_train,) and data.y_test.shape == (n_test,)
    assert all(t.dtype == torch.float32 for t in (data.x_train, data.x_test, data.y_train, data.y_test))


@pytest.mark.parametrize("name", ["toy_curve", "diabetes"])
def test_loading_twice_gives_identical_data_and_the_seed_changes_it(name):
    first, again, other = load_dataset(name), load_dataset(name), load_dataset(name, seed=1)
    assert first.data_hash == again.data_hash != other.data_hash
    for field in ("x_train", "x_test", "y_train", "y_test"):
        assert torch.equal(getattr(first, field), getattr(again, field))


def test_toy_curve_targets_follow_blundells_formula_with_the_documented_noise(toy):
    # Redraw from the documented streams: x ~ U(0, 0.5), eps ~ N(0, 0.02^2), y = curve(x, eps).
    train_generator, _, _ = generators(0, 3)
    x = 0.5 * torch.rand(1024, generator=train_generator, dtype=torch.float64)
    eps = CURVE_NOISE * torch.randn(1024, generator=train_generator, dtype=torch.float64)
    expected = x + 0.3 * torch.sin(2 * math.pi * (x + eps)) + 0.3 * torch.sin(4 * math.pi * (x + eps)) + eps
    torch.testing.assert_close(toy.x_train[:, 0], x.float())
    torch.testing.assert_close(toy.y_train, expected.float())
    # without noise the curve passes through its textbook points
    zero = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(curve(torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64), zero),
                               torch.tensor([0.0, 0.25 + 0.3, 0.5], dtype=torch.float64), atol=1e-12, rtol=0)


def test_toy_curve_ood_inputs_lie_outside_the_training_range(toy):
    low, high = TRAIN_RANGE
    for x in (toy.x_train, toy.x_test):
        assert low <= x.min() and x.max() <= high
    gap = torch.minimum((toy.x_ood - low).abs(), (toy.x_ood - high).abs())
    assert ((toy.x_ood < low) | (toy.x_ood > high)).all() and gap.min() >= 0.1 - 1e-6
    assert toy.x_ood.min() == OOD_RANGES[0][0] and toy.x_ood.max() == OOD_RANGES[1][1]
    assert toy.y_ood.shape == (len(toy.x_ood),)


def test_toy_curve_test_set_does_not_depend_on_n_train(toy):
    smaller = load_dataset("toy_curve", n_train=64)
    assert torch.equal(smaller.x_test, toy.x_test) and torch.equal(smaller.y_ood, toy.y_ood)


def test_toy_curve_rejects_bad_sizes():
    with pytest.raises(DataError, match="option 'n_train' must be a positive integer"):
        load_dataset("toy_curve", n_train=0)


def test_diabetes_is_standardized_with_train_statistics(diabetes):
    for t in (diabetes.x_train, diabetes.y_train):
        torch.testing.assert_close(t.mean(0), torch.zeros_like(t.mean(0)), atol=1e-5, rtol=0)
        torch.testing.assert_close(t.std(0, correction=0), torch.ones_like(t.mean(0)), atol=1e-5, rtol=0)
    # the test split is scaled with the train statistics, so its own are close to but not exactly 0 and 1
    assert 0 < abs(diabetes.y_test.mean().item()) < 0.5


def test_diabetes_is_sklearns_data_and_undoes_to_original_units(diabetes):
    from sklearn.datasets import load_diabetes

    features, targets = load_diabetes(scaled=False, return_X_y=True)
    y = torch.cat([diabetes.y_train, diabetes.y_test]).double() * diabetes.split["y_std"] + diabetes.split["y_mean"]
    # the split is a permutation of sklearn's rows: the same multiset of targets
    np.testing.assert_allclose(np.sort(y.numpy()), np.sort(targets), atol=1e-3)
    assert diabetes.split["n_train"] + diabetes.split["n_test"] == len(features) == 442
