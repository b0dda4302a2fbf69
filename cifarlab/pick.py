"""`--time-budget SECONDS` without `--recipe`: the recipe expected to be most accurate in that time here.

Two things decide it. How accurate each candidate gets for the epochs it trains is a curve measured once
(CURVES: budgeted and full runs on the CIFAR-10 validation split, 45,000 training images; accuracy does
not depend on the machine, only how many epochs fit does). How many epochs fit is measured here: the
candidate's training speed on this CPU (the precision tuner's images/s, cached in tuning.json, so a later
run measures nothing), times the seconds the budget leaves for training. The prediction is the curve
interpolated in log-epochs, flat beyond its longest run (no credit for an extrapolation) and unknown below
its shortest (never picked there). A candidate whose shortest measured run could not fit even at twice the
speed its FLOPs suggest is not timed at all: fast96's trial steps alone would take minutes on two cores.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from cifarlab.budget import FORWARD_SHARE, SAFETY, eval_passes
from cifarlab.build import mean_step_cost
from cifarlab.config import TrainConfig
from cifarlab.device import pick_device
from cifarlab.distributed import env_info
from cifarlab.errors import CifarlabError
from cifarlab.models import create_model
from cifarlab.models.catalog import forward_flops
from cifarlab.tuning import training_speed

TRAIN_IMAGES = 45_000  # CIFAR-10's training images less the default 5,000 held out: what CURVES were measured on
EVAL_IMAGES = 5_000
EFFICIENCY_SLACK = 2.0  # a wider net may run up to this much faster per FLOP than the reference (bigger GEMMs)
# epochs trained -> accuracy (%, with the recipe's TTA) on the validation split. fast75, fast85: the
# `--time-budget` runs of docs/benchmarks.md (Zen 4 in bf16 and limited to AVX2 pooled; steps x 512 / 45,000;
# runs of nearly the same length averaged) and their full-length runs; fast90: its full-length runs on the
# CPU (median of seeds); fast94-96: full-length runs on a GPU
CURVES: dict[str, tuple[tuple[float, float], ...]] = {
    "fast75": ((1.81, 76.94), (2.28, 78.52), (3.88, 80.76), (5.10, 81.66), (8.14, 82.56), (10.23, 82.98),
               (16.21, 83.82), (25.82, 84.36), (41.07, 84.66)),
    "fast85": ((0.40, 52.56), (1.15, 76.90), (2.76, 82.94), (5.94, 86.02), (8.00, 86.22), (8.65, 86.52),
               (14.86, 87.68)),
    "fast90": ((11.0, 89.32),),
    "fast94": ((10.0, 90.26),),
    "fast95": ((15.0, 91.63),),
    "fast96": ((40.0, 93.04),),
}


@dataclasses.dataclass
class Choice:
    recipe: str
    speed: float | None  # training images/s here (None: not measured)
    epochs: float | None  # what the budget buys at that speed
    accuracy: float | None  # the curve's prediction (None: below its shortest run, or not measured)

    def describe(self) -> str:
        if self.speed is None:
            return (f"{self.recipe} not timed: its shortest measured run ({CURVES[self.recipe][0][0]:g} epochs) "
                    f"cannot fit at the speed its FLOPs allow")
        expected = f"{self.accuracy:.1f}%" if self.accuracy is not None else "below its shortest measured run"
        return f"{self.recipe} {expected} ({self.epochs:.2f} epochs at {self.speed:,.0f} images/s)"


def expected_accuracy(curve: tuple[tuple[float, float], ...], epochs: float) -> float | None:
    """The curve at `epochs`: linear in log-epochs between points, its last value beyond, None before."""
    if epochs < curve[0][0]:
        return None
    for (e0, a0), (e1, a1) in zip(curve, curve[1:]):
        if epochs <= e1:
            return a0 + (a1 - a0) * math.log(epochs / e0) / math.log(e1 / e0)
    return curve[-1][1]


def epochs_in_budget(config: TrainConfig, budget: float, speed: float) -> float:
    """Epochs of TRAIN_IMAGES that fit at `speed` full-size training images/s: the share of the budget
    budget.py plans for steps, less the final evaluation's passes (forward only) over EVAL_IMAGES, over
    the recipe's average step (smaller under --progressive-resize)."""
    eval_seconds = EVAL_IMAGES * FORWARD_SHARE * eval_passes(config) / speed
    return max(SAFETY * budget - eval_seconds, 0.0) * speed / (TRAIN_IMAGES * mean_step_cost(config))


def recipe_flops(config: TrainConfig) -> int:
    """FLOPs of one full-size image's forward pass through the recipe's network."""
    return forward_flops(create_model(config.model, **config.builder_args(10)), config.image_size)


def pick_recipe(budget: float, configs: dict[str, TrainConfig],
                measure: Callable[[TrainConfig], float]) -> tuple[str, list[Choice]]:
    """The candidate (name -> its config, the user's flags applied) with the best expected accuracy in
    `budget` seconds, and what was found for each. `measure(config)` is its training images/s here;
    candidates are timed from the cheapest network up, each only if it could fit."""
    flops = {name: recipe_flops(config) for name, config in configs.items()}
    order = sorted(configs, key=flops.get)
    reference = order[0]  # the cheapest network, always timed: the others' FLOP-scaled ceilings start from it
    speeds = {reference: measure(configs[reference])}
    choices = []
    for name in order:
        config = configs[name]
        if name not in speeds:
            ceiling = EFFICIENCY_SLACK * speeds[reference] * flops[reference] / flops[name]
            if epochs_in_budget(config, budget, ceiling) < CURVES[name][0][0]:
                choices.append(Choice(name, None, None, None))
                continue
            speeds[name] = measure(config)
        epochs = epochs_in_budget(config, budget, speeds[name])
        choices.append(Choice(name, speeds[name], epochs, expected_accuracy(CURVES[name], epochs)))
    ranked = [c for c in choices if c.accuracy is not None]
    best = max(ranked, key=lambda c: c.accuracy).recipe if ranked else reference
    return best, choices


CANDIDATES = ("fast75", "fast85", "fast90", "fast94", "fast95", "fast96")


def cpu_speed(config: TrainConfig) -> float:
    """The candidate's training images/s on this CPU (CIFAR-10's 10 classes, as CURVES were measured)."""
    return training_speed(config, 10)


def recipe_for_budget(budget: float, configs: dict[str, TrainConfig]) -> str:
    """pick_recipe with this CPU's measured speeds; prints what it found. One process on a CPU only: a
    GPU's step times are not what the tuner measures, and torchrun's ranks must not each decide."""
    device = pick_device(next(iter(configs.values())).device)
    if device.type != "cpu" or env_info().world > 1:
        raise CifarlabError(f"--time-budget {budget:g} without --recipe: the recipe is picked from step times "
                            "measured on a CPU in one process; here name it (for example --recipe fast94)")
    name, choices = pick_recipe(budget, configs, cpu_speed)
    print(f"--time-budget {budget:g} without --recipe: picked {name}; expected here: "
          + "; ".join(choice.describe() for choice in choices))
    return name
