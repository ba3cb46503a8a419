"""The seeds of one (dataset, model) as one trainable group: one model, or several stacked.

The training loop (train.py) sees a group of S seeds with a leading seed axis everywhere:
objectives (S,), terms (S, B), one optimizer over all parameters. Adam is elementwise and
the summed objective's gradient with respect to seed s's parameters is that seed's own
gradient, so a stacked group trains every seed exactly as if it were alone.

- `OneSeed` wraps one model; its noise comes from the global RNG the caller seeded.
- `StackedSeeds` holds S models as one set of stacked parameters
  (`torch.func.stack_module_state`) and runs a family's `loss`/`ledger_terms` under
  `torch.func.vmap` + `functional_call`: one op per layer for all seeds, which is what small
  MLPs on a CPU (bound by per-op overhead) and any GPU gain from.

Noise in a stacked group. Each seed s has its own generator g_s, started from the state the
global RNG had after `seed_everything(s)` and building model s, which is exactly the state a
lone seed trains from. A family's loss draws with plain `torch.randn`/`rand` (and `_like`);
inside vmap those calls are replaced (a `TorchFunctionMode`) by draws made outside it, one
per seed from g_s, in the same order and shapes a lone seed would draw them. The order and
shapes of a method's draws are recorded once per input shape in a dry run. So seed s's
minibatch order, noise and initial weights do not depend on which other seeds share its
process, and its ledger equals the lone seed's up to float rounding of batched matmuls.

Evaluation noise. A validation ledger during training draws from a generator seeded with
`evaluation_seed(seed)`, fresh at every evaluation (OneSeed forks the global RNG around it), so
every checkpoint of a seed is scored on the same draws and evaluating never moves the
training RNG: how often a run evaluates changes none of its training steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.overrides import TorchFunctionMode

from klbench.errors import ConfigError
from klbench.ledger import Ledger

EVAL_BATCH = 1000
EVALUATION_STREAM = 1_000_003  # offset of the evaluation noise seed from the training seed
# what the replay can draw: (function, kind), where a _like function takes its shape from a tensor
DRAWS: dict[Callable, str] = {torch.randn: "normal", torch.randn_like: "normal", torch.rand: "uniform",
                              torch.rand_like: "uniform"}
# random functions a stacked loss must not call (they would draw from the global RNG inside vmap)
UNSUPPORTED = {torch.randint, torch.randint_like, torch.randperm, torch.normal, torch.bernoulli, torch.multinomial,
               torch.poisson, Tensor.normal_, Tensor.uniform_, Tensor.bernoulli_, Tensor.random_,
               Tensor.exponential_, Tensor.geometric_, Tensor.cauchy_, Tensor.log_normal_}


def _request(func: Callable, args: tuple, kwargs: dict) -> tuple[str, torch.Size, torch.dtype]:
    """(kind, shape, dtype) of a torch.randn/rand(_like) call, from its arguments."""
    if func in (torch.randn_like, torch.rand_like):
        like = args[0]
        return DRAWS[func], like.shape, kwargs.get("dtype") or like.dtype
    size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
    if "size" in kwargs:
        size = kwargs["size"]
    return DRAWS[func], torch.Size(size), kwargs.get("dtype") or torch.get_default_dtype()


class _Record(TorchFunctionMode):
    """Records the (kind, shape, dtype) of every draw a method makes; draws from a throwaway generator."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, torch.Size, torch.dtype]] = []
        self.generator = torch.Generator().manual_seed(0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DRAWS:
            kind, shape, dtype = _request(func, args, kwargs)
            self.requests.append((kind, shape, dtype))
            return _draw(kind, shape, dtype, self.generator)
        if func in UNSUPPORTED:
            raise ConfigError(f"this model's training step draws with {getattr(func, '__name__', func)}, which "
                              "stacked seeds cannot replay; set train.stack_seeds: false for it")
        return func(*args, **kwargs)


class _Replay(TorchFunctionMode):
    """Inside vmap: answers the method's draws, in order, with the per-seed draws given to vmap."""

    def __init__(self, draws: Sequence[Tensor], requests: Sequence[tuple[str, torch.Size, torch.dtype]]) -> None:
        super().__init__()
        self.draws, self.requests, self.next = draws, requests, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DRAWS:
            request = _request(func, args, kwargs)
            if self.next >= len(self.requests) or request[:2] != self.requests[self.next][:2]:
                raise RuntimeError(f"stacked seeds: draw {self.next} is {request[:2]}, the dry run recorded "
                                   f"{self.requests[self.next:self.next + 1]}; the model's draws depend on its "
                                   "values, so it cannot be stacked (train.stack_seeds: false)")
            draw = self.draws[self.next]
            self.next += 1
            return draw.to(request[2]) if draw.dtype != request[2] else draw
        return func(*args, **kwargs)


def _draw(kind: str, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    if kind == "normal":
        return torch.randn(shape, dtype=dtype, generator=generator, device=generator.device)
    return torch.rand(shape, dtype=dtype, generator=generator, device=generator.device)


class _Method(nn.Module):
    """Calls one of the model's methods through forward, so functional_call can run any of them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, method)(*args, **kwargs)


def evaluation_seed(seed: int) -> int:
    """Seed of the noise every validation ledger of a training seed uses: the same draws at
    every evaluation, so that two checkpoints differ by the model, not by Monte Carlo noise,
    and evaluating never moves the training RNG."""
    return seed + EVALUATION_STREAM


def generator_after(seed_state: Tensor, device: torch.device) -> torch.Generator:
    """A generator on `device` in the state the global RNG was in (CPU: exactly that state)."""
    generator = torch.Generator(device=device)
    if device.type == "cpu":
        generator.set_state(seed_state)
    else:  # a device generator has its own state layout: seed it from the CPU state's draw
        generator.manual_seed(int(torch.randint(2**62, (1,), generator=torch.Generator().set_state(seed_state))))
    return generator


class OneSeed:
    """One model; its noise (minibatch order included) comes from the global RNG the caller set."""

    stacked = False

    def __init__(self, model: nn.Module, seed: int) -> None:
        self.model, self.seeds, self.size = model, [seed], 1

    @property
    def own_objective(self) -> str | None:
        """What the model trains on where it is not its ledger's ELBO (models/family.py)."""
        return getattr(self.model, "own_objective", None)

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def permutations(self, n: int, device: torch.device) -> Tensor:
        return torch.randperm(n, device=device).unsqueeze(0)

    def rows(self, tensors: tuple[Tensor, ...], rows: Tensor) -> tuple[Tensor, ...]:
        return tuple(t[rows[0]] for t in tensors)

    def loss(self, batch: tuple[Tensor, ...], batch_index: int, num_batches: int,
             progress: float) -> tuple[Tensor, dict[str, Tensor]]:
        objective, terms = self.model.loss(*batch, batch_index=batch_index, num_batches=num_batches,
                                           progress=progress)
        return objective.unsqueeze(0), {name: value.unsqueeze(0) for name, value in terms.items()}

    @torch.no_grad()
    def held_out(self, tensors: tuple[Tensor, ...], samples: int, method: str = "ledger_terms") -> list[Ledger]:
        """The split's ledger (or the terms of another per-example method) with the seed's fixed
        evaluation noise (module docstring)."""
        device = tensors[0].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(evaluation_seed(self.seeds[0]))
            return [held_out_ledger(self.model, tensors, samples, method)]

    def snapshot(self, index: int) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self, index: int, snapshot: dict[str, Tensor]) -> None:
        self.model.load_state_dict(snapshot)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def models(self) -> list[nn.Module]:
        return [self.model]


class StackedSeeds:
    """S models of one architecture trained as one: stacked parameters, vmapped methods, per-seed noise."""

    stacked = True

    def __init__(self, models: Sequence[nn.Module], generators: Sequence[torch.Generator], seeds: Sequence[int]) -> None:
        self._models, self.generators, self.seeds, self.size = list(models), list(generators), list(seeds), len(models)
        params, buffers = stack_module_state(self._models)
        self.params = {f"model.{k}": v for k, v in params.items()}
        self.buffers = {f"model.{k}": v for k, v in buffers.items()}
        # the architecture without weights: functional_call supplies each seed's stacked slice
        self._base = _Method(copy.deepcopy(self._models[0]).to("meta"))
        self._requests: dict[tuple, list[tuple[str, torch.Size, torch.dtype]]] = {}

    @property
    def own_objective(self) -> str | None:
        return getattr(self._models[0], "own_objective", None)

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def permutations(self, n: int, device: torch.device) -> Tensor:
        return torch.stack([torch.randperm(n, generator=g, device=device) for g in self.generators])

    def rows(self, tensors: tuple[Tensor, ...], rows: Tensor) -> tuple[Tensor, ...]:
        return tuple(t[rows] for t in tensors)  # (S, B, ...)

    def _call(self, method: str, batch: tuple[Tensor, ...], **kwargs: Any) -> Any:
        """model.<method>(*batch[s], **kwargs) for every seed s at once; batch tensors have a seed axis."""
        key = (method, tuple(t.shape[1:] for t in batch), kwargs.get("samples"))
        requests = self._requests.get(key)
        if requests is None:  # dry run on seed 0's weights: which draws, in which order and shapes
            recorder = _Record()
            with torch.no_grad(), recorder:
                getattr(self._models[0], method)(*(t[0] for t in batch), **kwargs)
            requests = self._requests[key] = recorder.requests
        draws = [torch.stack([_draw(kind, shape, dtype, g) for g in self.generators])
                 for kind, shape, dtype in requests]

        def one_seed(params: dict, buffers: dict, batch: tuple, draws: list) -> Any:
            with _Replay(draws, requests):
                return functional_call(self._base, (params, buffers), (method, *batch), kwargs)

        return vmap(one_seed)(self.params, self.buffers, batch, draws)

    def loss(self, batch: tuple[Tensor, ...], batch_index: int, num_batches: int,
             progress: float) -> tuple[Tensor, dict[str, Tensor]]:
        return self._call("loss", batch, batch_index=batch_index, num_batches=num_batches, progress=progress)

    @torch.no_grad()
    def held_out(self, tensors: tuple[Tensor, ...], samples: int, method: str = "ledger_terms") -> list[Ledger]:
        """Every seed's unweighted ledger (or the terms of `method`) of a split, in batches (each
        seed sees the same examples), with each seed's fixed evaluation noise."""
        n = tensors[0].shape[0]
        was_training = self._base.training
        self.train(False)
        training_generators = self.generators
        self.generators = [torch.Generator(device=g.device).manual_seed(evaluation_seed(seed))
                           for g, seed in zip(training_generators, self.seeds)]
        parts = [self._call(method, tuple(chunk.expand(self.size, *chunk.shape)
                                                  for chunk in (t[i : i + EVAL_BATCH] for t in tensors)),
                            samples=samples)
                 for i in range(0, n, EVAL_BATCH)]
        self.generators = training_generators
        self.train(was_training)
        return [Ledger.cat([Ledger({k: v[s] for k, v in part.items()}) for part in parts]) for s in range(self.size)]

    def snapshot(self, index: int) -> dict[str, Tensor]:
        """Seed `index`'s slice of the stacked weights, copied."""
        return {k: v[index].detach().clone() for k, v in {**self.params, **self.buffers}.items()}

    @torch.no_grad()
    def restore(self, index: int, snapshot: dict[str, Tensor]) -> None:
        for k, v in {**self.params, **self.buffers}.items():
            v[index].copy_(snapshot[k])

    def train(self, mode: bool = True) -> None:
        self._base.train(mode)
        for model in self._models:
            model.train(mode)

    def models(self) -> list[nn.Module]:
        """Each seed's model, holding its slice of the trained stacked weights."""
        stacked = {k.removeprefix("model."): v for k, v in {**self.params, **self.buffers}.items()}
        for s, model in enumerate(self._models):
            # a state dict leaves out non-persistent buffers (derived schedules), which never change
            model.load_state_dict({k: stacked[k][s].detach() for k in model.state_dict()})
        return self._models


@torch.no_grad()
def held_out_ledger(model: nn.Module, tensors: tuple[Tensor, ...], samples: int,
                    method: str = "ledger_terms") -> Ledger:
    """The unweighted ledger (or the terms of another per-example method) of every example of a
    split, in batches."""
    was_training = model.training
    model.eval()
    n = tensors[0].shape[0]
    parts = [
        Ledger(getattr(model, method)(*(t[i : i + EVAL_BATCH] for t in tensors), samples=samples))
        for i in range(0, n, EVAL_BATCH)
    ]
    model.train(was_training)
    return Ledger.cat(parts)
