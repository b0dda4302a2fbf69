"""Optimizers and learning-rate schedules, each built by name from a small table of builders.

They take plain values, not the config, so the config can list these tables' names for its checks
without an import cycle."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from cifarlab.errors import unknown_name


def param_groups(model: nn.Module, lr: float, weight_decay: float, bias_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on weights only: norms' scales and biases (1-D tensors) are not decayed, and may
    take a larger learning rate (`bias_lr_scale`: BatchNorm shifts learn slowly at a weight's lr)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr * bias_lr_scale}]


# name -> builder(parameter groups, momentum); each group carries its own lr and weight decay
OPTIMIZERS: dict[str, Callable[[list[dict], float], torch.optim.Optimizer]] = {
    "adam": lambda groups, momentum: torch.optim.Adam(groups),
    "adamw": lambda groups, momentum: torch.optim.AdamW(groups),
    "sgd": lambda groups, momentum: torch.optim.SGD(groups, momentum=momentum, nesterov=momentum > 0),
}


def build_optimizer(name: str, groups: list[dict], momentum: float = 0.9) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise unknown_name("optimizer", name, list(OPTIMIZERS))
    return OPTIMIZERS[name](groups, momentum)


def _warmup_then(decay: Callable[[float], float], warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at `step`: linear warm-up, then `decay(progress in 0..1)`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay((step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return factor


SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "onecycle": lambda progress: max(1.0 - progress, 0.0),  # linear decay to zero after the warm-up peak
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))),
}


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0,
                    done: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule (stepped after every batch); `done` steps already taken (a schedule replaced
    part-way, as --time-budget does once it knows the run's length)."""
    if name not in SCHEDULES:
        raise unknown_name("schedule", name, list(SCHEDULES))
    factor = _warmup_then(SCHEDULES[name], warmup_steps, total_steps)
    # with last_epoch k - 1 torch takes each group's initial_lr and steps once: the rate of step k
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=done - 1)
