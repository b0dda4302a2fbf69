"""`--time-budget SECONDS`: the best model this machine can train in that time.

Budgeted training (Li et al., 2020): a schedule that decays to zero exactly when the time runs out
beats the same schedule cut short. The run's first steps are timed on the real model and data; then
the number of steps is fixed so that training plus the final evaluation end within the budget, the
schedule is rebuilt to reach zero at that step (its warm-up keeps the recipe's share of the run), and
the plan is written into the run's config (`max_steps`, `epochs`), so a resumed run keeps it. Under
a budget only the last epoch is evaluated: per-epoch evaluations would spend the budget on numbers.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from cifarlab.build import Run, make_scheduler
from cifarlab.config import TrainConfig
from cifarlab.distributed import broadcast_object
from cifarlab.errors import CifarlabError

CALIBRATION_STEPS = 20  # timed after the first (which builds the kernels): their mean is the step time
SAFETY = 0.92  # share of the remaining time planned for steps: the machines are noisy
FORWARD_SHARE = 0.4  # an evaluation image costs about this much of a training image (forward only)
TTA_PASSES = {0: 1, 1: 3, 2: 7}  # passes over the evaluation split at the end: plain, then the TTA views
MIN_EPOCH_SHARE = 0.25  # the least useful run: a quarter of the training images seen once


class TimeBudget:
    """Times the first steps of a budgeted run, then plans its length (`after_step` returns the plan)."""

    def __init__(self, config: TrainConfig, run: Run, started: float, eval_images: int) -> None:
        self.config, self.run, self.started, self.eval_images = config, run, started, eval_images
        self.stamps: list[float] = []
        self.estimate: dict = {}  # what the plan assumed, for summary.json

    def after_step(self, loss: torch.Tensor) -> TrainConfig | None:
        """After each of the first steps: None while timing, then once the planned config."""
        if len(self.stamps) > CALIBRATION_STEPS:
            return None
        loss.item()  # wait for the step to finish (a GPU runs ahead): a sync for these few steps only
        self.stamps.append(time.perf_counter())
        return self._plan() if len(self.stamps) > CALIBRATION_STEPS else None

    def _plan(self) -> TrainConfig:
        config, steps_per_epoch = self.config, len(self.run.train_loader)
        # the mean, not the median: occasional slow steps (the collector, a noisy neighbour) are part of the
        # throughput the rest of the run will see (with 8 steps and the median, plans missed by -11%..+4%)
        step_seconds = (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)
        image_seconds = step_seconds / config.batch_size
        eval_seconds = self.eval_images * image_seconds * FORWARD_SHARE * TTA_PASSES[config.tta]
        done = len(self.stamps)
        used = time.perf_counter() - self.started
        steps = done + int(SAFETY * (config.time_budget - used - eval_seconds) / step_seconds)
        least = max(done + 1, math.ceil(MIN_EPOCH_SHARE * steps_per_epoch))
        if steps < least:
            need = used + eval_seconds + (least - done) * step_seconds / SAFETY
            raise CifarlabError(f"--time-budget {config.time_budget:g}: too small for a useful run here: "
                                f"{step_seconds:.3f} s a step, {least} steps at least (a quarter epoch) and about "
                                f"{eval_seconds:.1f} s of evaluation need at least {math.ceil(need)} s")
        warmup_share = config.warmup_epochs / config.epochs  # the recipe's share of the run spent warming up
        planned = dataclasses.replace(config, max_steps=steps, epochs=math.ceil(steps / steps_per_epoch),
                                      warmup_epochs=warmup_share * steps / steps_per_epoch)
        self.estimate = {"step_seconds": round(step_seconds, 5), "eval_seconds": round(eval_seconds, 2)}
        planned = broadcast_object(planned)  # under torchrun every rank follows rank 0's plan
        step = self.run.step
        step.scheduler = make_scheduler(step.optimizer, planned, steps_per_epoch, done)
        if step.lookahead is not None:
            step.lookahead.total_steps = steps
        print(f"time budget {config.time_budget:g} s: {step_seconds * 1000:.0f} ms a step, so {steps} steps "
              f"({steps / steps_per_epoch:.2f} epochs) and about {eval_seconds:.1f} s of final evaluation")
        return planned
