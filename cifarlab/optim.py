"""Optimizers and learning-rate schedules, each built by name from a small table of builders."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.errors import unknown_name


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Weight decay on weights only: norms' scales and biases (1-D tensors) are not decayed, and may
    take a larger learning rate (`bias_lr_scale`: BatchNorm shifts learn slowly at a weight's lr)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lr": config.lr * config.bias_lr_scale}]


_OPTIMIZERS: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr),
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr),
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0),
}


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer not in _OPTIMIZERS:
        raise unknown_name("optimizer", config.optimizer, list(_OPTIMIZERS))
    return _OPTIMIZERS[config.optimizer](_param_groups(model, config), config)


def _warmup_then(decay: Callable[[float], float], warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at `step`: linear warm-up, then `decay(progress in 0..1)`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay((step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return factor


_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "onecycle": lambda progress: max(1.0 - progress, 0.0),  # linear decay to zero after the warm-up peak
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))),
}


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule (stepped after every batch)."""
    if config.schedule not in _SCHEDULES:
        raise unknown_name("schedule", config.schedule, list(_SCHEDULES))
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then(_SCHEDULES[config.schedule], warmup, total))
