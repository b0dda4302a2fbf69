"""Pictures: the notebook's train-vs-validation curves. matplotlib is imported lazily (it is slow to
import), and files are drawn with the Agg backend so nothing needs a display."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from cifarlab.engine import History


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
    loss_ax, acc_ax = figure.subplots(1, 2)
    val_loss = [v for v in history.column("val_loss") if v is not None]
    val_acc = [v for v in history.column("val_acc") if v is not None]
    plot_metric_curve(history.column("train_loss"), val_loss, n_epochs, "Loss", ax=loss_ax)
    plot_metric_curve(history.column("train_acc"), val_acc, n_epochs, "Accuracy", ax=acc_ax)


def plot_history(history: "History", n_epochs: int) -> None:
    """Show loss and accuracy curves side by side (in a notebook, inline)."""
    import matplotlib.pyplot as plt

    _draw_curves(plt.figure(figsize=(11, 4.2), layout="constrained"), history, n_epochs)
    plt.show()


def save_curves(history: "History", n_epochs: int, path: Path) -> None:
    """Write loss and accuracy curves (train vs validation) to a PNG, without pyplot or a display."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    _draw_curves(figure, history, n_epochs)
    figure.savefig(path, dpi=110)
