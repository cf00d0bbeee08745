"""The similarity part of the report: tidy similarity tables, checked, computed and drawn as matrices.

A similarity table is what :func:`analyze.similarity` returns, one row per pair of (run, epoch,
layer) and measure, with the columns :data:`SIMILARITY_COLUMNS`. :func:`similarity_section`
draws it as matrices (:func:`analyze.plots.matrix_png`) for :mod:`analyze.report`:

- rows whose two sides are the same epoch (``pairs="layers"`` and ``"runs"``): a layer x layer
  matrix per epoch (at most :data:`MAX_MATRIX_EPOCHS` of them, spread over the run);
- rows of a layer against itself at other epochs (``pairs="epochs"``): an epoch x epoch matrix per
  layer.

:func:`compute_similarity` calls :func:`analyze.similarity` where this installation has it (it is
looked up when called, so the report works with and without it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from analyze.options import AnalysisOptions
from analyze.report_html import Anchors, Figure, Grid, Section, ordered, paragraph, plot_label

__all__ = [
    "MAX_MATRIX_EPOCHS",
    "PAIRS",
    "SIMILARITY_COLUMNS",
    "check_similarity",
    "compute_similarity",
    "similarity_available",
    "similarity_section",
]

#: Columns of the tidy similarity table that :func:`analyze.similarity` returns.
SIMILARITY_COLUMNS = (
    "run_a",
    "epoch_a",
    "layer_a",
    "run_b",
    "epoch_b",
    "layer_b",
    "phase",
    "conv_method",
    "timeseries_method",
    "measure",
    "value",
)
#: What a similarity table compares (``analyze.similarity``'s ``pairs``).
PAIRS = ("layers", "epochs", "runs")
#: At most this many epochs get a layer x layer matrix each (spread over the run, first and last kept).
MAX_MATRIX_EPOCHS = 6

LayerOrder = Mapping[str, Sequence[str]]


def _plots() -> ModuleType:
    from analyze import plots  # matplotlib is imported when a figure is drawn, not with the package

    return plots


def check_similarity(frame: Any) -> pd.DataFrame:
    """A similarity table with :data:`SIMILARITY_COLUMNS`, in that order (a ``ValueError`` otherwise).

    Examples
    --------
    >>> check_similarity(pd.DataFrame({"run_a": ["r"], "value": [1.0]}))
    Traceback (most recent call last):
    ...
    ValueError: similarity: the table lacks the column(s) epoch_a, layer_a, run_b, epoch_b, layer_b, phase, conv_method, timeseries_method, measure
    """
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"similarity: expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in SIMILARITY_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"similarity: the table lacks the column(s) {', '.join(missing)}")
    return frame.loc[:, list(SIMILARITY_COLUMNS)].reset_index(drop=True)


def similarity_available() -> bool:
    """Whether this installation has :func:`analyze.similarity`."""
    import analyze

    return callable(getattr(analyze, "similarity", None))


def compute_similarity(
    runs: Sequence[str | os.PathLike[str]],
    measures: Sequence[str],
    pairs: Sequence[str],
    options: AnalysisOptions,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """The similarity table of ``runs`` for every measure and kind of pairs, by :func:`analyze.similarity`.

    Each (pairs, measure) is one call ``analyze.similarity(runs, options=options, measure=measure,
    pairs=pairs, cache_dir=cache_dir, progress=progress)``; the tables are concatenated.

    Raises
    ------
    ImportError
        This installation has no ``analyze.similarity``.
    """
    import analyze

    function = getattr(analyze, "similarity", None)
    if not callable(function):
        raise ImportError(
            "analyze.similarity is not available in this version of delve-pipeline, so a report can show "
            "no similarity matrix"
        )
    frames = [
        check_similarity(
            function(list(runs), options=options, measure=m, pairs=p, cache_dir=cache_dir, progress=progress)
        )
        for p in pairs
        for m in measures
    ]
    return check_similarity(
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SIMILARITY_COLUMNS)
    )


def similarity_section(frame: pd.DataFrame, anchors: Anchors, layer_order: LayerOrder) -> Section:
    """The report's section of a similarity table: per measure, per pair of runs and phase, its matrices.

    ``layer_order`` (run -> layers) orders the rows and columns of the layer x layer matrices.
    """
    from analyze.similarity_measures import MEASURES

    section = Section(anchors.new("similarity"), "Similarity")
    section.body.append(
        paragraph(
            "Representational similarity of layers on the same samples: layer x layer matrices per "
            "epoch, or each layer against itself over the epochs."
        )
    )
    if frame.empty:
        section.body.append(paragraph("The similarity table is empty.", "note"))
    keys = ["run_a", "run_b", "phase", "conv_method", "timeseries_method"]
    methods = frame[["conv_method", "timeseries_method"]].drop_duplicates()
    for measure in dict.fromkeys(frame["measure"].astype(str)):
        of_measure = frame[frame["measure"].astype(str) == measure]
        spec = MEASURES.get(measure)
        body: list[str | Grid] = [paragraph(f"{spec.description} ({spec.reference}).")] if spec else []
        sub = Section(anchors.new("similarity", measure), f"Similarity: {measure}", body)
        vlim = (-1.0 if (of_measure["value"] < 0).any() else 0.0, 1.0)
        for (run_a, run_b, phase, conv, ts), group in of_measure.groupby(keys, sort=False):
            where = str(run_a) if run_a == run_b else f"{run_a} vs {run_b}"
            title = f"{where}, {phase}" + (f" ({conv}, {ts})" if len(methods) > 1 else "")
            figures, note = _matrices(group, measure, f"{where}, {phase} phase", vlim, layer_order)
            items: list[str | Grid] = [Grid(figures)] + ([paragraph(note, "note")] if note else [])
            sub.children.append(Section(anchors.new("similarity", measure, title), title, items))
        section.children.append(sub)
    return section


def _spread(items: list[Any], most: int) -> list[Any]:
    """At most ``most`` of ``items``, evenly spread, the first and the last kept.

    Examples
    --------
    >>> _spread(list(range(10)), 4), _spread([1, 2], 4)
    ([0, 3, 6, 9], [1, 2])
    """
    if len(items) <= most:
        return items
    return [items[i] for i in sorted({round(x) for x in np.linspace(0, len(items) - 1, most)})]


def _matrices(
    group: pd.DataFrame, measure: str, where: str, vlim: tuple[float, float], layer_order: LayerOrder
) -> tuple[list[Figure], str | None]:
    """The matrices of one measure, pair of runs and phase, and a note on the epochs left out."""
    run_a, run_b = str(group["run_a"].iloc[0]), str(group["run_b"].iloc[0])
    same_epoch = bool((group["epoch_a"] == group["epoch_b"]).all())
    one_layer = bool((group["layer_a"] == group["layer_b"]).all()) and run_a == run_b
    if one_layer and not same_epoch:  # each layer against itself at other epochs
        figures = []
        for layer in ordered(group["layer_a"], layer_order.get(run_a, [])):
            m = group[group["layer_a"].astype(str) == layer]
            axes = (sorted(set(m["epoch_a"])), sorted(set(m["epoch_b"])))
            what = f"layer {layer} of {where}, epoch against epoch"
            figures.append(_matrix_figure(m, ("epoch_a", "epoch_b"), axes, measure, what, vlim))
        return figures, None
    pairs = sorted({(int(a), int(b)) for a, b in zip(group["epoch_a"], group["epoch_b"], strict=True)})
    shown = _spread(pairs, MAX_MATRIX_EPOCHS)
    figures = []
    for a, b in shown:
        m = group[(group["epoch_a"] == a) & (group["epoch_b"] == b)]
        axes = (
            ordered(m["layer_a"], layer_order.get(run_a, [])),
            ordered(m["layer_b"], layer_order.get(run_b, [])),
        )
        what = f"{where}, {f'epoch {a}' if a == b else f'epochs {a} and {b}'}, layer against layer"
        figures.append(_matrix_figure(m, ("layer_a", "layer_b"), axes, measure, what, vlim))
    note = None
    if len(shown) < len(pairs):
        listed = ", ".join(str(a) if a == b else f"{a}/{b}" for a, b in shown)
        note = f"Showing {len(shown)} of {len(pairs)} epochs ({listed}); the similarity table holds them all."
    return figures, note


def _matrix_figure(
    m: pd.DataFrame,
    columns: tuple[str, str],
    labels: tuple[list[Any], list[Any]],
    measure: str,
    what: str,
    vlim: tuple[float, float],
) -> Figure:
    """One matrix: ``columns`` of ``m`` give its rows and columns, ``labels`` their order."""
    m = m.assign(**{c: m[c].astype(str) for c in columns if c.startswith("layer")})
    values = (
        m.groupby(list(columns), sort=False)["value"]
        .first()
        .unstack(columns[1])
        .reindex(index=labels[0], columns=labels[1])
        .to_numpy(dtype=np.float64)
    )
    finite = values[np.isfinite(values)]
    span = f"values from {finite.min():.3g} to {finite.max():.3g}" if finite.size else "no value"
    alt = f"Matrix of {measure} for {what}: {values.shape[0]} x {values.shape[1]} cells, {span}."
    kind = columns[0].split("_")[0]
    xlabel = plot_label(f"{kind}s of {m['run_b'].iloc[0]}")
    ylabel = plot_label(f"{kind}s of {m['run_a'].iloc[0]}")
    title = plot_label(f"{measure}: {what.rsplit(', ', 1)[0]}")
    rows, cols = [plot_label(x) for x in labels[0]], [plot_label(x) for x in labels[1]]
    return Figure(
        lambda: _plots().matrix_png(
            values, rows, cols, measure, title, xlabel=xlabel, ylabel=ylabel, vlim=vlim
        ),
        alt,
        what,
    )
