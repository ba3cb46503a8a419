"""The training loop's contract: step budgets, the validation split choosing the checkpoint,
the convergence verdict, and evaluation that never moves the training RNG."""

import pytest
import torch

from klbench.batches import FreshDraws, Passes, data_generator
from klbench.config import TrainConfig
from klbench.data import load_dataset
from klbench.models.vae import VAE, Config
from klbench.seeds import OneSeed
from klbench.train import Selection, evaluation_steps, fit


def vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(Config(latent_dim=2, hidden=[32]), 2, "continuous")


def ring(n: int, seed: int) -> torch.Tensor:
    return load_dataset("eight_gaussians", n_train=n, n_test=10, seed=seed).x_train


def train(model, x, val, config, seed=0):
    torch.manual_seed(seed)
    group = OneSeed(model, seed)
    (history,), (selection,) = fit(group, Passes(group, (x,), config.batch_size), (val,), config, progress=False)
    return group, history, selection


def test_the_kept_weights_are_the_best_validation_checkpoint_not_the_last():
    """A tiny training set overfits: the validation -ELBO turns up, and the run keeps the
    weights of its best evaluation, whose validation ledger it reproduces exactly."""
    x, val = ring(16, 1), ring(500, 2)
    config = TrainConfig(steps=3000, batch_size=16, lr=1e-2, warmup=0, schedule="constant", evaluations=30)
    group, history, selection = train(vae(), x, val, config)
    curve = [row for row in history if row["split"] == "val"]
    assert [row["step"] for row in curve] == evaluation_steps(config)
    best = min(curve, key=lambda row: row["neg_elbo"])
    assert selection.best_step == best["step"] < config.steps  # it overfit, and the last is not kept
    assert curve[-1]["neg_elbo"] > best["neg_elbo"]
    (again,) = group.held_out((val,), samples=1)  # the same evaluation noise as during training
    assert again.means()["neg_elbo"] == pytest.approx(best["neg_elbo"], abs=1e-6)


def test_how_often_the_loop_evaluates_changes_no_training_step():
    x, val = ring(256, 1), ring(200, 2)
    rows = {}
    for evaluations in (2, 10):
        config = TrainConfig(steps=100, batch_size=32, lr=3e-3, warmup=0.1, evaluations=evaluations)
        _, history, _ = train(vae(), x, val, config)
        rows[evaluations] = next(r for r in history if r["split"] == "val" and r["step"] == 100)
    assert rows[2]["neg_elbo"] == rows[10]["neg_elbo"]  # the weights at step 100 are the same bits


def test_convergence_compares_the_best_validation_before_and_within_the_last_tenth():
    def curve(values):
        return [(100 * (i + 1), {"neg_elbo": v}) for i, v in enumerate(values)]

    still_falling = Selection.judge(curve([5.0, 4.0, 3.0, 2.5, 2.2, 2.0, 1.9, 1.8, 1.7, 1.6]), 1000, 0.01)
    assert (still_falling.converged, still_falling.best_step) == (False, 1000)
    assert still_falling.improvement == pytest.approx(0.1)
    flat = Selection.judge(curve([5.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.995]), 1000, 0.01)
    assert flat.converged and flat.improvement == pytest.approx(0.005)
    overfit = Selection.judge(curve([5.0, 3.0, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.7]), 1000, 0.01)
    assert overfit.converged and overfit.best_step == 300 and overfit.improvement < 0


def test_an_iwae_is_selected_and_judged_on_its_own_objective_not_on_the_elbo():
    """IWAE-k trains -L_k; its ELBO may rise while -L_k falls. The curve below keeps step 200
    on the ELBO but step 1000 on the bound, and only the bound's verdict is 'still improving'."""
    elbo = [3.0, 2.8, 2.9, 3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6]
    bound = [2.9, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1, 2.0, 1.9]
    curve = [(100 * (i + 1), {"neg_elbo": e, "objective": b}) for i, (e, b) in enumerate(zip(elbo, bound))]
    on_elbo, on_bound = Selection.judge(curve, 1000, 0.01), Selection.judge(curve, 1000, 0.01, "-L_5")
    assert (on_elbo.best_step, on_elbo.converged) == (200, True)
    assert (on_bound.best_step, on_bound.converged, on_bound.selected_on) == (1000, False, "-L_5")
    assert on_bound.to_dict()["best_val_objective"] == 1.9


def test_a_trained_iwae_keeps_its_best_validation_minus_l_k_and_it_lies_below_its_elbo():
    x, val = ring(2000, 1), ring(500, 2)
    torch.manual_seed(0)
    model = VAE(Config(latent_dim=2, hidden=[32], k=5), 2, "continuous")
    assert model.own_objective == "-L_5" and VAE(Config(k=5, objective="elbo"), 2, "continuous").own_objective is None
    assert VAE(Config(beta=0.25), 2, "continuous").own_objective == "distortion + 0.25 rate"
    assert VAE(Config(), 2, "continuous").own_objective is None  # the plain VAE trains its ledger's ELBO
    config = TrainConfig(steps=400, batch_size=64, lr=3e-3, warmup=0, schedule="constant", evaluations=8,
                         validation_samples=4)
    group, history, selection = train(model, x, val, config)
    curve = [row for row in history if row["split"] == "val"]
    assert selection.selected_on == "-L_5" and selection.best_step == min(curve, key=lambda r: r["objective"])["step"]
    assert all(row["objective"] < row["neg_elbo"] for row in curve)  # L_5 >= ELBO
    (again,) = group.held_out((val,), 4, "own_objective_terms")  # the fixed evaluation noise reproduces it
    assert again.terms["objective"].double().mean().item() == pytest.approx(selection.best["objective"], abs=1e-6)


def test_fresh_draws_give_every_batch_new_examples_from_each_seeds_own_stream():
    data = load_dataset("checkerboard", n_test=100, n_val=100)
    group = OneSeed(vae(), 0)
    batches = iter(FreshDraws(group, data.sampler, 64, False, [data_generator(0)], torch.device("cpu")))
    (first,), index, per_pass = next(batches)
    (second,), _, _ = next(batches)
    assert first.shape == (64, 2) and (index, per_pass) == (0, 1) and not torch.equal(first, second)
    assert torch.isfinite(data.log_density(torch.cat([first, second]))).all()  # on the squares
    replay = iter(FreshDraws(group, data.sampler, 64, False, [data_generator(0)], torch.device("cpu")))
    assert torch.equal(next(replay)[0][0], first)
    other = iter(FreshDraws(group, data.sampler, 64, False, [data_generator(1)], torch.device("cpu")))
    assert not torch.equal(next(other)[0][0], first)


def test_passes_reshuffle_the_split_every_epoch_and_cover_it_once_per_pass():
    x = torch.arange(10.0).unsqueeze(1)
    torch.manual_seed(0)
    batches = iter(Passes(OneSeed(vae(), 0), (x,), 4))
    passes = [[next(batches) for _ in range(3)] for _ in range(2)]  # 10 rows in batches of 4: 3 per pass
    for one_pass in passes:
        assert [(index, per_pass) for _, index, per_pass in one_pass] == [(0, 3), (1, 3), (2, 3)]
        assert sorted(torch.cat([batch[0] for batch, _, _ in one_pass]).flatten().tolist()) == list(range(10))
    assert not torch.equal(passes[0][0][0][0], passes[1][0][0][0])


def test_a_beta_vae_is_selected_on_distortion_plus_beta_rate_with_its_evaluation_noise():
    """own_objective_terms of a beta-VAE is D + beta R per example, averaged over the draws: the
    same draws give exactly the ledger's D + beta R."""
    x = ring(300, 3)
    torch.manual_seed(0)
    model = VAE(Config(latent_dim=2, hidden=[16], beta=0.25), 2, "continuous")
    torch.manual_seed(5)
    objective = model.own_objective_terms(x, samples=3)["objective"]
    torch.manual_seed(5)
    draws = [model.objective(x, 0.25)[1] for _ in range(3)]
    expected = torch.stack([d["distortion"] + 0.25 * d["rate"] for d in draws]).mean(0)
    assert torch.allclose(objective, expected, rtol=0, atol=1e-6)


def test_the_loop_tells_the_loss_how_far_training_has_come():
    """progress = step / steps at every step: what a warm-up of a term's weight (the VAE's
    kl_warmup) is a function of."""

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def loss(self, x, batch_index, num_batches, progress=1.0):
            self.seen.append(progress)
            terms = {"square": (x[:, 0] - self.weight) ** 2}
            return terms["square"].mean(), {k: v.detach() for k, v in terms.items()}

        def ledger_terms(self, x, samples):
            return {"square": (x[:, 0] - self.weight) ** 2}

    model = Recorder()
    train(model, torch.randn(64, 2), torch.randn(16, 2), TrainConfig(steps=8, batch_size=16, evaluations=2))
    assert model.seen == [step / 8 for step in range(1, 9)]
