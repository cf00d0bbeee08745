"""Figures of an analysis: layer profiles, epoch x layer heatmaps, eigen-spectra and similarity matrices.

Every function draws on a fresh :class:`matplotlib.figure.Figure` with the Agg canvas and
returns PNG bytes; pyplot's global state is never touched (no ``pyplot.show``, no figures
left open), so the functions are safe in worker threads and in headless processes.
Rendering is deterministic: the same values give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from mpl_toolkits.axes_grid1 import make_axes_locatable

__all__ = ["figure_png", "heatmap_png", "layer_profile_png", "matrix_png", "spectrum_png"]

_DPI = 100
#: Up to this many epochs the profile gets a legend; beyond it a colour bar.
_LEGEND_EPOCHS = 10
_PNG_METADATA = {"Software": None}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (no metadata that changes between runs)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata=_PNG_METADATA)
    return buffer.getvalue()


def _width(n_layers: int) -> float:
    return float(min(max(6.0, 2.5 + 0.35 * n_layers), 40.0))


def _check(values: np.ndarray, epochs: Sequence[int], layers: Sequence[str]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (len(epochs), len(layers)):
        raise ValueError(
            f"values must have shape (epochs, layers) = {(len(epochs), len(layers))}, got {v.shape}"
        )
    return v


def layer_profile_png(
    values: np.ndarray,
    epochs: Sequence[int],
    layers: Sequence[str],
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
) -> bytes:
    """A statistic against layer position, one line (with markers) per epoch.

    delve's plot writer draws one epoch as a line plus a scatter of the values against the
    layer position, layer names as x tick labels; here every epoch is a line in one figure,
    coloured from early (light) to late (dark), the last epoch drawn on top and thicker.

    Parameters
    ----------
    values : array_like, shape (epochs, layers)
        NaN leaves a gap.
    epochs, layers : sequence
        Labels of the rows and columns of ``values``.
    ylabel, title : str
    ylim : tuple of float, optional
        Fixed y range (delve uses (0, 1) for the saturation).

    Returns
    -------
    bytes
        A PNG image.

    Examples
    --------
    >>> png = layer_profile_png([[0.1, 0.5], [0.2, 0.6]], [0, 1], ["conv", "fc"], "saturation", "t")
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    v = _check(values, epochs, layers)
    fig = _figure(_width(len(layers)), 4.8)
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    cmap = colormaps["viridis"]
    norm = Normalize(vmin=0, vmax=max(len(epochs) - 1, 1))
    for i, epoch in enumerate(epochs):
        last = i == len(epochs) - 1
        color = cmap(0.85 - 0.85 * norm(i))  # late epochs dark
        ax.plot(
            x,
            v[i],
            color=color,
            alpha=1.0 if last else 0.6,
            linewidth=2.2 if last else 1.2,
            label=f"epoch {epoch}",
            zorder=3 if last else 2,
        )
        ax.scatter(x, v[i], color=color, s=28 if last else 14, zorder=4 if last else 2)
    ax.set_xticks(x, list(layers), rotation=90)
    ax.set_xlabel("layers")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(ylim)
    ax.grid(True, alpha=0.4)
    ax.set_title(title, fontsize=10)
    if len(epochs) <= _LEGEND_EPOCHS:
        ax.legend(fontsize=8, loc="best")
    else:
        colors = ListedColormap([cmap(0.85 - 0.85 * norm(i)) for i in range(len(epochs))])
        mappable = ScalarMappable(norm=Normalize(vmin=epochs[0], vmax=epochs[-1]), cmap=colors)
        fig.colorbar(mappable, ax=ax, label="epoch")
    fig.tight_layout()
    return figure_png(fig)


def _image(ax: Axes, v: np.ndarray, vlim: tuple[float, float] | None, aspect: str = "auto") -> AxesImage:
    """``v`` drawn cell by cell (NaN blank) on the range ``vlim``, or on the finite values' range."""
    if vlim is None:
        finite = v[np.isfinite(v)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    else:
        vmin, vmax = vlim
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    masked = np.ma.masked_invalid(v)
    return ax.imshow(masked, aspect=aspect, interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax)


def heatmap_png(
    values: np.ndarray,
    epochs: Sequence[int],
    layers: Sequence[str],
    label: str,
    title: str,
    vlim: tuple[float, float] | None = None,
) -> bytes:
    """An epoch x layer heatmap of a statistic (NaN cells left blank).

    ``vlim`` fixes the range of the colour scale (default: the finite values' range).

    Examples
    --------
    >>> png = heatmap_png([[0.1, np.nan]], [0], ["conv", "fc"], "saturation", "t")
    >>> png[:4] == b"\\x89PNG"
    True
    """
    v = _check(values, epochs, layers)
    height = float(min(max(3.2, 2.4 + 0.25 * len(epochs)), 30.0))
    fig = _figure(_width(len(layers)) + 1.0, height)
    ax = fig.add_subplot()
    image = _image(ax, v, vlim)
    ax.set_xticks(np.arange(len(layers)), list(layers), rotation=90)
    step = max(1, len(epochs) // 25)
    ticks = np.arange(0, len(epochs), step)
    ax.set_yticks(ticks, [str(epochs[i]) for i in ticks])
    ax.set_xlabel("layers")
    ax.set_ylabel("epoch")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    return figure_png(fig)


#: Up to this many cells (a 16 x 16 matrix) a matrix shows its values as text.
_ANNOTATE_CELLS = 256
#: Beyond this many rows (or columns) a matrix labels every n-th of them only.
_MAX_TICKS = 40


def _plain(text: str) -> str:
    """``text`` as matplotlib draws it literally: a ``$`` would start mathtext."""
    return text.replace("$", r"\$")


def _ticks(labels: Sequence[object]) -> tuple[np.ndarray, list[str]]:
    """Positions and texts of the tick labels of a matrix axis: all, or every n-th beyond 40."""
    step = max(1, len(labels) // _MAX_TICKS)
    positions = np.arange(0, len(labels), step)
    return positions, [_plain(str(labels[i])) for i in positions]


def matrix_png(
    values: np.ndarray,
    rows: Sequence[object],
    cols: Sequence[object],
    label: str,
    title: str,
    *,
    xlabel: str = "",
    ylabel: str = "",
    vlim: tuple[float, float] | None = None,
) -> bytes:
    """A matrix of values with labelled rows (top to bottom) and columns, e.g. layer x layer similarity.

    NaN cells are left blank. Up to 256 cells (16 x 16), each shows its value (two decimals);
    beyond 40 rows or columns, every n-th is labelled.

    Parameters
    ----------
    values : array_like, shape (rows, cols)
    rows, cols : sequence
        Labels of the rows and columns (drawn as ``str``).
    label : str
        Label of the colour bar.
    title, xlabel, ylabel : str
        The title may hold line breaks. Every text is drawn as it is (a ``$`` starts no mathtext).
    vlim : tuple of float, optional
        Fixed range of the colour scale (default: the finite values' range).

    Examples
    --------
    >>> png = matrix_png([[1.0, 0.4], [0.4, 1.0]], ["fc", "out"], ["fc", "out"], "cka", "t", vlim=(0, 1))
    >>> png[:4] == b"\\x89PNG"
    True
    """
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (len(rows), len(cols)):
        raise ValueError(f"values must have shape (rows, cols) = {(len(rows), len(cols))}, got {v.shape}")
    fig = _figure(min(max(4.8, 2.6 + 0.34 * len(cols)), 30.0), min(max(4.0, 2.0 + 0.34 * len(rows)), 30.0))
    ax = fig.add_subplot()
    image = _image(ax, v, vlim, aspect="equal" if max(v.shape, default=0) <= _MAX_TICKS else "auto")
    ax.set_xticks(*_ticks(cols), rotation=90)
    ax.set_yticks(*_ticks(rows))
    if v.size <= _ANNOTATE_CELLS:
        norm = image.norm
        for (i, j), value in np.ndenumerate(v):
            if np.isfinite(value):
                color = "white" if norm(value) < 0.6 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel(_plain(xlabel))
    ax.set_ylabel(_plain(ylabel))
    ax.set_title(_plain(title), fontsize=10)
    # a colour bar as tall as the matrix and 0.2 inch wide, whatever the figure's size
    bar = make_axes_locatable(ax).append_axes("right", size=0.2, pad=0.15)
    fig.colorbar(image, cax=bar, label=_plain(label))
    fig.tight_layout()
    return figure_png(fig)


def spectrum_png(spectra: Sequence[np.ndarray], layers: Sequence[str], title: str) -> bytes:
    """Eigenvalues (descending) of each layer against their rank, log-scale y.

    Non-positive eigenvalues cannot be shown on a log scale and are left out; a layer
    without a positive eigenvalue is named in the legend with ``(no variance)``.

    Examples
    --------
    >>> png = spectrum_png([np.array([3.0, 1.0, 0.0])], ["fc"], "t")
    >>> png[:4] == b"\\x89PNG"
    True
    """
    if len(spectra) != len(layers):
        raise ValueError(f"got {len(spectra)} spectra for {len(layers)} layers")
    fig = _figure(7.0, 4.8)
    ax = fig.add_subplot()
    drawn = False
    for values, layer in zip(spectra, layers, strict=True):
        e = np.asarray(values, dtype=np.float64).ravel()
        keep = np.isfinite(e) & (e > 0)
        rank = np.arange(1, e.size + 1)
        if keep.any():
            ax.plot(rank[keep], e[keep], marker="." if e.size <= 64 else None, linewidth=1.2, label=layer)
            drawn = True
        else:
            ax.plot([], [], label=f"{layer} (no variance)")
    if drawn:
        ax.set_yscale("log")
        ax.set_xscale("log" if max((np.asarray(s).size for s in spectra), default=1) > 64 else "linear")
    ax.set_xlabel("eigenvalue rank")
    ax.set_ylabel("eigenvalue")
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=10)
    if layers:
        ax.legend(fontsize=8, loc="best", ncol=1 if len(layers) <= 12 else 2)
    fig.tight_layout()
    return figure_png(fig)
