"""The learning-rate range test: the suggestion rule on a known curve, and the command end to end."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cifarlab.cli import main
from cifarlab.config import TrainConfig
from cifarlab.lr_find import lr_range_test, smooth, suggest


def test_suggestion_is_the_steepest_descent_of_the_loss() -> None:
    lrs = list(np.logspace(-6, 1, 100))
    # flat at 2.3, falls fastest around lr 1e-3 (a logistic in log10 lr), then blows up past 1
    losses = [2.3 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + (0 if lr < 1 else 5 * (lr - 1)) for lr in lrs]
    suggestion = suggest(lrs, losses)
    assert 10 ** -3.3 < suggestion < 10 ** -2.7


def test_no_suggestion_when_the_loss_never_falls() -> None:
    lrs = list(np.logspace(-6, 1, 50))
    assert suggest(lrs, [1.0 + i for i in range(50)]) is None


def test_smoothing_is_bias_corrected() -> None:
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards the initial 0
    # beta 0.5: averages 0.5, 1.75, 2.375 divided by 1 - 0.5**i; raw values or the bare averages differ
    assert smooth([1.0, 3.0, 3.0], beta=0.5) == pytest.approx([1.0, 1.75 / 0.75, 2.375 / 0.875])


def test_the_sweep_grows_exponentially_and_stops_on_divergence(tmp_path: Path, image_folder_writer) -> None:
    image_folder_writer(tmp_path / "images", {name: 8 for name in ("cat", "dog")})
    config = TrainConfig(data=str(tmp_path / "images"), model_args={"channels": [4, 4, 8, 8], "hidden": 16},
                         batch_size=4, val_split=0, translate=0, flip=False)
    result = lr_range_test(config, steps=60, start_lr=1e-4, end_lr=1e6)  # Adam at lr 1e6 must blow up
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, math.log(1e10) / 59)  # one constant factor per step
    assert result.stopped_early and len(result.lrs) < 60
    assert not math.isfinite(result.losses[-1]) or result.smoothed[-1] > 4 * min(result.smoothed)


def test_lr_find_command_writes_the_plot_and_suggests(tmp_path: Path, image_folder_writer, capsys,
                                                     monkeypatch) -> None:
    """The printed line and the drawn curves are the sweep's own numbers, and the suggestion is marked."""
    from PIL import Image

    from cifarlab import lr_find

    image_folder_writer(tmp_path / "images", {name: 8 for name in ("cat", "dog", "frog")})
    results, figures = [], []
    real_test, real_save = lr_find.lr_range_test, lr_find.save_figure
    monkeypatch.setattr(lr_find, "lr_range_test", lambda *a, **k: results.append(real_test(*a, **k)) or results[-1])
    monkeypatch.setattr(lr_find, "save_figure", lambda figure, path: figures.append(figure) or real_save(figure, path))
    out = tmp_path / "lr.png"
    assert main(["lr-find", "--data", str(tmp_path / "images"), "--batch-size", "8", "--val-split", "0",
                 "--steps", "10", "--out", str(out)]) == 0
    (result,), (figure,) = results, figures
    assert result.suggestion is not None  # the sweep is seeded: the same losses every run
    assert capsys.readouterr().out.strip().endswith(f"suggested lr {result.suggestion:.3g}; wrote {out}")
    (ax,) = figure.axes
    raw, smoothed, marker = ax.get_lines()
    assert np.array_equal(raw.get_xdata(), result.lrs) and np.array_equal(raw.get_ydata(), result.losses)
    assert np.array_equal(smoothed.get_ydata(), result.smoothed)
    assert list(marker.get_xdata()) == [result.suggestion] * 2 and ax.get_xscale() == "log"
    assert Image.open(out).size == (700, 450)  # the figure as PNG: 7 x 4.5 inches at 100 dpi


def test_lr_find_rejects_a_backwards_range(tmp_path: Path, image_folder_writer, capsys) -> None:
    image_folder_writer(tmp_path / "images", {"cat": 3, "dog": 3})
    assert main(["lr-find", "--data", str(tmp_path / "images"), "--start-lr", "1", "--end-lr", "0.1"]) == 2
    assert "need 0 < start < end" in capsys.readouterr().err


def test_lr_find_on_fast75_sweeps_the_whitened_network_with_training_parameter_groups(
        tmp_path: Path, image_folder_writer, monkeypatch) -> None:
    """lr-find builds its run with `build_run`, as `train` does: the whitening stem is fitted to the data
    (not left random), the layout is the recipe's, and every group's rate keeps its training ratio."""
    import dataclasses

    import torch

    from cifarlab import lr_find
    from cifarlab.build import build_run, local_runtime
    from cifarlab.config import recipe
    from cifarlab.data import load_data
    from cifarlab.models import create_model

    image_folder_writer(tmp_path / "images", {name: 12 for name in ("cat", "dog", "frog")})
    config = dataclasses.replace(recipe("fast75"), data=str(tmp_path / "images"), val_split=0, batch_size=8,
                                 model_args={"widths": [8, 8, 8]})
    seen = []
    real_step = lr_find.train_step

    def spy(step, batch, sums=None):
        if not seen:
            seen.append((step.model.whiten.weight.clone(), step.model.whiten.weight.is_contiguous(),
                         [group["lr"] for group in step.optimizer.param_groups]))
        seen.append([group["lr"] for group in step.optimizer.param_groups])
        return real_step(step, batch, sums)

    monkeypatch.setattr(lr_find, "train_step", spy)
    result = lr_find.lr_range_test(config, steps=12, start_lr=1e-4, end_lr=1e-1)
    whiten, contiguous, first_lrs = seen[0]

    bundle = load_data(config.data, val_split=0)
    resolved, runtime = local_runtime(dataclasses.replace(config, lr=1e-4), bundle)
    trained = build_run(resolved, bundle, runtime)
    assert torch.equal(whiten, trained.model.whiten.weight)  # the same data-dependent init as training
    assert not torch.equal(whiten, create_model("fast_net", widths=[8, 8, 8], num_classes=3).whiten.weight)
    assert contiguous == (not resolved.channels_last)  # the layout training resolves to, not a forced one
    assert first_lrs == [group["initial_lr"] for group in trained.step.optimizer.param_groups]  # before warm-up
    for lrs in seen[1:]:
        assert lrs[1] / lrs[0] == pytest.approx(config.bias_lr_scale)  # the groups' ratio survives the sweep
    assert result.lrs[0] == pytest.approx(1e-4) and result.lrs[-1] == pytest.approx(1e-1)
