import math

import pytest
import torch

from klbench.ledger import Ledger, RunningMeans, bits_per_dim, derived_quantities


def test_neg_elbo_is_the_sum_of_terms():
    terms = {"rate": torch.tensor([1.0, 2.0, 3.0]), "distortion": torch.tensor([10.0, 20.0, 30.0])}
    ledger = Ledger(terms)
    torch.testing.assert_close(ledger.neg_elbo, torch.tensor([11.0, 22.0, 33.0], dtype=torch.float64))
    means = ledger.means()
    assert means["neg_elbo"] == pytest.approx(means["rate"] + means["distortion"]) == pytest.approx(22.0)


def test_neg_elbo_mean_equals_sum_of_term_means_to_double_precision():
    # float32 terms of very different sizes: a float32 sum would lose ~1e-7 relative.
    generator = torch.Generator().manual_seed(0)
    terms = {"rate": torch.rand(5000, generator=generator) * 1e-3,
             "distortion": 500 + torch.randn(5000, generator=generator)}
    means = Ledger(terms).means()
    assert means["neg_elbo"] == pytest.approx(means["rate"] + means["distortion"], rel=1e-13)


def test_ledger_rejects_mismatched_or_empty_terms():
    with pytest.raises(ValueError):
        Ledger({"rate": torch.zeros(3), "distortion": torch.zeros(4)})
    with pytest.raises(ValueError):
        Ledger({})
    with pytest.raises(ValueError):
        Ledger({"rate": torch.zeros(3, 2)})


def test_cat_and_running_means_agree_with_full_ledger():
    """Batch ledgers concatenate to the full one; running means over a leading seed axis (S, B)
    equal each seed's full-ledger means."""
    g = torch.Generator().manual_seed(0)
    seeds = 3
    full = {"prior": torch.rand(seeds, 103, generator=g), "diffusion": torch.rand(seeds, 103, generator=g)}
    parts, running = [], RunningMeans()
    for i in range(0, 103, 25):
        batch = {k: v[:, i : i + 25] for k, v in full.items()}
        parts.append(Ledger({k: v[0] for k, v in batch.items()}))
        running.add(batch)
    expected = Ledger({k: v[0] for k, v in full.items()}).means()
    for name, value in Ledger.cat(parts).means().items():
        assert value == pytest.approx(expected[name], rel=1e-6)
    per_seed = running.means()
    assert len(per_seed) == seeds
    for s, means in enumerate(per_seed):
        for name, value in Ledger({k: v[s] for k, v in full.items()}).means().items():
            assert means[name] == pytest.approx(value, rel=1e-6)


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    assert bits_per_dim(100.0, 10) == pytest.approx(100.0 / (10 * math.log(2)))


def test_derived_quantities_gaps_add_up_to_kl_total():
    neg_elbo = torch.tensor([5.0, 6.0, 7.0, 8.0])
    nll_bound = torch.tensor([4.5, 5.0, 6.5, 7.0])
    entropy = torch.tensor([4.0, 4.0, 6.0, 6.0])
    out = derived_quantities(neg_elbo, dim=2, image_like=False, entropy=entropy, nll_bound=nll_bound)
    assert out["kl_total"] == pytest.approx(6.5 - 5.0)
    assert out["inference_gap"] == pytest.approx(6.5 - 5.75)
    assert out["model_gap"] == pytest.approx(5.75 - 5.0)
    assert out["kl_total"] == pytest.approx(out["inference_gap"] + out["model_gap"])
    assert "bpd" not in out


def test_derived_quantities_scalar_entropy_and_bpd():
    out = derived_quantities(torch.full((10,), 64 * math.log(2) * 3), dim=64, image_like=True, entropy=None)
    assert out["bpd"] == pytest.approx(3.0)
    assert "kl_total" not in out and "inference_gap" not in out
    out = derived_quantities(torch.tensor([3.0, 5.0]), dim=2, image_like=False, entropy=math.log(8))
    assert out["kl_total"] == pytest.approx(4.0 - math.log(8))
