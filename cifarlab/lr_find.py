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
import torch.nn.functional as F

from cifarlab.config import TrainConfig
from cifarlab.data import channel_stats, load_data
from cifarlab.device import autocast, autocast_dtype, pick_device, set_cpu_threads
from cifarlab.errors import CifarlabError
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer
from cifarlab.trainer import make_loaders  # the same batches and augmentation as `train`

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
    """Run the sweep on the recipe's data, model and optimizer (its schedule is replaced by the sweep)."""
    if not (0 < start_lr < end_lr):
        raise CifarlabError(f"--start-lr {start_lr} / --end-lr {end_lr}: need 0 < start < end")
    if steps < 10:
        raise CifarlabError(f"--steps {steps}: must be 10 or more")
    config = dataclasses.replace(config, lr=start_lr).validate()
    device = pick_device(config.device)
    amp_dtype = autocast_dtype(device, config.precision)
    if device.type == "cpu":
        set_cpu_threads()
    torch.manual_seed(config.seed)
    bundle = load_data(config.data, config.dataset, config.val_split, config.seed, config.image_size)
    mean, std = channel_stats(bundle.train.images)
    model_args = {**config.model_args, "num_classes": len(bundle.classes)}
    if config.image_size != 32:
        model_args["image_size"] = config.image_size
    model = create_model(config.model, **model_args).to(device, memory_format=torch.channels_last).train()
    loader, _ = make_loaders(bundle, config, device, mean, std)
    optimizer = build_optimizer(model, config)
    factor = (end_lr / start_lr) ** (1 / (steps - 1))
    lrs, losses = [], []
    best, stopped_early, average = math.inf, False, 0.0
    while len(lrs) < steps and not stopped_early:
        for images, labels, *_ in loader:  # as many passes as the steps need (mixup partners unused)
            lr = start_lr * factor ** len(lrs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, amp_dtype):
                loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()  # one sync per step is the point here: every step's loss is the result
            lrs.append(lr)
            losses.append(value)
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            current = average / (1 - SMOOTHING ** len(losses))
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
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed loss")
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="tab:red", linestyle="--",
                   label=f"suggested lr {result.suggestion:.2g} (steepest descent)")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:  # keep the divergence from squashing the interesting part
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 4 * min(finite)) * 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("Learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    figure.savefig(path, dpi=100)
