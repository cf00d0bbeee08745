"""The similarity part of the report: the matrices of a similarity table, as figures.

A similarity table is what :func:`analyze.similarity` returns (columns
:data:`analyze.SIMILARITY_COLUMNS`), or several of them concatenated: other measures, other kinds
of pairs. :func:`similarity_section` splits it by kind of pairs
(:func:`analyze.similarity_api.split_pairs`), turns each kind into its matrices
(:func:`analyze.similarity_matrices`) and draws them with :func:`analyze.plots.matrix_png`, per
measure, run (or runs), phase and reduction methods:

- ``pairs="layers"``: a layer x layer matrix per epoch (at most :data:`MAX_MATRIX_EPOCHS` of them,
  spread over the run);
- ``pairs="epochs"``: an epoch x epoch matrix per layer;
- ``pairs="runs"``: a run x run matrix per layer and epoch (at most :data:`MAX_MATRIX_EPOCHS`
  epochs, spread over the runs).

Layers come in the run's order, epochs ascending. The figures of a measure share one colour scale
(:func:`analyze.similarity_api.similarity_range` of all its values). :func:`compute_similarity`
computes the table that ``delve-analyze report --similarity`` draws.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from analyze.options import AnalysisOptions
from analyze.report_html import Anchors, Figure, Grid, Section, ordered, paragraph
from analyze.similarity_api import (
    SIMILARITY_COLUMNS,
    SimilarityMatrix,
    similarity,
    similarity_matrices,
    similarity_range,
    split_pairs,
)
from analyze.similarity_measures import MEASURES

__all__ = ["MAX_MATRIX_EPOCHS", "compute_similarity", "similarity_section"]

#: At most this many epochs get a matrix each (spread over the run, first and last kept).
MAX_MATRIX_EPOCHS = 6
#: What the rows and columns of a matrix are, per kind of pairs (headings of a page with several kinds).
_AXES = {"layers": "layer x layer", "epochs": "epoch x epoch", "runs": "run x run"}

LayerOrder = Mapping[str, Sequence[str]]


def _plots() -> ModuleType:
    from analyze import plots  # matplotlib is imported when a figure is drawn, not with the package

    return plots


def compute_similarity(
    runs: Sequence[str | os.PathLike[str]],
    measures: Sequence[str],
    pairs: Sequence[str],
    options: AnalysisOptions | Mapping[str, Any] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The similarity table of ``runs`` for every measure and kind of pairs, by :func:`analyze.similarity`.

    One call (one pass over the stores) per kind of pairs, every measure at once:
    ``similarity(runs, measures, p, options, cache_dir=cache_dir, progress=progress,
    storage_options=storage_options)``; the tables
    are concatenated in the order of ``pairs``. Without an :class:`~analyze.AnalysisOptions`, conv
    maps are pooled by ``mean`` (:data:`analyze.similarity_api.SIMILARITY_DEFAULTS`).
    """
    frames = [
        similarity(
            list(runs),
            list(measures),
            p,
            options,
            cache_dir=cache_dir,
            progress=progress,
            storage_options=storage_options,
        )
        for p in pairs
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SIMILARITY_COLUMNS))


def similarity_section(frame: pd.DataFrame, anchors: Anchors, layer_order: LayerOrder) -> Section:
    """The report's section of a similarity table: per measure, run(s), phase and methods, its matrices.

    ``layer_order`` (run -> layers) orders the layers of the matrices.
    """
    by_pairs = split_pairs(frame)
    section = Section(anchors.new("similarity"), "Similarity")
    section.body.append(
        paragraph(
            "Representational similarity of layers on the same samples: layer x layer matrices per "
            "epoch, each layer against itself over the epochs, or against the same layer of other runs."
        )
    )
    if frame.empty:
        section.body.append(paragraph("The similarity table is empty.", "note"))
    several_methods = len(frame[["conv_method", "timeseries_method"]].drop_duplicates()) > 1
    for measure in dict.fromkeys(frame["measure"].astype(str)):
        spec = MEASURES.get(measure)
        body: list[str | Grid] = [paragraph(f"{spec.description} ({spec.reference}).")] if spec else []
        sub = Section(anchors.new("similarity", measure), f"Similarity: {measure}", body)
        vlim = similarity_range(frame.loc[frame["measure"].astype(str) == measure, "value"])
        for pairs, rows in by_pairs.items():
            groups: dict[tuple[str, ...], list[SimilarityMatrix]] = {}
            for m in similarity_matrices(rows[rows["measure"].astype(str) == measure], pairs):
                key = (_runs_of(m), *(str(m.fixed[k]) for k in ("phase", "conv_method", "timeseries_method")))
                groups.setdefault(key, []).append(m)
            for (where, phase, conv, ts), matrices in groups.items():
                title = f"{where}, {phase}" + (f" ({conv}, {ts})" if several_methods else "")
                title += f", {_AXES[pairs]}" if len(by_pairs) > 1 else ""
                figures, note = _figures(pairs, matrices, f"{where}, {phase} phase", vlim, layer_order)
                items: list[str | Grid] = [Grid(figures)] + ([paragraph(note, "note")] if note else [])
                sub.children.append(Section(anchors.new("similarity", measure, title), title, items))
        section.children.append(sub)
    return section


def _runs_of(matrix: SimilarityMatrix) -> str:
    """The run of a matrix, or its runs (``"a vs b"``) for a run x run matrix."""
    if matrix.pairs == "runs":
        return " vs ".join(str(run) for run in matrix.labels)
    return str(matrix.fixed["run"])


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


def _figures(
    pairs: str,
    matrices: list[SimilarityMatrix],
    where: str,
    vlim: tuple[float, float],
    layer_order: LayerOrder,
) -> tuple[list[Figure], str | None]:
    """The figures of the matrices of one measure, run(s), phase and methods; a note on epochs left out."""
    measure = str(matrices[0].fixed["measure"])
    if pairs == "epochs":  # one per layer, in the run's order
        run = str(matrices[0].fixed["run"])
        by_layer = {str(m.fixed["layer"]): m for m in matrices}
        return [
            _figure(
                by_layer[layer], sorted(by_layer[layer].labels), measure, f"layer {layer} of {where}", vlim
            )
            for layer in ordered(by_layer, layer_order.get(run, []))
        ], None
    epochs = list(dict.fromkeys(sorted(int(m.fixed["epoch"]) for m in matrices)))
    shown = _spread(epochs, MAX_MATRIX_EPOCHS)
    note = None
    if len(shown) < len(epochs):
        listed = ", ".join(map(str, shown))
        note = (
            f"Showing {len(shown)} of {len(epochs)} epochs ({listed}); the similarity table holds them all."
        )
    if pairs == "layers":  # one per epoch shown
        order = layer_order.get(str(matrices[0].fixed["run"]), [])
        by_epoch = {int(m.fixed["epoch"]): m for m in matrices}
        return [_figure(by_epoch[e], order, measure, f"{where}, epoch {e}", vlim) for e in shown], note
    # runs: one per layer (in the first run's order) and epoch shown
    by_key = {(str(m.fixed["layer"]), int(m.fixed["epoch"])): m for m in matrices}
    layers = ordered([layer for layer, _ in by_key], layer_order.get(str(matrices[0].labels[0]), []))
    figures = [
        _figure(by_key[(layer, e)], [], measure, f"layer {layer} of {where}, epoch {e}", vlim)
        for layer in layers
        for e in shown
        if (layer, e) in by_key
    ]
    return figures, note


#: How the caption of a matrix ends, per kind of pairs.
_AGAINST = {"layers": "layer against layer", "epochs": "epoch against epoch", "runs": "run against run"}


def _figure(
    matrix: SimilarityMatrix, order: Sequence[Any], measure: str, what: str, vlim: tuple[float, float]
) -> Figure:
    """One matrix, its labels in ``order`` (then in the matrix's order), titled by ``what``."""
    labels = [str(x) for x in matrix.labels]
    names = ordered(labels, order)
    index = [labels.index(name) for name in names]
    values = matrix.values[np.ix_(index, index)]
    finite = values[np.isfinite(values)]
    span = f"values from {finite.min():.3g} to {finite.max():.3g}" if finite.size else "no value"
    caption = f"{what}, {_AGAINST[matrix.pairs]}"
    alt = f"Matrix of {measure} for {caption}: {values.shape[0]} x {values.shape[1]} cells, {span}."
    axis = matrix.pairs + (f" of {matrix.fixed['run']}" if matrix.pairs != "runs" else "")
    return Figure(
        lambda: _plots().matrix_png(
            values, names, names, measure, f"{measure}: {what}", xlabel=axis, ylabel=axis, vlim=vlim
        ),
        alt,
        caption,
    )
