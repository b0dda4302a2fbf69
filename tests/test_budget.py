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


def test_a_budgeted_run_plans_its_steps_from_its_step_time_and_ends_in_time(images: Path, tmp_path: Path,
                                                                          monkeypatch, capsys) -> None:
    """Each step made to take 40 ms more: the plan must follow the measured time, not a guess."""
    import cifarlab.trainer as trainer_module

    real_step = trainer_module.train_step

    def slow_step(*args, **kwargs):
        time.sleep(0.04)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", slow_step)
    budget, run = 3.0, tmp_path / "run"
    assert main(["train", "--data", str(images), *TINY, "--time-budget", str(budget), "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    steps = summary["time_budget"]["steps"]
    assert config["max_steps"] == steps and f"so {steps} steps" in printed
    assert 25 <= steps <= budget / 0.04  # about 0.92 * 3 s / (40 ms + a tiny step): planned from the time
    assert summary["time_budget"]["used_seconds"] <= budget + 2.0  # noisy machines: a generous margin
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == config["epochs"] == -(-steps // 13)  # 108 images, batch 8: 13 steps an epoch
    assert all(row.split(",")[4] == "" for row in rows[:-1]) and rows[-1].split(",")[4] != ""  # last epoch only


def test_a_budget_too_small_for_a_useful_run_says_the_least_that_would_do(images: Path, tmp_path: Path,
                                                                          monkeypatch, capsys) -> None:
    import cifarlab.trainer as trainer_module

    real_step = trainer_module.train_step
    monkeypatch.setattr(trainer_module, "train_step", lambda *a, **k: time.sleep(0.05) or real_step(*a, **k))
    assert main(["train", "--data", str(images), *TINY, "--time-budget", "0.3", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--time-budget 0.3: too small for a useful run here" in err and "need at least" in err


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


def test_the_plan_is_revised_as_the_steps_slow_down(images: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Planned once from the first steps, a run whose steps then slow down overruns its budget: every
    tenth of the run plans the rest again from the mean step time so far, so the plan shrinks, also
    within one epoch (batch 1: 108 steps an epoch; at 40 ms a step at most about 70 are planned)."""
    import cifarlab.trainer as trainer_module

    real_step, calls = trainer_module.train_step, []

    def slowing_step(*args, **kwargs):
        calls.append(1)
        time.sleep(0.04 if len(calls) <= 26 else 0.1)
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
    assert summary["time_budget"]["used_seconds"] <= 3 + 2.0  # noisy machines: the same margin as above


def test_a_budgeted_run_stopped_after_its_plan_resumes_to_the_planned_step(images: Path, tmp_path: Path,
                                                                           monkeypatch, capsys) -> None:
    """Ctrl-C after the plan: the checkpoint holds the plan, and the resumed run trains to its step (no
    new plan: the clock of a resumed run says nothing about the steps left)."""
    import signal

    import torch.nn.functional as F

    from cifarlab.errors import INTERRUPTED_STATUS

    real, calls = F.cross_entropy, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 30:  # the plan comes after 21 steps
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", interrupting)
    run = tmp_path / "run"
    assert main(["train", "--data", str(images), *TINY, "--time-budget", "5", "--out", str(run)]) == INTERRUPTED_STATUS
    plans = [int(line.split(" so ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
             if line.startswith("time budget")]
    assert plans and plans[-1] > 30
    monkeypatch.setattr(F, "cross_entropy", real)
    calls.clear()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "time budget" not in out
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert config["max_steps"] == plans[-1] == summary["time_budget"]["steps"]
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == config["epochs"] == -(-plans[-1] // 13)  # 13 steps an epoch: trained to the planned step
