"""Weight averaging: an exponential moving average of a model's weights, evaluated and saved in place
of the raw ones (`WeightEMA`), and airbench's lookahead (`Lookahead`), which averages into the
trained weights themselves.

A copy of the model whose floating-point parameters and buffers follow the training weights:
ema = d * ema + (1 - d) * weights after each step, with d warming up as min(decay, (1 + t) / (10 + t))
so the first steps are not dominated by the random initialisation (as timm and TF do it). BatchNorm's
running statistics are averaged like the weights; integer buffers (num_batches_tracked) are copied.

Its state is a plain dict of tensors and numbers, so a resume checkpoint stores it as it is.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards `model`'s weights (the model inside a DDP wrapper, if wrapped)."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.updates += 1
        d = self.current_decay()
        averaged, current = [], []
        for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_value.is_floating_point():
                averaged.append(ema_value)
                current.append(value.detach().to(ema_value.dtype))
            else:
                ema_value.copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1 - d)  # one fused kernel per dtype/device, not one per tensor

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "weights": {k: v.detach().clone() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.module.load_state_dict(state["weights"])


class Lookahead:
    """airbench's lookahead (Zhang et al. 2019, as airbench schedules it): every `every` steps the slow
    weights move towards the fast (trained) ones by 1 - decay, with decay = 0.95**every * (t / T)**3,
    and the fast weights restart from the slow ones. Early on decay is ~0 (plain training); towards the
    end it averages more and more; after the last step the model holds the slow weights. Floating
    buffers (BatchNorm statistics) are averaged too, as airbench does."""

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5) -> None:
        self.slow = [v.detach().clone() for v in model.state_dict().values() if v.is_floating_point()]
        self.total_steps, self.every, self.steps = total_steps, every, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        last = self.steps >= self.total_steps
        if self.steps % self.every and not last:
            return
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        decay = 1.0 if last else 0.95 ** self.every * (self.steps / self.total_steps) ** 3
        fast = [v for v in model.state_dict().values() if v.is_floating_point()]
        torch._foreach_lerp_(self.slow, fast, 1 - decay)
        torch._foreach_copy_(fast, self.slow)

    def state_dict(self) -> dict:
        return {"slow": [v.clone() for v in self.slow], "total_steps": self.total_steps, "every": self.every,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.slow, state["slow"]):
            mine.copy_(saved)
        self.total_steps, self.every, self.steps = int(state["total_steps"]), int(state["every"]), int(state["steps"])
