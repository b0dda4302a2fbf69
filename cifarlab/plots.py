"""Every picture cifarlab draws: the notebook's train-vs-validation curves, the evaluation views
(confusion matrix, worst mistakes, reliability diagram), the generalisation gap, and the lr-find plot.

Functions named draw_* return a matplotlib `Figure` drawn with the Agg canvas, never pyplot: nothing
needs a display and nothing leaks between calls; the caller saves it (`rundir.save_figure`).
matplotlib is imported lazily (it is slow to import). Only the notebook helpers `plot_metric_curve`
and `plot_history` use pyplot, to show inline.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from cifarlab.records import History


def plot_metric_curve(train_metric: Sequence[float], val_metric: Sequence[float], n_epochs: int,
                      metric_name: str, x_axis_name: str = "Epoch", ax=None, show: bool = True):
    """The notebook's plot: one metric, train vs validation, both spread over 0..n_epochs."""
    import matplotlib.pyplot as plt

    own_figure = ax is None
    if own_figure:
        _, ax = plt.subplots()
    for values, label in ((train_metric, "train"), (val_metric, "validation")):
        if len(values):
            steps = np.linspace(start=n_epochs / len(values), stop=n_epochs, num=len(values))
            ax.plot(steps, values, marker="o" if len(values) < 30 else None, label=label)
    ax.set_title(f"{metric_name} vs. {x_axis_name}")
    ax.set_xlabel(x_axis_name)
    ax.set_ylabel(metric_name)
    ax.grid(alpha=0.3)
    ax.legend()
    if own_figure and show:
        plt.show()
    return ax


def _draw_curves(figure, history: "History", n_epochs: int) -> None:
    """Loss and accuracy, train vs validation; per batch for training where the history kept it."""
    loss_ax, acc_ax = figure.subplots(1, 2)
    val_loss = [v for v in history.column("val_loss") if v is not None]
    val_acc = [v for v in history.column("val_acc") if v is not None]
    train_loss = history.batch_loss or history.column("train_loss")
    train_acc = history.batch_acc or history.column("train_acc")
    plot_metric_curve(train_loss, val_loss, n_epochs, "Loss", ax=loss_ax)
    plot_metric_curve(train_acc, val_acc, n_epochs, "Accuracy", ax=acc_ax)


def plot_history(history: "History", n_epochs: int) -> None:
    """Show loss and accuracy curves side by side (in a notebook, inline)."""
    import matplotlib.pyplot as plt

    _draw_curves(plt.figure(figsize=(11, 4.2), layout="constrained"), history, n_epochs)
    plt.show()


def draw_curves(history: "History", n_epochs: int):
    """Loss and accuracy curves (train vs validation) side by side, without pyplot or a display."""
    figure = _figure(11, 4.2)
    _draw_curves(figure, history, n_epochs)
    return figure


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def draw_confusion_matrix(matrix: list[list[int]], classes: list[str]):
    """Counts, coloured by the share of each true class (rows), with class names on both axes."""
    counts = np.asarray(matrix, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    side = min(max(4.5, 0.55 * k + 2), 16)
    figure = _figure(side + 1, side)
    ax = figure.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if k <= 20:  # beyond that the numbers no longer fit in the cells
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    ticks = range(k) if k <= 40 else []
    ax.set_xticks(list(ticks), [classes[i] for i in ticks], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(list(ticks), [classes[i] for i in ticks], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    return figure


def draw_worst_mistakes(images: torch.Tensor, mistakes: list[dict], columns: int = 4):
    """The most confidently wrong images with their true and predicted labels and the probability.

    The tiles are pasted into one mosaic and drawn as a single image (one axes, not one per tile):
    a 16-axes figure took seconds to lay out, which `train` would pay at the end of every run.
    """
    rows = max(1, -(-len(mistakes) // columns))
    side, pad_x, pad_top = images.shape[-1], 4, 12  # pixels of the image; room for the two label lines
    cell_w, cell_h = side + 2 * pad_x, side + pad_top
    mosaic = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    for n, mistake in enumerate(mistakes):
        y, x = (n // columns) * cell_h + pad_top, (n % columns) * cell_w + pad_x
        mosaic[y:y + side, x:x + side] = images[mistake["index"]].permute(1, 2, 0).numpy()
    scale = 1.8 / cell_w  # inches per mosaic pixel: each tile 1.8 inches wide
    figure = _figure(columns * cell_w * scale, rows * cell_h * scale + 0.4, layout=None)
    ax = figure.add_axes((0, 0, 1, 1 - 0.4 / (rows * cell_h * scale + 0.4)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    for n, mistake in enumerate(mistakes):
        x, y = (n % columns) * cell_w + cell_w / 2, (n // columns) * cell_h + pad_top - 1
        ax.text(x, y, f"true: {mistake['true']}\npred: {mistake['predicted']} ({mistake['probability']:.2f})",
                ha="center", va="bottom", fontsize=8)
    if not mistakes:
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center", transform=ax.transAxes)
    figure.suptitle("Most confident mistakes")
    return figure


def draw_reliability(bins: dict, ece: float):
    """Accuracy against confidence per bin; a calibrated model follows the diagonal."""
    edges = np.asarray(bins["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    accuracy = np.array([np.nan if a is None else a for a in bins["accuracy"]])
    confidence = np.array([np.nan if c is None else c for c in bins["confidence"]])
    figure = _figure(5.5, 6)
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.bar(centres, np.nan_to_num(accuracy), width=width, edgecolor="black", label="accuracy")
    # hatched, not filled: where accuracy exceeds confidence the gap overlaps the accuracy bar
    top.bar(centres, np.nan_to_num(confidence - accuracy), bottom=np.nan_to_num(accuracy), width=width,
            color="none", edgecolor="tab:red", hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {100 * ece:.2f}%)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, bins["count"], width=width, color="gray", edgecolor="black")
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    return figure


def draw_generalisation_gap(epochs: list[int], train_acc: list[float], val_acc: list[float]):
    """Train vs validation accuracy, and their difference, epoch by epoch."""
    figure = _figure(11, 4.2)
    left, right = figure.subplots(1, 2)
    train, val = 100 * np.asarray(train_acc), 100 * np.asarray(val_acc)
    left.plot(epochs, train, marker="o", label="train")
    left.plot(epochs, val, marker="o", label="validation")
    left.fill_between(epochs, train, val, alpha=0.2, color="gray", label="gap")
    left.set_title("Accuracy, train vs validation")
    left.set_ylabel("accuracy (%)")
    right.bar(epochs, train - val, color=["tab:red" if g > 0 else "tab:green" for g in train - val])
    right.axhline(0, color="black", linewidth=0.8)
    right.set_title("Generalisation gap (train - validation)")
    right.set_ylabel("percentage points")
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
    left.legend()
    return figure


def draw_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float | None):
    """Loss against learning rate (log axis), raw and smoothed, with the suggestion marked."""
    figure = _figure(7, 4.5)
    ax = figure.subplots()
    ax.plot(lrs, losses, alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, label="smoothed loss")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", linestyle="--",
                   label=f"suggested lr {suggestion:.2g} (steepest descent)")
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:  # keep the divergence from squashing the interesting part
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 4 * min(finite)) * 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("Learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return figure


def _plot_runs(ax, runs: list[tuple[str, list[dict]]], train_key: str, val_key: str, scale: float) -> None:
    """One colour per run: train dashed, validation solid; only validation is labelled, once per run."""
    for i, (name, metrics) in enumerate(runs):
        colour = f"C{i % 10}"
        for key, style, label in ((train_key, "--", None), (val_key, "-", name)):
            points = [(row["epoch"], scale * row[key]) for row in metrics if row.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                # markers when there are few points: a one-epoch run is otherwise invisible
                ax.plot(xs, ys, style, color=colour, label=label, marker="o" if len(xs) < 30 else None,
                        markersize=3)


def draw_comparison(runs: list[tuple[str, list[dict]]]):
    """Loss and accuracy against epoch for every (name, metrics rows) run, in one figure (`cifarlab compare`)."""
    from matplotlib.ticker import MaxNLocator

    figure = _figure(12, 4.6)
    loss_ax, acc_ax = figure.subplots(1, 2)
    _plot_runs(loss_ax, runs, "train_loss", "val_loss", 1.0)
    _plot_runs(acc_ax, runs, "train_acc", "val_acc", 100.0)
    for ax, title, unit in ((loss_ax, "Loss", "loss"), (acc_ax, "Accuracy", "accuracy (%)")):
        ax.set_title(f"{title} (dashed: train, solid: validation)")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if acc_ax.get_legend_handles_labels()[0]:
        acc_ax.legend(fontsize=8)
    else:
        acc_ax.text(0.5, 0.5, "no epochs recorded yet", ha="center", va="center", transform=acc_ax.transAxes)
    return figure
