"""Several seeds in one process (seeds.py, run.execute_runs): stacked or one by one, every
seed's result is what it is alone, a new seed changes no other, and reruns are exact."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from klbench.config import load_config, resolve_run, seed_blocks, validate_config
from klbench.errors import ConfigError
from klbench.run import execute_runs
from klbench.seeds import StackedSeeds
from klbench.timing import PHASES
from klbench.verify import verify_run

# agreement of a stacked seed and the same seed alone: batched matmuls may round differently
# from single ones, nothing else may differ. Relative 1e-5, and 1e-6 nats for values near 0
# that are differences of nat-sized ones (a marginal KL of 0.001 = log e(z) - log m(z)).
STACKED_RTOL, STACKED_ATOL = 1e-5, 1e-6


def test_seed_blocks_go_by_value_so_a_new_seed_changes_only_its_own_block():
    assert seed_blocks([0, 1, 2], 3) == [(0, 1, 2)]
    assert seed_blocks([2, 0, 1, 3], 3) == [(0, 1, 2), (3,)]
    assert seed_blocks([0, 1, 2, 3, 7], 3) == [(0, 1, 2), (3,), (7,)]
    before, after = seed_blocks([0, 1, 2, 4], 3), seed_blocks([0, 1, 2, 4, 9], 3)
    assert set(before) - set(after) == set() and set(after) - set(before) == {(9,)}


class Draws(nn.Module):
    """A 'model' whose loss terms are its noise: what each seed drew, made visible."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def loss(self, x, batch_index, num_batches, progress=1.0):
        normal, uniform = torch.randn(x.shape[0]), torch.rand_like(x[:, 0])
        return self.weight * normal.sum(), {"normal": normal, "uniform": uniform}


def test_each_stacked_seed_draws_from_its_own_generator_in_the_order_it_would_alone():
    states = [torch.Generator().manual_seed(seed).get_state() for seed in (3, 7)]
    group = StackedSeeds([Draws(), Draws()], [torch.Generator().set_state(s) for s in states], seeds=[3, 7])
    x = torch.zeros(5, 2)
    for _ in range(2):  # the second call replays the recorded draws without a new dry run
        _, terms = group.loss((x.expand(2, 5, 2),), batch_index=0, num_batches=1, progress=1.0)
    for s, state in enumerate(states):
        alone = torch.Generator().set_state(state)
        for _ in range(2):
            normal, uniform = torch.randn(5, generator=alone), torch.rand(5, generator=alone)
        assert torch.equal(terms["normal"][s], normal) and torch.equal(terms["uniform"][s], uniform)


class DrawsIntegers(Draws):
    def loss(self, x, batch_index, num_batches, progress=1.0):
        return self.weight * torch.randint(0, 5, (1,)).float().sum(), {"x": x[:, 0]}


def test_a_loss_drawing_with_an_unsupported_function_is_refused_in_one_line():
    group = StackedSeeds([DrawsIntegers(), DrawsIntegers()], [torch.Generator(), torch.Generator()], seeds=[0, 1])
    with pytest.raises(ConfigError, match="draws with randint, which stacked seeds cannot replay; set "
                                          "train.stack_seeds: false"):
        group.loss((torch.zeros(2, 4, 2),), batch_index=0, num_batches=1, progress=1.0)


@pytest.fixture
def job(repo, tmp_path, monkeypatch):
    """runs(dataset, model, seeds, stack) -> ledgers of one job of tiny runs in tmp_path."""
    monkeypatch.chdir(tmp_path)
    config = validate_config(load_config([repo / "config" / "config.yaml", repo / "config" / "smoke.yaml"]))
    count = iter(range(1000))

    def runs(dataset: str, model: str, seeds: list[int], stack: bool, steps: int = 16) -> tuple[list[dict], Path]:
        folder = tmp_path / f"job{next(count)}"
        configs = [resolve_run(config, dataset, model, seed) for seed in seeds]
        configs = [replace(r, train=replace(r.train, steps=steps, stack_seeds=stack)) for r in configs]
        ledgers = execute_runs(configs, [folder / f"seed{s}" for s in seeds], progress=False,
                               tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        return ledgers, folder

    return runs


def numbers(ledger: dict) -> dict[str, float]:
    """Every number the run computed (terms, derived, diagnostics, final training means)."""
    from klbench.tracking import flatten

    parts = {k: ledger[k] for k in ("terms", "derived", "diagnostics")} | {
        "train": ledger["train"]["final"], "best_val": ledger["train"]["best_val"]}  # IWAE's own bound included
    return {k: v for k, v in flatten(parts) if isinstance(v, float)}


def assert_close(a: dict, b: dict) -> None:
    x, y = numbers(a), numbers(b)
    assert x.keys() == y.keys() and x
    for key in x:
        assert x[key] == pytest.approx(y[key], rel=STACKED_RTOL, abs=STACKED_ATOL), key


@pytest.mark.slow
@pytest.mark.parametrize("dataset, model", [("checkerboard", "vae"), ("checkerboard", "iwae-k5"),
                                            ("checkerboard", "ddpm-linear"), ("toy_curve", "bbb-gauss"),
                                            ("digits", "vib-b0.001")])
def test_a_stacked_seed_has_the_ledger_it_has_alone(job, dataset, model):
    stacked, _ = job(dataset, model, [0, 1, 2], stack=True)
    alone, _ = job(dataset, model, [1], stack=False)
    assert [ledger["run"]["stacked"] for ledger in stacked] == [True] * 3 and not alone[0]["run"]["stacked"]
    assert stacked[1]["run"]["job_seeds"] == [0, 1, 2] and alone[0]["run"]["job_seeds"] == [1]
    assert_close(stacked[1], alone[0])
    assert numbers(stacked[0]) != numbers(stacked[1])  # seeds differ: not one seed's noise three times


@pytest.mark.slow
def test_adding_a_seed_to_a_job_leaves_the_other_seeds_results_unchanged(job):
    one_by_one, _ = job("checkerboard", "vae", [0, 1], stack=False)
    more, _ = job("checkerboard", "vae", [0, 1, 2], stack=False)
    for before, after in zip(one_by_one, more):  # one by one: exactly, every number
        assert numbers(before) == numbers(after)
    stacked, _ = job("checkerboard", "vae", [0, 1], stack=True)
    more, _ = job("checkerboard", "vae", [0, 1, 2], stack=True)
    for before, after in zip(stacked, more):
        assert_close(before, after)


@pytest.mark.slow
def test_verify_reruns_a_stacked_job_and_finds_it_identical_byte_for_byte(job):
    _, folder = job("checkerboard", "vae", [0, 1], stack=True)
    result = verify_run(folder / "seed1")
    assert result.identical, [d.describe() for d in result.differences]


@pytest.mark.slow
def test_a_model_that_cannot_be_stacked_trains_its_seeds_one_by_one(job):
    ledgers, _ = job("checkerboard", "vdm-learned", [0, 1], stack=True)  # gradient hooks: not under vmap
    assert [ledger["run"]["stacked"] for ledger in ledgers] == [False, False]


@pytest.mark.slow
def test_the_runs_of_a_process_share_its_fixed_costs_and_add_up_to_its_totals(job):
    _, folder = job("checkerboard", "vae", [0, 1], stack=False)
    timings = [json.loads((folder / f"seed{s}" / "timing.json").read_text()) for s in (0, 1)]
    for timing in timings:
        assert timing["runs_in_process"] == 2
        cpu = timing["cpu"]
        assert sum(cpu[f"{name}_s"] for name in PHASES) == pytest.approx(cpu["total_s"])
        assert cpu["train_s"] > 0 and cpu["eval_s"] > 0
    # start-up, data and opening the store happened once: each run carries half of it
    for name in ("startup", "data", "store_open"):
        assert timings[0]["cpu"][f"{name}_s"] == timings[1]["cpu"][f"{name}_s"]
