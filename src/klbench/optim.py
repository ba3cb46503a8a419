"""Adam (Kingma & Ba 2015), the optimizer of every run, as one fused kernel per step.

Per parameter p with gradient g, at step t:

    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    p = p - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

This is what `torch.optim.Adam(fused=True)` computes, with the same kernel
(`torch._fused_adam_`); tests/test_optim.py checks the two agree step for step. It exists
because the first call into any torch.optim optimizer imports torch._dynamo, about 1.2 s of
CPU in every training process: a fixed cost as large as importing MLflow, spent on nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


class Adam:
    """Adam over a fixed list of parameters (no weight decay, no amsgrad)."""

    def __init__(self, params: Iterable[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        # one float step counter per parameter, as the fused kernel reads them
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        steps = [self.steps[i] for i in live]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            [self.params[i] for i in live], [self.params[i].grad for i in live],
            [self.exp_avgs[i] for i in live], [self.exp_avg_sqs[i] for i in live], [], steps,
            amsgrad=False, lr=self.lr, beta1=self.beta1, beta2=self.beta2, weight_decay=0.0, eps=self.eps,
            maximize=False, grad_scale=None, found_inf=None,
        )


# Burda et al. 2016 (sec. 5): 3^i epochs at lr 10^(-i/7) x 0.001 for i = 0..7, 3280 epochs in all.
BURDA_STAGES = 8
BURDA_TOTAL = sum(3**i for i in range(BURDA_STAGES))  # 3280


def learning_rate(step: int, peak: float, steps: int, warmup_steps: int, schedule: str, final_lr: float) -> float:
    """The learning rate of step t = 1..steps: linear warm-up, then the schedule.

        warm-up (t <= W):  lr_t = peak t / W
        cosine  (t > W):   lr_t = peak (f + (1 - f) (1 + cos(pi u)) / 2),  u = (t - W) / (steps - W)
        burda   (t > W):   lr_t = peak 10^(-i/7), i the stage of u: stage i spans 3^i / 3280 of the steps

    with f = final_lr, so the last cosine step trains at peak x f; "constant" keeps peak.
    """
    if step <= warmup_steps:
        return peak * step / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / (steps - warmup_steps)
    if schedule == "burda":
        done, stage = 0, 0
        while stage < BURDA_STAGES - 1 and progress > (done + 3**stage) / BURDA_TOTAL:
            done += 3**stage
            stage += 1
        return peak * 10 ** (-stage / 7)
    return peak * (final_lr + (1 - final_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
