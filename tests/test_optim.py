"""klbench's Adam against torch.optim.Adam, and the fixed cost it avoids."""

import subprocess
import sys

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
              "fit_model(model, (x,), (x,), TrainConfig(steps=4, warmup_steps=1, batch_size=32))\n"
              "print('torch._dynamo' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
