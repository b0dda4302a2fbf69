"""Optimizers and learning-rate schedules, each built by name from a small table of builders.

They take plain values, not the config, so the config can list these tables' names for its checks
without an import cycle."""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn

from cifarlab.errors import unknown_name


def param_groups(model: nn.Module, lr: float, weight_decay: float, bias_lr_scale: float = 1.0,
                 filter_lr: float | None = None, bias_decay: bool = False) -> list[dict]:
    """Weight decay on weights only: norms' scales and biases (1-D tensors) are not decayed, and may
    take a larger learning rate (`bias_lr_scale`: BatchNorm shifts learn slowly at a weight's lr).
    With `bias_decay` they are decayed as much per step as the weights, as airbench does (the rate
    divided by `bias_lr_scale`). With `filter_lr` (Muon) the conv filters form a third group, last,
    marked for orthogonal steps."""
    trained = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trained if p.ndim == 4] if filter_lr is not None else []
    apart = {id(p) for p in filters}
    groups = [{"params": [p for p in trained if p.ndim > 1 and id(p) not in apart], "weight_decay": weight_decay,
               "lr": lr},
              {"params": [p for p in trained if p.ndim <= 1],
               "weight_decay": weight_decay / bias_lr_scale if bias_decay else 0.0, "lr": lr * bias_lr_scale}]
    if filters:
        groups.append({"params": filters, "weight_decay": 0.0, "lr": filter_lr, "orthogonal": True})
    return groups


def newton_schulz(matrix: torch.Tensor, steps: int = 3, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """About the nearest semi-orthogonal matrix to `matrix` (its singular values pushed towards 1, into
    about 0.7-1.1 for a random one): Jordan et al.'s quintic Newton-Schulz iteration, 3 steps as in
    airbench94_muon (the bias of an unconverged iteration does not hurt training, they found), in
    `dtype`: bf16 as airbench runs it, or fp32 where bf16 matmuls are slow (Muon's `dtype`)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.to(dtype)
    x = x / (x.norm() + eps)  # every singular value <= 1, where the iteration converges
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):  # x <- a x + (b G + c G^2) x, G = x x^T; addmm fuses the sums: 3 kernels, not 8
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(matrix.dtype)


MUON_MOMENTUM = 0.6  # airbench94_muon's momentum for the filters; the other groups keep --momentum


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024) for the groups marked "orthogonal" (the conv filters, each bank viewed
    as an [out, in x k x k] matrix), Nesterov SGD with coupled weight decay (torch's) for the others:
    one optimizer, so one schedule, one state dict and the step `train_step` already takes. A filter
    step is its Nesterov momentum orthogonalised; the filters are held at a fixed norm, so the step
    sets their direction, as airbench94_muon does.

    The orthogonalisation runs in bf16 where the run computes in bf16 and in fp32 otherwise: on a CPU
    without native bf16 kernels a bf16 matmul is emulated, and fast75's six filter banks took 76 ms
    a step in bf16 against 3.5 ms in fp32 (2 cores, AVX2), a quarter of its training time."""

    def __init__(self, groups: list[dict], momentum: float, dtype: torch.dtype | None = torch.bfloat16) -> None:
        super().__init__(groups, {"lr": 1e-3, "momentum": momentum, "weight_decay": 0.0, "orthogonal": False})
        self.dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        for group in self.param_groups:
            if group["orthogonal"]:
                group["momentum"] = MUON_MOMENTUM

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                buffer = self.state[p].get("momentum_buffer")
                if buffer is None:
                    buffer = self.state[p]["momentum_buffer"] = grad.clone()
                else:
                    buffer.mul_(group["momentum"]).add_(grad)
                update = grad.add(buffer, alpha=group["momentum"])  # Nesterov
                if group["orthogonal"]:
                    p.mul_(len(p) ** 0.5 / p.norm())
                    update = newton_schulz(update.reshape(len(update), -1), dtype=self.dtype).view_as(p)
                p.add_(update, alpha=-group["lr"])


def without_compile_wrapper(optimizer: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A torch optimizer whose `step` skips the wrapper torch puts around it for torch.compile, which
    imports torch._dynamo on the first step: 1 s of CPU where Python has its bytecode cached, 5 s on a
    fresh GPU machine that compiles it from source (a third of a fast94 command). cifarlab never
    compiles a step (`--compile` compiles the model), and outside compiled code the wrapper only turns
    gradients off around the step: the same update, bit for bit (tests/test_optim.py)."""
    step = inspect.unwrap(optimizer.step)

    @torch.no_grad()
    def plain_step(self: torch.optim.Optimizer, closure: Callable | None = None):
        return step(self, closure)

    return type(optimizer.__name__, (optimizer,), {"step": plain_step, "__doc__": optimizer.__doc__})


SGD, Adam, AdamW = (without_compile_wrapper(o) for o in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW))

# name -> builder(parameter groups, momentum, the run's autocast dtype or None); each group carries its
# own lr and weight decay
OPTIMIZERS: dict[str, Callable[[list[dict], float, torch.dtype | None], torch.optim.Optimizer]] = {
    "adam": lambda groups, momentum, dtype: Adam(groups),
    "adamw": lambda groups, momentum, dtype: AdamW(groups),
    "sgd": lambda groups, momentum, dtype: SGD(groups, momentum=momentum, nesterov=momentum > 0),
    "muon": Muon,  # the filters' group from param_groups(..., filter_lr=--muon-lr)
}


def build_optimizer(name: str, groups: list[dict], momentum: float = 0.9,
                    dtype: torch.dtype | None = None) -> torch.optim.Optimizer:
    """`dtype`: the run's autocast dtype (None: fp32), the precision Muon orthogonalises in."""
    if name not in OPTIMIZERS:
        raise unknown_name("optimizer", name, list(OPTIMIZERS))
    _skip_dynamo_import()
    return OPTIMIZERS[name](groups, momentum, dtype)


def _skip_dynamo_import() -> None:
    """Build and use an optimizer without importing torch._dynamo, which a 20 s run would spend 1 s on.

    torch.optim.Optimizer wraps add_param_group, zero_grad and the state-dict methods so that
    torch.compile leaves them alone; on its first call the wrapper imports torch._dynamo to make that
    version, and caches it on the function. cifarlab never calls them inside compiled code (`--compile`
    compiles the model, not the step), where the version that torch.compile skips and the plain
    function behave alike: cache the plain one. Should torch rename the cache, the import simply
    happens as before."""
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        plain = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if plain is not None:
            setattr(plain, "__dynamo_disable", plain)


def _warmup_then(start: float, decay: Callable[[float], float], warmup_steps: int,
                 total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at `step`: linear warm-up from `start`, then `decay(progress in 0..1)`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return start + (1 - start) * (step + 1) / warmup_steps
        return decay((step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return factor


# name -> (where the warm-up starts, the decay after it)
SCHEDULES: dict[str, tuple[float, Callable[[float], float]]] = {
    "constant": (0.0, lambda progress: 1.0),
    "onecycle": (0.0, lambda progress: max(1.0 - progress, 0.0)),  # linear decay to zero after the peak
    "cosine": (0.0, lambda progress: 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))),
    # airbench94's triangle: from 0.2 of the peak up to it, then down to 0.07 at the last step
    "triangle": (0.2, lambda progress: 1.0 - 0.93 * min(progress, 1.0)),
}


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0,
                    done: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule (stepped after every batch); `done` steps already taken (a schedule replaced
    part-way, as --time-budget does once it knows the run's length)."""
    if name not in SCHEDULES:
        raise unknown_name("schedule", name, list(SCHEDULES))
    factor = _warmup_then(*SCHEDULES[name], warmup_steps, total_steps)
    # with last_epoch k - 1 torch takes each group's initial_lr and steps once: the rate of step k
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=done - 1)
