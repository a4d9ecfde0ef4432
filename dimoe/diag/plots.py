"""Figure helpers for the diagnostics: PNGs rendered with matplotlib's Agg canvas.

Figures are built with `matplotlib.figure.Figure` rather than `pyplot`, so nothing here touches the
global backend or pyplot's figure registry (safe in Ray workers and alongside other plotting code).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

# One colour per run in overlaid plots: this run, then the compared run.
RUN_COLOURS = ("tab:blue", "tab:orange")


def new_figure(
    rows: int = 1, cols: int = 1, width: float = 5.0, height: float = 3.6
) -> tuple[Figure, np.ndarray]:
    """A figure of rows × cols panels of the given size each; the axes always as a 2-D array."""
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def save(figure: Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return str(path)


def plot_series(
    ax: Axes, runs: Sequence[tuple[str, list[int], list[float | None]]], title: str, ylabel: str
) -> None:
    """Lines of (label, steps, values) per run, skipping undefined points."""
    plotted = False
    for colour, (label, steps, values) in zip(RUN_COLOURS, runs, strict=False):
        points = [(step, value) for step, value in zip(steps, values, strict=True) if value is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, color=colour, label=label)
            plotted = True
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend()


def heatmap(
    figure: Figure,
    ax: Axes,
    values: np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    vmax: float | None = None,
) -> None:
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yticks(range(values.shape[0]))
    figure.colorbar(image, ax=ax, shrink=0.85)


def grid_shape(panels: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(panels, max_cols)
    return -(-panels // cols), cols


def hide_unused(axes: np.ndarray, used: int) -> None:
    for ax in axes.flat[used:]:
        ax.set_visible(False)
