"""The learning-rate range test (Smith 2015, as fastai's lr_find and Lightning's Tuner run it).

Train a fresh model from the recipe for a few hundred steps while the learning rate grows
exponentially from `start_lr` to `end_lr`; record the loss of every step. The loss first stays flat
(lr too small to move), then falls, then blows up. The suggestion is where the smoothed loss falls
fastest against log(lr): large enough to learn quickly, well below where training diverges.
It is a separate command on a throw-away model, so nothing is restored afterwards.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarlab.build import build_run, local_runtime
from cifarlab.config import TrainConfig
from cifarlab.data import load_data
from cifarlab.engine import train_step
from cifarlab.errors import CifarlabError
from cifarlab.plots import draw_lr_find
from cifarlab.rundir import save_figure

SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected (fastai's choice)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its best value


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # raw loss per step
    smoothed: list[float]
    suggestion: float | None  # None when the loss never fell
    stopped_early: bool  # diverged before end_lr


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    average, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** i))
    return out


def suggest(lrs: list[float], smoothed: list[float], skip_start: int = 5, skip_end: int = 3) -> float | None:
    """The lr at the steepest descent of the smoothed loss against log(lr); the ends are noisy, so skipped."""
    if len(lrs) < skip_start + skip_end + 3:
        skip_start, skip_end = 0, 0
    x, y = np.log(lrs[skip_start:len(lrs) - skip_end]), np.asarray(smoothed[skip_start:len(lrs) - skip_end])
    if len(x) < 3:
        return None
    slope = np.gradient(y, x)
    best = int(np.argmin(slope))
    return float(math.exp(x[best])) if slope[best] < 0 else None


def lr_range_test(config: TrainConfig, steps: int = 200, start_lr: float = 1e-7, end_lr: float = 10.0) -> LRFindResult:
    """Run the sweep on the run `train` would build from `config` (the same data-dependent init,
    layout, parameter groups and optimizer), its schedule replaced by the sweep. Every group's rate
    grows by the same factor, so their ratios (`bias_lr_scale`) stay as in training."""
    if not (0 < start_lr < end_lr):
        raise CifarlabError(f"--start-lr {start_lr} / --end-lr {end_lr}: need 0 < start < end")
    if steps < 10:
        raise CifarlabError(f"--steps {steps}: must be 10 or more")
    config = dataclasses.replace(config, lr=start_lr, schedule="constant", warmup_epochs=0.0).validate()
    bundle = load_data(config.data, config.dataset, config.val_split, config.seed, config.image_size)
    config, runtime = local_runtime(config, bundle)
    torch.manual_seed(config.seed)
    run = build_run(config, bundle, runtime)
    factor = (end_lr / start_lr) ** (1 / (steps - 1))
    run.step.scheduler = torch.optim.lr_scheduler.ExponentialLR(run.step.optimizer, gamma=factor)
    run.step.model.train()
    lrs, losses = [], []
    best, stopped_early, average = math.inf, False, 0.0
    while len(lrs) < steps and not stopped_early:
        for batch in run.train_loader:  # as many passes as the steps need
            lrs.append(run.step.optimizer.param_groups[0]["lr"])
            loss, _ = train_step(run.step, batch)
            value = loss.item()  # one sync per step is the point here: every step's loss is the result
            losses.append(value)
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            current = average / (1 - SMOOTHING ** len(losses))  # bias-corrected, as `smooth`
            best = min(best, current)
            if not math.isfinite(value) or current > DIVERGED * best:
                stopped_early = True
                break
            if len(lrs) == steps:
                break
    smoothed = smooth(losses)
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    kept_lrs, kept = [lrs[i] for i in finite], [smoothed[i] for i in finite]
    return LRFindResult(lrs, losses, smoothed, suggest(kept_lrs, kept), stopped_early)


def save_lr_plot(result: LRFindResult, path: Path) -> None:
    """Loss against learning rate (log axis), raw and smoothed, with the suggestion marked."""
    save_figure(draw_lr_find(result.lrs, result.losses, result.smoothed, result.suggestion), path)
