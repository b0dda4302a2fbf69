"""`--time-budget` without `--recipe`: the prediction from the accuracy curves and measured speeds, the
pick, and the command that trains what was picked."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cifarlab import pick
from cifarlab.cli import main
from cifarlab.config import recipe
from cifarlab.errors import CifarlabError


def test_expected_accuracy_interpolates_in_log_epochs_and_never_extrapolates() -> None:
    curve = ((1.0, 50.0), (4.0, 70.0), (8.0, 75.0))
    assert pick.expected_accuracy(curve, 1.0) == 50.0 and pick.expected_accuracy(curve, 8.0) == 75.0
    assert pick.expected_accuracy(curve, 2.0) == pytest.approx(60.0)  # halfway in log-epochs
    assert pick.expected_accuracy(curve, 6.0) == pytest.approx(70.0 + 5.0 * math.log(1.5) / math.log(2.0))
    assert pick.expected_accuracy(curve, 100.0) == 75.0  # flat beyond the longest run
    assert pick.expected_accuracy(curve, 0.99) is None  # unknown before the shortest


def test_the_epochs_a_budget_buys_leave_room_for_the_final_evaluation() -> None:
    config = recipe("fast75")  # 6 TTA views
    eval_seconds = pick.EVAL_IMAGES * pick.FORWARD_SHARE * 6 / 1000
    assert pick.epochs_in_budget(config, 100, 1000) == pytest.approx(
        (pick.SAFETY * 100 - eval_seconds) * 1000 / pick.TRAIN_IMAGES)
    assert pick.epochs_in_budget(config, 1, 10) == 0.0


def test_wider_networks_cost_more_flops() -> None:
    flops = [pick.recipe_flops(recipe(name)) for name in pick.CANDIDATES]
    assert flops == sorted(flops) and flops[-1] > 50 * flops[0]


SPEEDS = {"fast75": 6000.0, "fast85": 1900.0, "fast90": 330.0, "fast94": 300.0, "fast95": 100.0, "fast96": 40.0}  # images/s


@pytest.mark.parametrize("budget, expected", [(30, "fast75"), (300, "fast85"), (4000, "fast94")])
def test_the_pick_is_the_best_predicted_accuracy_and_slow_nets_are_not_timed(budget: float, expected: str) -> None:
    measured = []

    def measure(config) -> float:
        measured.append(config.recipe)
        return SPEEDS[config.recipe]

    configs = {name: recipe(name) for name in pick.CANDIDATES}
    name, choices = pick.pick_recipe(budget, configs, measure)
    assert name == expected
    by_name = {choice.recipe: choice for choice in choices}
    predicted = {n: pick.expected_accuracy(pick.CURVES[n], pick.epochs_in_budget(configs[n], budget, SPEEDS[n]))
                 for n in measured}
    assert {n: by_name[n].accuracy for n in measured} == predicted
    assert max((a, n) for n, a in predicted.items() if a is not None)[1] == expected
    # fast96's 40 epochs at even twice its FLOP-scaled speed take hours: it is never timed in these budgets
    assert measured[0] == "fast75" and "fast96" not in measured and by_name["fast96"].speed is None
    if budget == 30:
        assert measured == ["fast75", "fast85"]


def test_a_time_budget_without_a_recipe_trains_the_picked_recipe(tmp_path: Path, image_folder_writer,
                                                                    monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    image_folder_writer(tmp_path / "images", {name: 24 for name in ("cat", "dog")})
    speeds = {"fast75": 1e5, "fast85": 1e6, "fast90": 1e4, "fast94": 1e4, "fast95": 1e3, "fast96": 1e2}  # fast85 wins here
    monkeypatch.setattr(pick, "training_speed", lambda config, classes: speeds[config.recipe])
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "images"), "--time-budget", "3", "--val-split", "8",
                 "--out", str(run)]) == 0
    assert "--time-budget 3 without --recipe: picked fast85" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert (config["recipe"], config["model_args"]["whiten_stride"], config["time_budget"]) == ("fast85", 1, 3)
    # naming a recipe or a model keeps the choice with the user
    assert main(["train", "--data", str(tmp_path / "images"), "--time-budget", "3", "--val-split", "8",
                 "--model", "cifar10_cnn", "--out", str(tmp_path / "run2")]) == 0
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["recipe"] == "seed"


def test_under_torchrun_the_pick_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CifarlabError, match="name it"):
        pick.recipe_for_budget(60, {name: recipe(name) for name in pick.CANDIDATES})
