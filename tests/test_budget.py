"""--time-budget: the run times its first steps, plans its length from them, and ends in time."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cifarlab.cli import main

TINY = ["--model", "cifar10_cnn", "--batch-size", "8", "--val-split", "12", "--seed", "1", "--device", "cpu"]


@pytest.fixture
def images(tmp_path: Path, image_folder_writer) -> Path:
    image_folder_writer(tmp_path / "images", {name: 40 for name in ("cat", "dog", "frog")})
    return tmp_path / "images"


class StepClock:
    """The `time` module, but its perf_counter moves only when a step says it took time (`spend`): the
    budget's plan then follows the test's step times exactly, however busy the machine is."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch) -> StepClock:
    """The trainer and the budget read the same clock: the command's start, every step and the plan."""
    import cifarlab.budget as budget_module
    import cifarlab.trainer as trainer_module

    fake = StepClock()
    monkeypatch.setattr(trainer_module, "time", fake)
    monkeypatch.setattr(budget_module, "time", fake)
    return fake


def test_a_budgeted_run_plans_its_steps_from_its_step_time_and_ends_in_time(images: Path, tmp_path: Path,
                                                                          monkeypatch, capsys, clock) -> None:
    """Each step takes 40 ms: the plan must follow the measured time, not a guess."""
    import cifarlab.trainer as trainer_module

    real_step = trainer_module.train_step

    def slow_step(*args, **kwargs):
        clock.spend(0.04)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", slow_step)
    budget, run = 3.0, tmp_path / "run"
    assert main(["train", "--data", str(images), *TINY, "--time-budget", str(budget), "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    steps = summary["time_budget"]["steps"]
    plans = [line for line in printed.splitlines() if line.startswith("time budget")]
    # timed over steps 1-21 (0.84 s), the final evaluation of 12 images about 0.024 s: 21 + 0.92 * 2.136 / 0.04
    assert plans[0] == "time budget 3 s: 40.0 ms a step, so 70 steps (5.38 epochs) and about 0.0 s of final evaluation"
    # planned again every tenth, the safety share applies to less and less time left: up to the budget, not past it
    assert config["max_steps"] == steps and f"so {steps} steps" in plans[-1] and 70 <= steps <= budget / 0.04
    used = summary["time_budget"]["used_seconds"]
    assert used == pytest.approx(steps * 0.04) and used <= budget
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == config["epochs"] == -(-steps // 13)  # 108 images, batch 8: 13 steps an epoch
    assert all(row.split(",")[4] == "" for row in rows[:-1]) and rows[-1].split(",")[4] != ""  # last epoch only


def test_a_budget_too_small_for_a_useful_run_says_the_least_that_would_do(images: Path, tmp_path: Path,
                                                                          monkeypatch, capsys, clock) -> None:
    import cifarlab.trainer as trainer_module

    real_step = trainer_module.train_step
    monkeypatch.setattr(trainer_module, "train_step", lambda *a, **k: clock.spend(0.05) or real_step(*a, **k))
    assert main(["train", "--data", str(images), *TINY, "--time-budget", "0.3", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    # 21 steps took 1.05 s already; 22 at least, and 0.03 s of evaluation: 1.05 + 0.03 + 0.05 / 0.92
    assert err == ("cifarlab: error: --time-budget 0.3: too small for a useful run here: 0.050 s a step, 22 steps "
                   "at least (a quarter epoch) and about 0.0 s of evaluation need at least 2 s\n")


def test_max_steps_ends_the_run_part_way_through_an_epoch(images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # --epochs 5 is more than 20 steps need: the steps decide (they once ran on, past the schedule's end)
    assert main(["train", "--data", str(images), *TINY, "--epochs", "5", "--max-steps", "20", "--out", str(run)]) == 0
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 2  # 13 steps, then 7 of the second epoch
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["images_per_second"] > 0


def test_a_fraction_of_an_epoch_ends_the_last_one_part_way(images: Path, tmp_path: Path, monkeypatch) -> None:
    """--epochs 1.5 with 13 steps an epoch: round(19.5) = 20 steps, 13 then 7, the schedule ending there."""
    import cifarlab.trainer as trainer_module

    steps = []
    real_step = trainer_module.train_step
    monkeypatch.setattr(trainer_module, "train_step", lambda *args: steps.append(1) or real_step(*args))
    run = tmp_path / "run"
    assert main(["train", "--data", str(images), *TINY, "--epochs", "1.5", "--schedule", "onecycle",
                 "--out", str(run)]) == 0
    assert len(steps) == 20 and len((run / "metrics.csv").read_text().splitlines()[1:]) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1.5 and json.loads((run / "config.json").read_text())["max_steps"] == 0


def test_the_plan_is_revised_as_the_steps_slow_down(images: Path, tmp_path: Path, monkeypatch, capsys,
                                                    clock) -> None:
    """Planned once from the first steps, a run whose steps then slow down overruns its budget: every
    tenth of the run plans the rest again from the mean step time so far, so the plan shrinks, also
    within one epoch (batch 1: 108 steps an epoch; at 40 ms a step at most about 70 are planned)."""
    import cifarlab.trainer as trainer_module

    real_step, calls = trainer_module.train_step, []

    def slowing_step(*args, **kwargs):
        calls.append(1)
        clock.spend(0.04 if len(calls) <= 26 else 0.1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", slowing_step)
    run = tmp_path / "run"
    assert main(["train", "--data", str(images), *TINY, "--batch-size", "1", "--time-budget", "3",
                 "--out", str(run)]) == 0
    plans = [int(line.split(" so ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
             if line.startswith("time budget")]
    assert len(plans) >= 2 and plans[-1] < plans[0] < 108  # revised down within the first epoch
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header + the one epoch
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time_budget"]["steps"] == plans[-1]
    assert summary["time_budget"]["used_seconds"] <= 3  # the test's clock: no margin for a noisy machine


def test_a_progressively_resized_run_plans_from_its_small_first_steps_without_overrunning(
        images: Path, tmp_path: Path, monkeypatch, capsys, clock) -> None:
    """A 16-px step takes 10 ms and a 32-px one 40 ms. Timed on the small first steps alone, a plan would
    take every step for a 10-ms one and overrun; counted by pixels, the first plan already fits."""
    import cifarlab.trainer as trainer_module

    real_step = trainer_module.train_step

    def pixel_step(step, batch, *args, **kwargs):
        clock.spend(0.04 * (batch[0].shape[-1] / 32) ** 2)
        return real_step(step, batch, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", pixel_step)
    run = tmp_path / "run"
    assert main(["train", "--data", str(images), *TINY, "--model", "resnet20", "--progressive-resize", "16:0.5",
                 "--time-budget", "3", "--out", str(run)]) == 0
    plans = [int(line.split(" so ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
             if line.startswith("time budget")]
    summary = json.loads((run / "summary.json").read_text())
    steps, used = summary["time_budget"]["steps"], summary["time_budget"]["used_seconds"]
    # half the steps at a quarter of the cost: about 0.92 * 3 / (0.625 * 0.04) = 110 steps, not 276
    assert 95 <= plans[0] <= 125 and abs(steps - plans[0]) <= 0.1 * plans[0]
    assert 0.8 * 3 <= used <= 3


def test_a_budgeted_run_stopped_after_its_plan_resumes_to_the_planned_step(images: Path, tmp_path: Path,
                                                                           monkeypatch, capsys, clock) -> None:
    """Ctrl-C after the plan: the checkpoint holds the plan, and the resumed run trains to its step (no
    new plan: the clock of a resumed run says nothing about the steps left)."""
    import signal

    import torch.nn.functional as F

    from cifarlab.errors import INTERRUPTED_STATUS

    real, calls = F.cross_entropy, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        clock.spend(0.04)  # 40 ms a step: about 110 steps planned in 5 s, whatever the machine
        if len(calls) == 30:  # the plan comes after 21 steps
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", interrupting)
    run = tmp_path / "run"
    assert main(["train", "--data", str(images), *TINY, "--time-budget", "5", "--out", str(run)]) == INTERRUPTED_STATUS
    plans = [int(line.split(" so ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
             if line.startswith("time budget")]
    assert plans and plans[-1] > 30
    monkeypatch.setattr(F, "cross_entropy", lambda *args, **kwargs: clock.spend(0.04) or real(*args, **kwargs))
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "time budget" not in out
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert config["max_steps"] == plans[-1] == summary["time_budget"]["steps"]
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == config["epochs"] == -(-plans[-1] // 13)  # 13 steps an epoch: trained to the planned step
