"""klbench's Adam against torch.optim.Adam, and the fixed cost it avoids."""

import subprocess
import sys

import pytest
import torch

from klbench.optim import Adam


def test_adam_takes_the_steps_of_torch_adam():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ours, theirs = Adam(model.parameters(), lr=0.01), torch.optim.Adam(twin, lr=0.01)
    x = torch.randn(32, 3)
    for _ in range(25):
        for params, optimizer in ((list(model.parameters()), ours), (twin, theirs)):
            h = torch.nn.functional.silu(x @ params[0].T + params[1])
            loss = ((h @ params[2].T + params[3]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for p, q in zip(model.parameters(), twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_parameter_without_a_gradient_is_left_alone():
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = Adam([used, unused], lr=0.1)
    (used**2).sum().backward()
    optimizer.step()
    assert torch.all(used < 1) and torch.equal(unused, torch.ones(2))
    # Adam's first step moves every coordinate by lr (m / sqrt(v) = sign(g) after bias correction)
    torch.testing.assert_close(used, torch.full((2,), 0.9))


def test_a_training_step_does_not_import_torch_dynamo():
    """torch.optim's first call imports torch._dynamo (~1.2 s CPU per process); training must not."""
    script = ("import sys, torch\nfrom klbench.config import TrainConfig\nfrom klbench.models.vae import VAE, Config\n"
              "from klbench.train import fit_model\n"
              "model = VAE(Config(latent_dim=2, hidden=[8]), 2, 'continuous')\nx = torch.randn(64, 2)\n"
              "fit_model(model, (x,), (x,), TrainConfig(steps=4, batch_size=32))\n"
              "print('torch._dynamo' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_learning_rate_warms_up_then_decays_as_documented():
    from klbench.optim import learning_rate

    lr = lambda t, schedule="cosine": learning_rate(t, 1e-3, 1100, 100, schedule, 0.1)  # noqa: E731
    assert [lr(t) for t in (1, 50, 100)] == pytest.approx([1e-5, 5e-4, 1e-3])  # linear warm-up
    assert lr(600) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
    assert lr(1100) == pytest.approx(1e-4)  # the last step trains at final_lr x lr
    rates = [lr(t) for t in range(100, 1101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert lr(700, "constant") == 1e-3


def test_the_burda_schedule_has_eight_stages_of_3_to_the_i_over_3280_of_the_steps():
    from klbench.optim import learning_rate

    steps = 3280 * 10
    rates = [learning_rate(t, 1e-3, steps, 0, "burda", 0.0) for t in range(1, steps + 1)]
    stages = [10 * 3**i for i in range(8)]  # steps per stage: 10 x 3^i
    start = 0
    for i, length in enumerate(stages):
        assert rates[start:start + length] == pytest.approx([1e-3 * 10 ** (-i / 7)] * length), i
        start += length
    assert start == steps
