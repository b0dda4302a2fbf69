"""The pictures of layers.csv (`--layer-stats`): gradient norm against depth, dead ReLUs per layer, and the
activation histograms over training per layer (fastai's "colorful dimension" view). docs/depth.md says
how to read each. Like plots.py: draw_* return a matplotlib Figure on the Agg canvas, no pyplot.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cifarlab.layer_stats import HIST_BINS, HIST_LIMIT, read_layer_stats
from cifarlab.plots import _figure
from cifarlab.rundir import LAYERS_FILE

MAX_TIMES = 8  # lines per depth plot: more recording times than this are thinned, evenly, first and last kept
MAX_LAYERS = 12  # histogram panels: deeper nets show this many layers, evenly spaced in depth


def _steps(rows: list[dict]) -> list[int]:
    return sorted({row["step"] for row in rows})


def _thin(values: list, most: int) -> list:
    if len(values) <= most:
        return values
    return [values[round(i * (len(values) - 1) / (most - 1))] for i in range(most)]


def plot_by_depth(ax, rows: list[dict], column: str, log: bool = True, title: str = "") -> None:
    """One line per recording time (early: dark, late: bright) of `column` against layer depth."""
    from matplotlib import colormaps

    times = _thin(_steps(rows), MAX_TIMES)
    colours = colormaps["viridis"](np.linspace(0, 0.9, len(times)))
    for step, colour in zip(times, colours):
        points = sorted((r["depth"], r[column]) for r in rows if r["step"] == step and r[column] is not None)
        if points:
            ax.plot(*zip(*points), color=colour, marker="o", markersize=2, linewidth=1, label=f"step {step}")
    if log and ax.lines:
        ax.set_yscale("log")
    ax.set_xlabel("layer depth (1: first conv)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=7, ncols=2)
    else:
        ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes)


def draw_layer_stats(rows: list[dict]):
    """Gradient norm and dead-unit fraction against depth, and the step's update-to-weight ratio."""
    figure = _figure(15, 4.2)
    grad_ax, ratio_ax, dead_ax = figure.subplots(1, 3)
    plot_by_depth(grad_ax, rows, "grad_norm", title="Weight-gradient norm by depth")
    grad_ax.set_ylabel("||dL/dW||")
    plot_by_depth(ratio_ax, rows, "update_ratio", title="Update-to-weight ratio by depth")
    ratio_ax.set_ylabel("||ΔW|| / ||W|| of the step")
    plot_by_depth(dead_ax, rows, "dead", log=False, title="Dead ReLU outputs (zeros) by depth")
    dead_ax.set_ylabel("fraction of zeros after the ReLU")
    dead_ax.set_ylim(0, 1)
    return figure


def draw_activation_histograms(rows: list[dict]):
    """Per layer, the output histogram at each recording time as one column of colour (log of the count):
    a healthy layer is a steady band; one collapsing to zero or saturating shows as a band thinning or
    moving to the edges."""
    depths = _thin(sorted({r["depth"] for r in rows}), MAX_LAYERS)
    steps = _steps(rows)
    columns = min(len(depths), 4) or 1
    lines = math.ceil(len(depths) / columns) or 1
    figure = _figure(3.2 * columns, 2.3 * lines + 0.4)
    axes = np.atleast_1d(figure.subplots(lines, columns, squeeze=False)).ravel()
    index = {step: i for i, step in enumerate(steps)}
    edges = [-100, -10, -1, 0, 1, 10, 100]
    for ax, depth in zip(axes, depths):
        grid = np.zeros((HIST_BINS, len(steps)))
        mine = [r for r in rows if r["depth"] == depth]
        for r in mine:
            grid[:, index[r["step"]]] = r["hist"]
        extent = (steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1, -HIST_LIMIT, HIST_LIMIT)
        ax.imshow(np.log1p(grid), origin="lower", aspect="auto", extent=extent, cmap="magma", interpolation="nearest")
        ax.set_yticks([math.asinh(v) for v in edges], [str(v) for v in edges], fontsize=7)
        ax.set_title(f"{depth}: {mine[0]['layer']}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(depths):]:
        ax.axis("off")
    figure.supxlabel("step", fontsize=9)
    figure.supylabel("layer output (asinh scale)", fontsize=9)
    return figure


def draw_depth_comparison(runs: list[tuple[str, list[dict]]]):
    """Gradient norm by depth of each (name, layers.csv rows) run, side by side on one shared scale."""
    figure = _figure(5 * max(len(runs), 1), 4.2)
    axes = np.atleast_1d(figure.subplots(1, max(len(runs), 1), sharey=True, squeeze=False)).ravel()
    for ax, (name, rows) in zip(axes, runs):
        plot_by_depth(ax, rows, "grad_norm", title=f"{name}: weight-gradient norm by depth")
    axes[0].set_ylabel("||dL/dW||")
    return figure


def layer_figures(run_dir: Path) -> list[tuple[str, object]]:
    """(title, figure) of each layers.csv picture of a run folder; none when it recorded no layer statistics."""
    rows = read_layer_stats(run_dir / LAYERS_FILE)
    if not rows:
        return []
    return [("Layers by depth", draw_layer_stats(rows)),
            ("Layer outputs over training (histogram per layer, colour: log count)", draw_activation_histograms(rows))]
