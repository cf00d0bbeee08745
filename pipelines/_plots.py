"""Comparison figures shared by :mod:`pipelines.sweep` and :mod:`pipelines.compare`.

Like :mod:`analyze.plots`, every function draws on a fresh Agg figure (pyplot's global state is
never touched) and returns deterministic PNG bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analyze.plots import figure_png

__all__ = ["Line", "Panel", "panels_png"]


@dataclass(frozen=True)
class Line:
    """One line of a panel: ``values`` per layer of the panel (NaN leaves a gap)."""

    label: str
    values: Sequence[float]
    style: str = "-"
    marker: str = "o"
    color_index: int = 0


@dataclass(frozen=True)
class Panel:
    """One subplot: a statistic against layer position."""

    title: str
    layers: Sequence[str]
    lines: Sequence[Line]


def panels_png(
    panels: Sequence[Panel],
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
    n_colors: int | None = None,
) -> bytes:
    """Panels side by side (at most three per row), each a statistic against layer position.

    Parameters
    ----------
    panels : sequence of Panel
    ylabel, title : str
        The y axis label of every panel and the figure's title.
    ylim : tuple of float, optional
        Fixed y range of every panel.
    n_colors : int, optional
        Number of distinct ``color_index`` values (default: the largest one plus one).

    Returns
    -------
    bytes
        A PNG image.

    Examples
    --------
    >>> png = panels_png([Panel("run", ["a", "b"], [Line("t=0.99", [0.5, 0.25])])], "saturation", "t")
    >>> png[:4] == b"\\x89PNG"
    True
    """
    if not panels:
        raise ValueError("panels_png: nothing to draw")
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    widest = max(len(p.layers) for p in panels)
    width = min(max(5.0, 2.0 + 0.35 * widest), 14.0)
    fig = Figure(figsize=(width * cols, 4.2 * rows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    count = n_colors or max((line.color_index for p in panels for line in p.lines), default=0) + 1
    cmap = colormaps["tab10" if count <= 10 else "viridis"]
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        x = np.arange(len(panel.layers))
        for line in panel.lines:
            values = np.asarray(line.values, dtype=np.float64)
            if values.shape != x.shape:
                raise ValueError(f"line {line.label!r}: {values.shape[0]} values for {len(x)} layers")
            color = cmap(line.color_index if count <= 10 else line.color_index / max(count - 1, 1))
            ax.plot(
                x,
                values,
                linestyle=line.style,
                marker=line.marker,
                markersize=4,
                linewidth=1.4,
                color=color,
                label=line.label,
            )
        ax.set_xticks(x, list(panel.layers), rotation=90)
        ax.set_xlabel("layers")
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(ylim)
        ax.grid(True, alpha=0.4)
        ax.set_title(panel.title, fontsize=10)
        if panel.lines:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return figure_png(fig)
