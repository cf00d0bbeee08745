"""Representational similarity of layers from stored runs: :func:`similarity` and its table.

A similarity analysis compares the raw outputs of layers on the same samples with the measures of
:mod:`analyze.similarity_measures` (``cka``, ``cka_debiased``, ``minibatch_cka``, ``svcca``,
``pwcca``): every layer of a run with every other one (``pairs="layers"``), a layer with itself
at every other epoch (``"epochs"``), or a layer with the layer of the same name in other runs
(``"runs"``). It runs in three steps, each a module of its own: planning
(:mod:`analyze.similarity_plan`: what is compared, which rows, checked before any read), one
pass over the stores (:mod:`analyze.similarity_graph`: a dask graph that reads each chunk of each
layer once, and the cache of its accumulators) and tabulation (here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from analyze.cache import CovarianceCache
from analyze.options import AnalysisOptions, resolve_options
from analyze.similarity_graph import Accumulator, accumulate
from analyze.similarity_measures import MEASURES, similarity_matrix
from analyze.similarity_plan import SimilarityPlan, plan_similarity

__all__ = [
    "SIMILARITY_COLUMNS",
    "SIMILARITY_DEFAULTS",
    "SimilarityMatrix",
    "SimilarityResult",
    "analyze_similarity",
    "check_similarity",
    "similarity",
    "similarity_matrices",
    "similarity_options",
    "similarity_range",
    "split_pairs",
]

#: Columns of the similarity table, in order.
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
#: The options of a similarity analysis where the caller gives none: conv maps are pooled by
#: ``mean`` (one row per sample, so every layer can be compared with every other one).
SIMILARITY_DEFAULTS = AnalysisOptions(conv_methods=("mean",))

Runs = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
OptionsLike = AnalysisOptions | Mapping[str, Any] | None


@dataclass
class SimilarityResult:
    """What :func:`analyze_similarity` produced: the table and where it came from.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per ordered pair, measure and (conv method, time-series method) combination;
        columns :data:`SIMILARITY_COLUMNS` (see :func:`similarity` for the order of the rows).
    options : dict
        Every option (:meth:`analyze.AnalysisOptions.to_dict`).
    inputs : dict
        Run name -> ``{"path", "content_hash"}`` (and ``storage_options``, redacted, for a URL
        opened with some; see :meth:`analyze.plan.RunPlan.record`).
    skipped : list of str
        Layers left out with ``on_error="skip"``, and why.
    """

    table: pd.DataFrame
    options: dict[str, Any]
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> str:
        return str(self.options["pairs"])


def similarity_options(
    options: OptionsLike = None, measure: Any = None, pairs: Any = None, **kwargs: Any
) -> AnalysisOptions:
    """The :class:`analyze.AnalysisOptions` of a similarity analysis.

    ``options`` (an :class:`~analyze.AnalysisOptions`, a mapping or ``None``) with ``measure``
    (the field ``measures``), ``pairs`` and any other field given as a keyword on top. Where
    ``options`` is not an :class:`~analyze.AnalysisOptions`, the defaults are
    :data:`SIMILARITY_DEFAULTS` (conv maps pooled by ``mean``).

    Raises
    ------
    AnalysisError
        A bad value (the same one-line reason as everywhere, naming the option).
    TypeError
        An unknown keyword, or ``measure`` and ``measures`` both given.

    Examples
    --------
    >>> o = similarity_options(measure=["cka", "svcca"], pairs="epochs", phases="eval")
    >>> o.measures, o.pairs, o.phases, o.conv_methods
    (('cka', 'svcca'), 'epochs', ('eval',), ('mean',))
    """
    if measure is not None and "measures" in kwargs:
        raise TypeError("give the measures once: measure= or measures=")
    changes = dict(kwargs)
    if measure is not None:
        changes["measures"] = measure
    if pairs is not None:
        changes["pairs"] = pairs
    if options is None:
        base = SIMILARITY_DEFAULTS
    elif isinstance(options, AnalysisOptions):
        base = options
    else:
        base = AnalysisOptions.from_dict({"conv_methods": SIMILARITY_DEFAULTS.conv_methods, **options})
    return resolve_options(base, **changes)


def analyze_similarity(
    runs: Runs,
    measure: Any = None,
    pairs: Any = None,
    options: OptionsLike = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> SimilarityResult:
    """:func:`similarity`'s table with its options, inputs and skipped layers (same arguments)."""
    resolved = similarity_options(options, measure, pairs, **kwargs)
    paths = [os.fspath(runs)] if isinstance(runs, str | os.PathLike) else [os.fspath(r) for r in runs]
    plan = plan_similarity(paths, resolved, storage_options)
    accumulators = accumulate(plan, CovarianceCache(cache_dir), progress)
    return SimilarityResult(
        table=_tabulate(plan, accumulators),
        options=resolved.to_dict(),
        inputs={rp.name: rp.record() for rp in plan.runs},
        skipped=list(plan.skipped),
    )


def similarity(
    runs: Runs, measure: Any = None, pairs: Any = None, options: OptionsLike = None, **kwargs: Any
) -> pd.DataFrame:
    """Representational similarity of the layers of stored runs, as a tidy table.

    Parameters
    ----------
    runs : path or URL, or a list of them
        Run stores written by :class:`capture.Recorder` in ``raw`` or ``both`` mode (similarity
        reads the layers' outputs; gram moments hold no cross-layer moments).
    measure : str or list of str, default "cka"
        Names from :data:`analyze.similarity_measures.MEASURE_NAMES` (the option ``measures``).
    pairs : {"layers", "epochs", "runs"}, default "layers"
        ``"layers"``: every pair of layers of one run, epoch and phase (a layer x layer matrix).
        ``"epochs"``: each layer with itself at every other epoch (an epoch x epoch matrix per
        layer: has it converged, and when?). ``"runs"``: each layer with the layer of the same
        name in every other run, at the same epoch (a run x run matrix per layer and epoch; e.g.
        two seeds evaluated on the same data); layers present in every run, at the epochs
        every run has.
    options : AnalysisOptions or mapping, optional
        What to compare, as for :func:`analyze.run_stats` (``epochs``, ``layers``, ``phases``,
        ``conv_methods``, ``timeseries_methods``, selection, ``device``, ``scheduler``,
        ``task_bytes``, ``on_error``) plus ``svcca_threshold`` and ``minibatch_size``. Without an
        :class:`~analyze.AnalysisOptions`, conv maps are pooled by ``mean``
        (:data:`SIMILARITY_DEFAULTS`). ``thresholds`` and ``stats`` do not apply; ``compat`` and
        ``source="gram"`` are refused. ``device`` is where the reshaping (pooling, interpolation)
        runs; the moments are float64 numpy on the CPU.
    cache_dir : path, optional (keyword)
        Results store of the accumulators (:class:`analyze.cache.CovarianceCache`); a re-run with
        another measure computed from the same accumulator reads no activation.
    progress : bool, default True (keyword)
        Show a progress bar.
    storage_options : mapping, optional (keyword)
        Options of the filesystem of every run at a URL, as for :func:`analyze.analyze_runs`.
    **kwargs
        Any :class:`~analyze.AnalysisOptions` field; and ``cache_dir`` (a path, default ``None``),
        ``progress`` (a bool, default ``True``) and ``storage_options``, described above.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`SIMILARITY_COLUMNS`: one row per ordered pair of compared items (both
        triangles and the diagonal: ``pwcca`` is not symmetric), measure and (conv method,
        time-series method) combination. ``phase``, ``conv_method`` and ``timeseries_method`` are
        those of both sides. Each matrix is a block of consecutive rows, row-major (``_a`` the
        row, ``_b`` the column); blocks come in the order

        * ``"layers"``: run, epoch, phase, conv method, time-series method, measure;
          rows and columns the run's layers;
        * ``"epochs"``: run, layer, phase, conv method, time-series method, measure;
          rows and columns the epochs;
        * ``"runs"``: epoch, layer, phase, conv method, time-series method, measure;
          rows and columns the runs;

        runs in the order given, layers in first-seen order, epochs ascending, phases train then
        eval, methods and measures in the order asked.

    Raises
    ------
    AnalysisError
        Bad options; a layer without raw activations; compared items whose rows are not the same
        samples (different sample counts, call sizes or selected calls, or ``channelwise`` maps of
        different sizes); NaN or infinite activations.
    FileNotFoundError, capture.StoreFormatError
        A missing or foreign store.

    Warns
    -----
    UserWarning
        ``pairs="epochs"`` or ``"runs"`` on the train phase: the store cannot tell whether its rows
        are the same samples in the same order (shuffled training batches are not).

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from capture import Recorder
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with Recorder(net, f"{tmp}/r.zarr") as rec:
    ...         _ = net(torch.randn(64, 8)); _ = rec.end_epoch()
    ...     table = similarity(f"{tmp}/r.zarr", "cka", progress=False)
    >>> table[["layer_a", "layer_b", "value"]].round(3).values.tolist()
    [['0', '0', 1.0], ['0', '2', 0.766], ['2', '0', 0.766], ['2', '2', 1.0]]
    """
    return analyze_similarity(runs, measure, pairs, options, **kwargs).table


def _tabulate(plan: SimilarityPlan, accumulators: list[dict[str, Accumulator]]) -> pd.DataFrame:
    """The table of every planned matrix (see :func:`similarity` for the order)."""
    options = plan.options
    measure_options = {"svcca_threshold": options.svcca_threshold, "minibatch_size": options.minibatch_size}
    values: dict[tuple[int, str], np.ndarray] = {}
    rows: list[tuple[Any, ...]] = []
    for matrix in plan.matrices:
        comparison = plan.comparisons[matrix.comparison]
        for measure in options.measures:
            key = (matrix.comparison, measure)
            if key not in values:
                source = accumulators[matrix.comparison][MEASURES[measure].needs]
                values[key] = similarity_matrix(source, measure, **measure_options)
            for i, a in enumerate(comparison.keys):
                for j, b in enumerate(comparison.keys):
                    rows.append(
                        (
                            *a,
                            *b,
                            comparison.phase,
                            matrix.conv_method,
                            matrix.timeseries_method,
                            measure,
                            float(values[key][i, j]),
                        )
                    )
    table = pd.DataFrame(rows, columns=list(SIMILARITY_COLUMNS))
    for column in ("epoch_a", "epoch_b"):
        table[column] = table[column].astype("int64")
    table["value"] = table["value"].astype("float64")
    return table


# --------------------------------------------------------------------------- matrices


def check_similarity(table: Any) -> pd.DataFrame:
    """A similarity table with :data:`SIMILARITY_COLUMNS`, in that order (a ``ValueError`` otherwise).

    Examples
    --------
    >>> check_similarity(pd.DataFrame({"run_a": ["r"], "value": [1.0]}))
    Traceback (most recent call last):
    ...
    ValueError: similarity: the table lacks the column(s) epoch_a, layer_a, run_b, epoch_b, layer_b, phase, conv_method, timeseries_method, measure
    """
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"similarity: expected a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in SIMILARITY_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"similarity: the table lacks the column(s) {', '.join(missing)}")
    return table.loc[:, list(SIMILARITY_COLUMNS)].reset_index(drop=True)


def similarity_range(values: Any) -> tuple[float, float]:
    """The colour range of similarity values: from 0 (or the smallest value, when one is negative) to 1.

    Examples
    --------
    >>> similarity_range([0.2, 1.0]), similarity_range([[-0.05, np.nan], [1.0, 0.3]])
    ((0.0, 1.0), (-0.05, 1.0))
    """
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    return (min(0.0, float(finite.min())) if finite.size else 0.0, 1.0)


class SimilarityMatrix(NamedTuple):
    """One matrix of a similarity table: what is fixed, the labels of its rows / columns, the values."""

    pairs: str
    fixed: dict[str, Any]
    labels: list[Any]
    values: np.ndarray

    @property
    def title(self) -> str:
        """What the matrix shows, e.g. ``"cka, layer x layer | cnn, epoch 7, eval | mean | last_timestep"``."""
        f = self.fixed
        axis = {"layers": "layer x layer", "epochs": "epoch x epoch", "runs": "run x run"}[self.pairs]
        if self.pairs == "layers":
            where = f"{f['run']}, epoch {f['epoch']}"
        elif self.pairs == "epochs":
            where = f"{f['run']}, layer {f['layer']}"
        else:
            where = f"layer {f['layer']}, epoch {f['epoch']}"
        return (
            f"{f['measure']}, {axis} | {where}, {f['phase']} | {f['conv_method']} | {f['timeseries_method']}"
        )


#: Per kind of pairs: the columns fixed within a matrix, and the column that labels its rows.
_MATRIX_AXES = {
    "layers": (("run", "epoch"), "layer"),
    "epochs": (("run", "layer"), "epoch"),
    "runs": (("epoch", "layer"), "run"),
}

#: The three sides of a compared item.
_SIDES = ("run", "epoch", "layer")


def split_pairs(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The rows of a similarity table per kind of pairs, each ready for :func:`similarity_matrices`.

    ``table`` may hold the tables of several :func:`similarity` calls, concatenated (other
    measures, other ``pairs``). A row whose two items differ in the layer belongs to
    ``"layers"``, in the epoch to ``"epochs"``, in the run to ``"runs"``. A row of an item with
    itself (a diagonal cell) belongs to the matrix whose rows stand next to it in the table (each
    matrix of :func:`similarity` is a block of consecutive rows, so every kind gets its own
    diagonal values); one that stands next to none, to each kind with a matrix of that item; where
    none has one (matrices of one item), to the first kind whose matrices then all have one item.

    Returns
    -------
    dict
        ``"layers"``, ``"epochs"``, ``"runs"`` (those present, in that order) -> their rows, in
        the table's order.

    Raises
    ------
    ValueError
        A missing column, or a row whose items differ in more than one of run, epoch and layer
        (no call of :func:`similarity` gives one).

    Examples
    --------
    >>> def row(a, b):  # (run, epoch, layer) of both sides
    ...     return (*a, *b, "eval", "mean", "last_timestep", "cka", 1.0 if a == b else 0.5)
    >>> t = pd.DataFrame([row(("r", 0, "x"), ("r", 0, "y")), row(("r", 0, "x"), ("r", 0, "x")),
    ...                   row(("r", 0, "x"), ("r", 1, "x")), row(("r", 1, "x"), ("r", 1, "x"))],
    ...                  columns=SIMILARITY_COLUMNS)
    >>> {pairs: rows.index.tolist() for pairs, rows in split_pairs(t).items()}
    {'layers': [0, 1], 'epochs': [1, 2, 3]}
    """
    table = check_similarity(table)
    differs = {side: (table[f"{side}_a"] != table[f"{side}_b"]).to_numpy() for side in _SIDES}
    count = sum(differs.values(), np.zeros(len(table), dtype=np.int64))
    if (count > 1).any():
        i = int(np.argmax(count > 1))
        a, b = ([table.at[i, f"{side}_{x}"] for side in _SIDES] for x in "ab")
        raise ValueError(
            f"similarity: row {i} compares run {a[0]!r} epoch {a[1]} layer {a[2]!r} with run {b[0]!r} "
            f"epoch {b[1]} layer {b[2]!r}: the items of a row differ in the run, the epoch or the layer, "
            "not in two of them"
        )
    diagonal = count == 0
    codes = {  # per kind of pairs: the number of each row's matrix
        pairs: table.groupby(_matrix_columns(fixed), sort=False).ngroup().to_numpy()
        for pairs, (fixed, _) in _MATRIX_AXES.items()
    }
    offs = {pairs: differs[axis] for pairs, (_, axis) in _MATRIX_AXES.items() if differs[axis].any()}
    near = {pairs: diagonal & _next_to(off, codes[pairs]) for pairs, off in offs.items()}
    placed = np.logical_or.reduce([*near.values(), np.zeros(len(table), dtype=bool)])
    masks = {
        pairs: off | near[pairs] | (diagonal & ~placed & np.isin(codes[pairs], codes[pairs][off]))
        for pairs, off in offs.items()
    }
    rest = diagonal & ~np.logical_or.reduce([*masks.values(), np.zeros(len(table), dtype=bool)])
    if rest.any():
        alone = table[rest]
        pairs = next(
            (
                pairs
                for pairs, (fixed, axis) in _MATRIX_AXES.items()
                if alone.groupby(_matrix_columns(fixed))[f"{axis}_a"].nunique().max() == 1
            ),
            "layers",
        )
        masks[pairs] = masks.get(pairs, rest) | rest
    return {pairs: table[masks[pairs]] for pairs in _MATRIX_AXES if pairs in masks}


def _next_to(off: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Rows next to (just before or after) a row of ``off`` with the same ``code``."""
    out = np.zeros(len(off), dtype=bool)
    same = code[1:] == code[:-1]
    out[1:] |= off[:-1] & same
    out[:-1] |= off[1:] & same
    return out


def _matrix_columns(fixed: tuple[str, ...]) -> list[str]:
    """The columns whose values a matrix shares: its fixed sides, phase, methods and measure."""
    return [f"{c}_a" for c in fixed] + ["phase", "conv_method", "timeseries_method", "measure"]


def similarity_matrices(table: pd.DataFrame, pairs: str) -> list[SimilarityMatrix]:
    """The matrices of a :func:`similarity` table, in the table's order.

    Parameters
    ----------
    table : pandas.DataFrame
        A table of :func:`similarity` (or a subset of its rows).
    pairs : {"layers", "epochs", "runs"}
        What the table compares (how it was made).

    Returns
    -------
    list of SimilarityMatrix
        ``fixed`` holds the matrix's ``phase``, ``conv_method``, ``timeseries_method``,
        ``measure`` and the two of ``run`` / ``epoch`` / ``layer`` that ``pairs`` keeps fixed;
        ``labels`` the third, for rows and columns in order of first appearance; ``values[i, j]``
        is the value of ``labels[i]`` (the ``_a`` side) with ``labels[j]`` (NaN where the table
        has no row).

    Examples
    --------
    >>> t = pd.DataFrame({"run_a": ["r"] * 4, "epoch_a": [0] * 4, "layer_a": ["x", "x", "y", "y"],
    ...                   "run_b": ["r"] * 4, "epoch_b": [0] * 4, "layer_b": ["x", "y", "x", "y"],
    ...                   "phase": ["eval"] * 4, "conv_method": ["mean"] * 4,
    ...                   "timeseries_method": ["last_timestep"] * 4, "measure": ["cka"] * 4,
    ...                   "value": [1.0, 0.5, 0.5, 1.0]})
    >>> (m,) = similarity_matrices(t, "layers")
    >>> m.labels, m.values.tolist(), m.title
    (['x', 'y'], [[1.0, 0.5], [0.5, 1.0]], 'cka, layer x layer | r, epoch 0, eval | mean | last_timestep')
    """
    if pairs not in _MATRIX_AXES:
        raise ValueError(f"pairs: unknown value {pairs!r}; valid values are: {', '.join(_MATRIX_AXES)}")
    fixed_sides, axis = _MATRIX_AXES[pairs]
    out = []
    for key, block in check_similarity(table).groupby(_matrix_columns(fixed_sides), sort=False):
        labels = list(dict.fromkeys([*block[f"{axis}_a"], *block[f"{axis}_b"]]))
        position = {label: i for i, label in enumerate(labels)}
        values = np.full((len(labels), len(labels)), np.nan)
        for a, b, v in zip(block[f"{axis}_a"], block[f"{axis}_b"], block["value"], strict=True):
            values[position[a], position[b]] = v
        names = [*fixed_sides, "phase", "conv_method", "timeseries_method", "measure"]
        fixed = {n: (v.item() if isinstance(v, np.generic) else v) for n, v in zip(names, key, strict=True)}
        out.append(SimilarityMatrix(pairs, fixed, [_plain(v) for v in labels], values))
    return out


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
