"""`--time-budget SECONDS`: the best model this machine can train in that time.

Budgeted training (Li et al., 2020): a schedule that decays to zero exactly when the time runs out
beats the same schedule cut short. The run's first steps are timed on the real model and data; then
the number of steps is fixed so that training plus the final evaluation end within the budget, the
schedule is rebuilt to reach zero at that step (its warm-up keeps the recipe's share of the run; every
tenth of the run the rest is planned again from the mean step time so far), and
the plan is written into the run's config (`max_steps`, `epochs`), so a resumed run keeps it. Under
a budget only the last epoch is evaluated: per-epoch evaluations would spend the budget on numbers.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from cifarlab.build import Run, make_scheduler, step_costs
from cifarlab.config import TrainConfig
from cifarlab.distributed import broadcast_object
from cifarlab.errors import CifarlabError

CALIBRATION_STEPS = 20  # timed after the first (which builds the kernels): their mean is the step time
SAFETY = 0.92  # share of the remaining time planned for steps: the machines are noisy
FORWARD_SHARE = 0.4  # an evaluation image costs about this much of a training image (forward only)
TTA_PASSES = {0: 1, 1: 2, 2: 6}  # passes over the evaluation split at the end: plain, then the other TTA views
MIN_EPOCH_SHARE = 0.25  # the least useful run: a quarter of the training images seen once
# the rest planned again after every tenth of the plan: step times drift on a shared machine (planned
# once, runs of 120 and 300 s overran by 3 and 5%; planned again only at epoch ends, a 30 s run of the
# seed recipe, under one epoch, overran by 7%)
REPLAN_SHARE = 0.1


def eval_passes(config: TrainConfig) -> float:
    """Passes over the evaluation split at the end, in plain-view units: the plain one, then the other TTA
    views for --tta-share of the images."""
    return 1 + (TTA_PASSES[config.tta] - 1) * config.tta_share


class TimeBudget:
    """Times the first steps of a budgeted run and plans its length; then, every tenth of the run, plans
    the rest again from the mean step time so far (`after_step` returns each new plan)."""

    def __init__(self, config: TrainConfig, run: Run, started: float, eval_images: int) -> None:
        self.config, self.run, self.started, self.eval_images = config, run, started, eval_images
        self.warmup_share = config.warmup_epochs / config.epochs  # the recipe's share of the run warming up
        self.stamps: list[float] = []
        self.done = 0  # steps taken (a budget is planned from a run's first step, never a resumed one's)
        self.next_check = 0  # the step at which the rest is planned again
        self.estimate: dict = {}  # what the last plan assumed, for summary.json

    def after_step(self, loss: torch.Tensor) -> TrainConfig | None:
        """After each step: the new plan, or None. Reading the loss waits for the step (a GPU runs
        ahead): a sync for the first steps and at each check only."""
        self.done += 1
        if self.done <= CALIBRATION_STEPS + 1:
            loss.item()
            self.stamps.append(time.perf_counter())
            if self.done <= CALIBRATION_STEPS:
                return None
            # the mean, not the median: occasional slow steps (the collector, a noisy neighbour) are part of
            # the throughput the rest of the run will see (with 8 steps and the median, plans missed by
            # -11%..+4%)
            # in seconds of a full-size step: under --progressive-resize the first steps are smaller ones
            timed = step_costs(self.config, len(self.run.train_loader), 1, self.done)
            plan = self._plan(self.done, (self.stamps[-1] - self.stamps[0]) / timed)
        elif self.done == self.next_check and self.done < self.config.max_steps:
            loss.item()
            timed = step_costs(self.config, len(self.run.train_loader), 0, self.done)
            plan = self._plan(self.done, (time.perf_counter() - self.started) / timed, tolerance=0.01)
        else:
            return None
        self.next_check = self.done + max(1, int(REPLAN_SHARE * self.config.max_steps))
        return plan

    def _plan(self, done: int, step_seconds: float, tolerance: float = 0.0) -> TrainConfig | None:
        """The run's length after `done` steps, from `step_seconds` a full-size step."""
        config, steps_per_epoch = self.config, len(self.run.train_loader)
        # under torchrun every rank plans from rank 0's clock, so all make the same decision
        step_seconds, used = broadcast_object((step_seconds, time.perf_counter() - self.started))
        eval_seconds = self.eval_images * step_seconds / config.batch_size * FORWARD_SHARE * eval_passes(config)
        steps = self._steps_for(done, max(SAFETY * (config.time_budget - used - eval_seconds) / step_seconds, 0))
        least = max(done + 1, math.ceil(MIN_EPOCH_SHARE * steps_per_epoch))
        if not config.max_steps and steps < least:
            need = used + eval_seconds + (least - done) * step_seconds / SAFETY
            raise CifarlabError(f"--time-budget {config.time_budget:g}: too small for a useful run here: "
                                f"{step_seconds:.3f} s a step, {least} steps at least (a quarter epoch) and about "
                                f"{eval_seconds:.1f} s of evaluation need at least {math.ceil(need)} s")
        steps = max(steps, done + 1)
        if config.max_steps and abs(steps - config.max_steps) <= tolerance * config.max_steps:
            return None
        planned = dataclasses.replace(config, max_steps=steps, epochs=math.ceil(steps / steps_per_epoch),
                                      warmup_epochs=self.warmup_share * steps / steps_per_epoch)
        self.config = planned
        self.estimate = {"step_seconds": round(step_seconds, 5), "eval_seconds": round(eval_seconds, 2)}
        step = self.run.step
        step.scheduler = make_scheduler(step.optimizer, planned, steps_per_epoch, done)
        if step.lookahead is not None:
            step.lookahead.total_steps = steps
        print(f"time budget {config.time_budget:g} s: {step_seconds * 1000:.1f} ms a step, so {steps} steps "
              f"({steps / steps_per_epoch:.2f} epochs) and about {eval_seconds:.1f} s of final evaluation")
        return planned

    def _steps_for(self, done: int, full_steps: float) -> int:
        """The run's length when the steps after `done` may cost `full_steps` full-size steps. Under
        --progressive-resize the sizes follow the length, so the length is found in a few rounds."""
        config, steps_per_epoch, steps = self.config, len(self.run.train_loader), done + int(full_steps)
        for _ in range(4 if config.progressive_resize else 0):
            planned = dataclasses.replace(config, max_steps=max(steps, done + 1))
            mean = step_costs(planned, steps_per_epoch, done, planned.max_steps) / (planned.max_steps - done)
            steps = done + int(full_steps / mean)
        return steps
