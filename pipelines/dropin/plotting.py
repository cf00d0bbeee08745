"""delve's plotting helpers: one statistic of a result table against layer position.

:func:`extract_layer_stat` picks one row, statistic and phase of a table written by the CSV
writer; :func:`plot_stat` draws it; :func:`plot_stat_level` does both, as the plot writer
(:class:`~pipelines.dropin.writers.CSVandPlottingWriter`) does on every save, and
:func:`plot_stat_level_from_results` from a CSV file. Names and arguments are those of
delve 0.1.50.

Differences from delve 0.1.50
-----------------------------
- Plots use matplotlib's object API with the Agg canvas, never pyplot, so no global figure
  state is touched; ``plot_stat`` takes ``plot_manipulation_func`` (applied before saving).
- A row of only NaN values gives an empty, unsaved plot; embedded samples plot the latest
  recorded points (delve plotted the first ones).
- Layer names containing ``_`` keep their full name in plot labels, and a phase name is
  matched as the column's prefix (``train-``), not as a substring anywhere in the name.
- ``extract_layer_stat`` takes ``epoch=-1`` (the last row) by default; delve's was 19.
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipelines.dropin.formats import STATMAP, split_column

__all__ = [
    "extract_layer_stat",
    "plot_scatter_from_results",
    "plot_stat",
    "plot_stat_level",
    "plot_stat_level_from_results",
]


def _png_path(savepath: str, stat: str, stat_mode: str, epoch: Any) -> str:
    """delve's plot name: a ``.csv`` suffix becomes ``_<stat>_<mode>_epoch_<epoch>.png``."""
    if savepath.endswith(".csv"):
        return savepath[: -len(".csv")] + f"_{stat}_{stat_mode}_epoch_{epoch}.png"
    return savepath



def extract_layer_stat(
    df: pd.DataFrame,
    epoch: int = -1,
    primary_metric: str | None = None,
    stat: str = "saturation",
    state_mode: str = "train",
) -> tuple[pd.DataFrame, Any]:
    """One row of a delve result table, restricted to one statistic and phase.

    Parameters
    ----------
    df : pandas.DataFrame
        A table as written by :class:`CSVWriter` (read with or without ``index_col=0``).
    epoch : int
        Index value of the row; -1 for the last row (delve's default was 19).
    primary_metric : str, optional
        A column whose value in that row is returned as well.
    stat : str
        Matched as a substring of the statistic part of the column names
        (``'saturation'``, ``'intrinsic-dimensionality'``, ...).
    state_mode : str
        The phase, ``'train'`` or ``'eval'``: columns ``'<state_mode>-...'``.

    Returns
    -------
    epoch_df : pandas.DataFrame
        One row, the matching columns in table order.
    pm : object
        The primary metric's value, or None.

    Raises
    ------
    ValueError
        If ``epoch`` is not an index value of ``df``.

    Examples
    --------
    >>> df = pd.DataFrame({"epoch": [0, 1], "train-saturation_a": [0.1, 0.2], "eval-saturation_a": [0.3, 0.4]})
    >>> row, pm = extract_layer_stat(df, epoch=-1, primary_metric="epoch")
    >>> row.to_dict("list"), int(pm)
    ({'train-saturation_a': [0.2]}, 1)
    """
    if epoch == -1:
        epoch = df.index.values[-1]
    cols = []
    for col in df.columns:
        parts = split_column(str(col))
        if parts is not None and parts[0] == state_mode and stat in parts[1] and "accuracy" not in str(col):
            cols.append(col)
    if not np.any(df.index.values == epoch):
        raise ValueError(f"Epoch {epoch} was not recorded; the table has the indices {list(df.index.values)}")
    epoch_df = df[df.index.values == epoch]
    pm = None if primary_metric is None else epoch_df[primary_metric].values[0]
    return epoch_df[cols], pm


def plot_stat(
    df: pd.DataFrame,
    stat: str,
    pm: Any = -1,
    savepath: str = "run.png",
    epoch: Any = 0,
    primary_metric: str | None = None,
    fontsize: float = 16,
    figsize: tuple[float, float] | None = None,
    line: bool = True,
    scatter: bool = True,
    ylim: tuple[float, float] | None = (0, 1.0),
    alpha_line: float = 0.6,
    alpha_scatter: float = 1.0,
    color_line: Any = None,
    color_scatter: Any = None,
    primary_metric_loc: tuple[float, float] = (0.7, 0.8),
    show_col_label_x: bool = True,
    show_col_label_y: bool = True,
    show_grid: bool = True,
    save: bool = True,
    samples: bool = False,
    stat_mode: str = "train",
    plot_manipulation_func: Callable[[Axes], Axes] | None = None,
) -> Axes:
    """Plot the first row of ``df`` (one value per layer) against layer position.

    Parameters
    ----------
    df : pandas.DataFrame
        Usually the row from :func:`extract_layer_stat`; with ``samples=True`` a table
        whose first cell is a list of ``(x, y)`` points.
    stat : str
        Short name (``'lsat'``) or label of the statistic; the y label is its long name.
    pm : object
        Value of the primary metric, printed at ``primary_metric_loc`` (data coordinates)
        when ``primary_metric`` is given.
    savepath : str
        A path ending in ``.csv`` saves to ``<stem>_<stat>_<stat_mode>_epoch_<epoch>.png``;
        any other path is used as is.
    epoch : object
        Shown in the title and the file name; -1 means the last index of ``df``.
    figsize : (float, float), optional
        Figure size in inches; matplotlib's default when None.
    line, scatter : bool
        Draw a line, markers, or both.
    ylim : (float, float), optional
        y range; automatic when None.
    save : bool
        Write the PNG.
    samples : bool
        Scatter the points of ``df``'s first cell instead of per-layer values.
    plot_manipulation_func : callable, optional
        Called with the ``Axes`` before saving (not in delve's signature).

    Other parameters (``fontsize``, ``alpha_*``, ``color_*``, ``show_*``,
    ``primary_metric``, ``stat_mode``) are delve's, with the same meaning.

    Returns
    -------
    matplotlib.axes.Axes
        The plot's axes (on a figure with an Agg canvas; no pyplot state is touched).
        A row of only NaN values gives an empty, unsaved plot.
    """
    if epoch == -1:
        epoch = df.index.values[-1]
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    col_names = [str(c) for c in df.columns]
    first = df.values[0] if len(df) else np.array([])
    if not samples and len(first) > 0:
        try:
            if np.all(np.isnan(first.astype(np.float64))):
                return ax
        except (TypeError, ValueError):
            warnings.warn(
                "Could not check the values for NaN, likely because they are not numbers; "
                "plotting them may fail or give inconsistent results",
                stacklevel=2,
            )
    positions = list(range(len(col_names)))
    if line and not samples:
        ax.plot(positions, first, alpha=alpha_line, color=color_line)
    if scatter:
        if samples:
            for sample in first[0] if len(first) else []:
                ax.scatter(float(sample[0]), float(sample[1]), alpha=alpha_scatter, color=color_scatter)
        else:
            ax.scatter(positions, first, alpha=alpha_scatter, color=color_scatter)
    if not samples:
        ax.set_xticks(positions, [name.lstrip("_").split("_", 1)[-1] for name in col_names], rotation=90)
    if ylim is not None:
        ax.set_ylim(ylim)
    if primary_metric is not None:
        ax.text(primary_metric_loc[0], primary_metric_loc[1], f"{primary_metric}: {pm}")
    ax.tick_params(axis="y", labelsize=fontsize)
    if show_col_label_x:
        ax.set_xlabel("layers", fontsize=fontsize)
    ax.set_title(
        pathlib.Path(savepath).name.replace("_", " ").replace(".csv", f" epoch: {epoch}"), fontsize=fontsize
    )
    if show_col_label_y:
        ax.set_ylabel(STATMAP.get(stat, stat), rotation="vertical", fontsize=fontsize)
    if show_grid:
        ax.grid()
    fig.tight_layout()
    if plot_manipulation_func is not None:
        ax = plot_manipulation_func(ax)
    if save:
        fig.savefig(_png_path(savepath, stat, stat_mode, epoch))
    return ax


def plot_stat_level(
    df: pd.DataFrame,
    savepath: str,
    epoch: Any,
    stat: str,
    stat_mode: str = "train",
    ylim: Any = "auto",
    **kwargs: Any,
) -> Axes:
    """Plot one statistic and phase of a result table, as the plot writer does on every save.

    Parameters
    ----------
    df : pandas.DataFrame
        A table as written by the CSV writer.
    savepath : str
        The CSV file's path; the PNG goes next to it (see :func:`plot_stat`).
    epoch : object
        Index value of the row to plot; -1 for the last row.
    stat : str
        Short name (``'lsat'``), or ``'<stat>_<mode>'`` (``'idim_eval'``), which sets
        ``stat_mode``.
    stat_mode : str
        The phase, ``'train'`` or ``'eval'``.
    ylim : (float, float), None or "auto"
        "auto": (0, 1) for lsat, automatic otherwise.
    **kwargs
        Passed to :func:`plot_stat` (``primary_metric`` also picks the value printed).

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> df = pd.DataFrame({"train-saturation_a": [0.5], "train-saturation_b": [0.25]})
    >>> ax = plot_stat_level(df, os.path.join(folder, "run.csv"), epoch=-1, stat="lsat")
    >>> [t.get_text() for t in ax.get_xticklabels()], os.listdir(folder)
    (['a', 'b'], ['run_lsat_train_epoch_0.png'])
    """
    if "_" in stat:
        stat, stat_mode = stat.split("_")
    if epoch == -1:
        epoch = df.index.values[-1]
    epoch_df, pm = extract_layer_stat(
        df, stat=STATMAP[stat], epoch=epoch, primary_metric=kwargs.get("primary_metric"), state_mode=stat_mode
    )
    if isinstance(ylim, str):
        ylim = (0, 1.0) if stat == "lsat" else None
    return plot_stat(
        df=epoch_df,
        pm=pm,
        savepath=savepath,
        epoch=epoch,
        stat=stat,
        ylim=ylim,
        stat_mode=stat_mode,
        **kwargs,
    )


def plot_stat_level_from_results(
    savepath: str,
    epoch: int,
    stat: str,
    primary_metric: str | None = None,
    fontsize: float = 16,
    figsize: tuple[float, float] | None = None,
    line: bool = True,
    scatter: bool = True,
    ylim: tuple[float, float] | None = (0, 1.0),
    alpha_line: float = 0.6,
    alpha_scatter: float = 1.0,
    color_line: Any = None,
    color_scatter: Any = None,
    primary_metric_loc: tuple[float, float] = (0.7, 0.8),
    show_col_label_x: bool = True,
    show_col_label_y: bool = True,
    show_grid: bool = True,
    save: bool = True,
    stat_mode: str = "train",
) -> Axes:
    """Plot one statistic of a delve CSV file, as the plot writer does.

    Parameters
    ----------
    savepath : str
        The CSV file; the PNG is saved next to it (see :func:`plot_stat`).
    epoch : int
        Row index; -1 for the last row.
    stat : str
        Short name (``'lsat'``), or ``'<stat>_<mode>'`` (``'idim_eval'``), which sets
        ``stat_mode``.

    Notes
    -----
    As in delve, ``ylim`` is ignored: (0, 1) for lsat, automatic otherwise. The other
    parameters are passed to :func:`plot_stat`.
    """
    df = pd.read_csv(savepath, sep=";", index_col=0)
    return plot_stat_level(
        df,
        savepath,
        epoch=epoch,
        stat=stat,
        stat_mode=stat_mode,
        primary_metric=primary_metric,
        fontsize=fontsize,
        figsize=figsize,
        line=line,
        scatter=scatter,
        alpha_line=alpha_line,
        alpha_scatter=alpha_scatter,
        color_line=color_line,
        color_scatter=color_scatter,
        primary_metric_loc=primary_metric_loc,
        show_col_label_x=show_col_label_x,
        show_col_label_y=show_col_label_y,
        show_grid=show_grid,
        save=save,
    )


def plot_scatter_from_results(savepath: str, epoch: Any, stat: str, df: pd.DataFrame) -> Axes | None:
    """Scatter the latest recorded sample points (``embed``); None if there are none."""
    if len(df) == 0:
        return None
    stat = stat.split("_")[0]
    return plot_stat(
        df=df.iloc[[-1]] if epoch == -1 else df.loc[[epoch]],
        savepath=savepath,
        epoch=epoch,
        stat=stat,
        line=False,
        save=True,
        samples=True,
        ylim=None,
    )
