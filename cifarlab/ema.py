"""An exponential moving average of a model's weights, evaluated and saved in place of the raw ones.

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
