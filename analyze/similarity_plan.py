"""Planning a similarity analysis: what is compared with what, on which rows, checked before any read.

:func:`plan_similarity` opens the run stores' metadata (no activation is read) and lays out

* the **items**: one layer's matrix of one epoch and phase in one rank of one run, reshaped by one
  method, with the rows of its raw array that the sample selection keeps (from the calls table);
* the **comparisons**: the items that go into one accumulator (all their pairs are computed from
  it): the layers of one run, epoch and phase (``pairs="layers"``), one layer of one run at every
  epoch (``"epochs"``) or one layer, by name, of every run at one epoch (``"runs"``);
* the **matrices**: one per comparison and (conv method, time-series method) combination asked,
  in the order of the result table.

A comparison only makes sense when its items hold the same samples in the same order, which the
store cannot see: it records rows, not sample identities. What it can see is checked here, and a
mismatch is a one-line :class:`analyze.AnalysisError` naming the items: the same number of rows
per rank, recorded in calls of the same sizes, by the same forward calls for the layers of one
run and epoch, and the same number of matrix rows per sample under the reshaping rules
(``channelwise`` gives one row per position of a conv map, so it compares only maps of the same
size; ``tokenwise`` one row per position of a sequence, so it compares only sequences of the same
length, e.g. two layers of one transformer). Ranks are separate sample sets: rank ``r`` of one
item is compared with rank ``r`` of the others. Stored token masks (padding) are not applied
here: a layer that has them is refused for the methods they change (``tokenwise``,
``last_timestep``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from analyze.cache import CovarianceCache
from analyze.options import AnalysisError, AnalysisOptions
from analyze.plan import MAX_WIDTH, RunPlan, plan_analysis
from analyze.selection import select_rows
from analyze.similarity_measures import needs_of
from capture.format import PHASES
from capture.reshape import layout_of, masks_apply, matrix_width, to_matrix
from capture.store import RankPart, RunInfo

__all__ = [
    "MAX_JOINT_WIDTH",
    "Compared",
    "Comparison",
    "Item",
    "ItemRows",
    "MatrixPlan",
    "SimilarityPlan",
    "plan_similarity",
]

#: Widest set of layers whose joint moments are accumulated: an 8192 x 8192 float64 m2 is 512 MiB.
MAX_JOINT_WIDTH = 8192
#: Bump when what a cached accumulator holds, or how it is computed, changes.
SIMILARITY_CACHE_VERSION = 1


class Compared(NamedTuple):
    """One side of a pair: a layer of a run at an epoch (the key of an accumulator)."""

    run: str
    epoch: int
    layer: str

    def __repr__(self) -> str:
        return f"{self.layer!r} (run {self.run!r}, epoch {self.epoch})"


class Item(NamedTuple):
    """A layer's matrix of one epoch and phase in one rank of one run, by one reshaping method."""

    run: str
    rank: int
    layer: str
    epoch: int
    phase: str
    method: str


@dataclass(frozen=True)
class ItemRows:
    """Where an item's rows are: the kept row ranges of the layer's raw array, in sample order."""

    ranges: tuple[tuple[int, int], ...]
    calls: tuple[int, ...]
    samples: int
    rows_per_sample: int
    width: int
    layout: str

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.ranges)


@dataclass(frozen=True)
class Comparison:
    """The items of one accumulator: ``keys[i]`` is ``items[rank][i]`` in every rank (ranks in order)."""

    keys: tuple[Compared, ...]
    phase: str
    methods: tuple[str, ...]
    ranks: tuple[int, ...]
    items: tuple[tuple[Item, ...], ...]
    samples: tuple[int, ...]
    rows_per_sample: int
    widths: tuple[int, ...]
    cache_keys: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def total_width(self) -> int:
        return int(sum(self.widths))

    def label(self) -> str:
        """The comparison for messages: its phase and keys."""
        return f"{self.phase}: " + ", ".join(repr(k) for k in self.keys)


class MatrixPlan(NamedTuple):
    """One matrix of the result: a comparison read with one (conv method, time-series method)."""

    comparison: int
    conv_method: str
    timeseries_method: str


@dataclass(frozen=True, eq=False)
class SimilarityPlan:
    """Everything a similarity analysis computes, in the order of its result table."""

    options: AnalysisOptions
    runs: tuple[RunPlan, ...]
    layers: dict[str, tuple[str, ...]]
    items: dict[Item, ItemRows]
    comparisons: tuple[Comparison, ...]
    matrices: tuple[MatrixPlan, ...]
    needs: tuple[str, ...]
    skipped: tuple[str, ...] = ()


# --------------------------------------------------------------------------- per layer


def _layout(run: RunInfo, layer: str) -> str:
    rec = run.layer(layer)
    return layout_of(rec.kind, len(rec.sample_shape) + 1)


def _method(layout: str, conv_method: str, timeseries_method: str) -> str:
    return conv_method if layout == "conv" else timeseries_method if layout == "sequence" else "none"


def _check_raw(run: RunInfo, layer: str, options: AnalysisOptions) -> None:
    """A layer that similarity cannot use raises :class:`AnalysisError` (raw rows, not too wide)."""
    if options.source == "gram":
        raise AnalysisError.invalid(
            "source", "similarity reads raw activations: gram moments hold no cross-layer moments"
        )
    if not any(layer in p.layers and p.layers[layer].raw_array for p in run.ranks):
        raise AnalysisError(
            f"{run.path}: layer {layer!r}: similarity needs raw activations, and this store holds gram moments "
            "only (they have no cross-layer moments); re-capture with mode='raw' or 'both'"
        )
    rec, layout = run.layer(layer), _layout(run, layer)
    methods = (
        options.conv_methods
        if layout == "conv"
        else options.timeseries_methods
        if layout == "sequence"
        else ("none",)
    )
    masked = [m for m in methods if masks_apply(layout, [m])]
    if masked and any(layer in p.layers and p.layers[layer].mask_array for p in run.ranks):
        raise AnalysisError(
            f"{run.path}: layer {layer!r}: its raw rows come with token masks (padding), which similarity "
            f"does not apply (its {' and '.join(map(repr, masked))} rows would hold padding positions); "
            "compare 'timestepwise', or record sequences without padding"
        )
    interp = options.interpolation if layout == "conv" else None
    for method in methods:
        width = matrix_width(
            rec.sample_shape, layout, method, interpolation=interp, downsample=options.downsample
        )
        if width > MAX_WIDTH:
            raise AnalysisError(
                f"{run.path}: layer {layer!r}: the {method!r} matrix is {width} columns wide (limit {MAX_WIDTH}); "
                "use a pooling conv method (mean, max, median) or leave the layer out (--layers)"
            )


@functools.lru_cache(maxsize=256)
def _rows_per_sample(
    sample_shape: tuple[int, ...], layout: str, method: str, interpolation: str | None, downsample: int | None
) -> int:
    """Matrix rows per recorded sample under the reshaping rules (``to_matrix`` of one zero sample).

    One for the per-sample methods; the positions of a conv map for ``channelwise``, of a sequence
    for ``tokenwise``.
    """
    one = np.zeros((1, *sample_shape), dtype=np.float32)
    return int(to_matrix(one, layout, method, interpolation=interpolation, downsample=downsample).shape[0])


def _item_rows(run: RunInfo, part: RankPart, item: Item, options: AnalysisOptions) -> ItemRows:
    layout = _layout(run, item.layer)
    rec = run.layer(item.layer)
    width = matrix_width(
        rec.sample_shape,
        layout,
        item.method,
        interpolation=options.interpolation if layout == "conv" else None,
        downsample=options.downsample,
    )
    interpolation = options.interpolation if layout == "conv" else None
    per_sample = _rows_per_sample(
        tuple(rec.sample_shape),
        layout,
        item.method,
        interpolation,
        options.downsample if interpolation else None,
    )
    if item.layer not in part.layers or not part.layers[item.layer].raw_array:
        return ItemRows((), (), 0, per_sample, width, layout)
    calls = part.calls
    index = part.layers[item.layer].index
    mask = (calls[:, 0] == item.epoch) & (calls[:, 1] == PHASES.index(item.phase)) & (calls[:, 2] == index)
    sel = calls[mask]
    ranges = tuple(select_rows(sel[:, 3], sel[:, 4], sel[:, 5], options.selection))
    starts = [a for a, _ in ranges]
    if starts != sorted(starts):
        raise AnalysisError(
            f"{run.path}: layer {item.layer!r}, epoch {item.epoch}, {item.phase}: rank {part.rank}'s calls are not "
            "in row order; the store is damaged"
        )
    first_row_call = {int(r): int(c) for c, r in zip(sel[:, 3], sel[:, 4], strict=True)}
    call_ids = tuple(first_row_call[a] for a in starts)
    return ItemRows(ranges, call_ids, sum(b - a for a, b in ranges), per_sample, width, layout)


# --------------------------------------------------------------------------- checks


def _describe(item: Item) -> str:
    return f"layer {item.layer!r} (run {item.run!r}, epoch {item.epoch}, {item.phase}, rank {item.rank})"


def _check_rows(items: Sequence[Item], rows: Sequence[ItemRows], pairs: str) -> None:
    """The items of one rank of a comparison hold corresponding rows, else a one-line error naming two."""
    first, ref = items[0], rows[0]
    for item, got in zip(items[1:], rows[1:], strict=True):
        if got.rows_per_sample != ref.rows_per_sample:
            conv = "conv" in (got.layout, ref.layout)
            raise AnalysisError.invalid(
                "conv_methods" if conv else "timeseries_methods",
                f"{first.method!r} gives {_describe(first)} {ref.rows_per_sample} rows per sample and "
                f"{item.method!r} gives {_describe(item)} {got.rows_per_sample}; similarity compares rows that "
                "correspond one to one: use a per-sample method (conv maps: mean, max, median, flatten; "
                "sequences: last_timestep, timestepwise) or compare layers of one map size or sequence "
                "length (channelwise, tokenwise)",
            )
        if got.samples != ref.samples:
            raise AnalysisError(
                f"pairs={pairs!r}: {_describe(item)} has {got.samples} samples and {_describe(first)} "
                f"{ref.samples}; similarity compares the same samples in every layer"
            )
        if got.sizes != ref.sizes:
            raise AnalysisError(
                f"pairs={pairs!r}: {_describe(item)} and {_describe(first)} hold {got.samples} samples each, "
                f"recorded in calls of different sizes ({_sizes(got.sizes)} and {_sizes(ref.sizes)}): "
                "their rows are not the same samples in the same order"
            )
        same_forward = (item.run, item.epoch) == (first.run, first.epoch)
        if same_forward and got.calls != ref.calls:
            raise AnalysisError(
                f"pairs={pairs!r}: {_describe(item)} and {_describe(first)} were selected from different forward "
                f"calls ({_sizes(got.calls)} and {_sizes(ref.calls)}); their rows are not the same samples"
            )


def _sizes(values: Sequence[int]) -> str:
    shown = ", ".join(str(v) for v in values[:6])
    return f"[{shown}{', ...' if len(values) > 6 else ''}]"


# --------------------------------------------------------------------------- comparisons


@dataclass
class _Builder:
    """Collects the items and comparisons of a plan, each once."""

    options: AnalysisOptions
    runs: dict[str, RunPlan]
    items: dict[Item, ItemRows] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    index: dict[tuple, int | None] = field(default_factory=dict)

    def rows(self, item: Item) -> ItemRows:
        if item not in self.items:
            run = self.runs[item.run].run
            part = next(p for p in run.ranks if p.rank == item.rank)
            self.items[item] = _item_rows(run, part, item, self.options)
        return self.items[item]

    def comparison(self, keys: Sequence[Compared], phase: str, methods: Sequence[str]) -> int | None:
        """The index of the comparison of ``keys`` (each with its method), built and checked once.

        ``None`` when no rank recorded a sample of them.
        """
        ident = (tuple(keys), phase, tuple(methods))
        if ident in self.index:
            return self.index[ident]
        ranks = sorted({p.rank for k in keys for p in self.runs[k.run].run.ranks})
        per_rank, counts = [], []
        per_sample = widths = None
        for rank in ranks:
            items = [
                Item(k.run, rank, k.layer, k.epoch, phase, m)
                if _has_rank(self.runs[k.run].run, rank)
                else None
                for k, m in zip(keys, methods, strict=True)
            ]
            rows = [self.rows(i) if i is not None else None for i in items]
            if any(i is None for i in items):
                missing = next(k for k, i in zip(keys, items, strict=True) if i is None)
                present = [(i, r) for i, r in zip(items, rows, strict=True) if i is not None and r.samples]
                if present:
                    raise AnalysisError(
                        f"pairs={self.options.pairs!r}: run {missing.run!r} has no rank {rank}, and "
                        f"{_describe(present[0][0])} has {present[0][1].samples} samples there; ranks are separate "
                        "sample sets, compared rank by rank"
                    )
                continue
            _check_rows(items, rows, self.options.pairs)  # type: ignore[arg-type]
            per_sample, widths = rows[0].rows_per_sample, tuple(r.width for r in rows)  # type: ignore[union-attr]
            if rows[0].samples:  # type: ignore[union-attr]
                per_rank.append(tuple(items))
                counts.append(rows[0].samples)  # type: ignore[union-attr]
        if not per_rank:  # e.g. a phase that was not recorded in this epoch: nothing to compare
            self.index[ident] = None
            return None
        comparison = Comparison(
            keys=tuple(keys),
            phase=phase,
            methods=tuple(methods),
            ranks=tuple(items[0].rank for items in per_rank),
            items=tuple(per_rank),
            samples=tuple(counts),
            rows_per_sample=int(per_sample),  # type: ignore[arg-type]
            widths=widths,  # type: ignore[arg-type]
        )
        self._check_width(comparison)
        self._cache_keys(comparison)
        self.index[ident] = len(self.comparisons)
        self.comparisons.append(comparison)
        return self.index[ident]

    def _check_width(self, comparison: Comparison) -> None:
        if "moments" not in needs_of(self.options.measures) or comparison.total_width <= MAX_JOINT_WIDTH:
            return
        d = comparison.total_width
        raise AnalysisError(
            f"{comparison.label()}: their joint moments are {d} columns wide and need {d * d * 8 / 2**30:.1f} GiB "
            f"(limit {MAX_JOINT_WIDTH} columns); use the measure 'minibatch_cka' (its memory does not grow with "
            "the widths), fewer layers (--layers) or a pooling conv method"
        )

    def _cache_keys(self, comparison: Comparison) -> None:
        options = self.options
        for need in needs_of(options.measures):
            comparison.cache_keys[need] = CovarianceCache.key(
                kind="similarity",
                version=SIMILARITY_CACHE_VERSION,
                need=need,
                minibatch_size=options.minibatch_size if need == "minibatch" else None,
                phase=comparison.phase,
                keys=[
                    (self.runs[k.run].fingerprint, k.epoch, k.layer, m)
                    for k, m in zip(comparison.keys, comparison.methods, strict=True)
                ],
                ranks=comparison.ranks,
                selection=options.selection.key(),
                interpolation=options.interpolation,
                downsample=options.downsample,
            )


def _has_rank(run: RunInfo, rank: int) -> bool:
    return any(p.rank == rank for p in run.ranks)


# --------------------------------------------------------------------------- the plan


def _usable_layers(
    run_plans: Sequence[RunPlan], options: AnalysisOptions
) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Each run's layers that similarity can use; with ``on_error="skip"`` the others are left out, warned."""
    layers: dict[str, tuple[str, ...]] = {}
    skipped: list[str] = []
    for rp in run_plans:
        kept = []
        for layer in rp.layers:
            try:
                _check_raw(rp.run, layer, options)
            except AnalysisError as exc:
                if options.on_error != "skip" or exc.argument is not None:
                    raise
                skipped.append(str(exc))
                warnings.warn(f"skipped {rp.name} layer {layer!r}: {exc}", RuntimeWarning, stacklevel=4)
                continue
            kept.append(layer)
        layers[rp.name] = tuple(kept)
    return layers, skipped


def _combos(options: AnalysisOptions) -> list[tuple[str, str]]:
    return [(cm, tm) for cm in options.conv_methods for tm in options.timeseries_methods]


def _common_epochs(run_plans: Sequence[RunPlan]) -> list[int]:
    common = sorted(set.intersection(*(set(rp.epochs) for rp in run_plans)))
    if not common:
        shown = "; ".join(f"{rp.name}: {list(rp.epochs)}" for rp in run_plans)
        raise AnalysisError.invalid(
            "epochs", f"pairs='runs' compares the same epoch of every run, and the runs share none ({shown})"
        )
    return common


def _matrices(
    builder: _Builder, run_plans: Sequence[RunPlan], layers: dict[str, tuple[str, ...]]
) -> list[MatrixPlan]:
    """Every matrix of the result, in the order of the table (see :func:`analyze.similarity`)."""
    options = builder.options
    out: list[MatrixPlan] = []

    def add(keys: list[Compared], phase: str) -> None:
        if not keys:
            return
        for cm, tm in _combos(options):
            methods = [_method(_layout(builder.runs[k.run].run, k.layer), cm, tm) for k in keys]
            comparison = builder.comparison(keys, phase, methods)
            if comparison is not None:
                out.append(MatrixPlan(comparison, cm, tm))

    if options.pairs == "layers":
        for rp in run_plans:
            for epoch in rp.epochs:
                for phase in options.phases:
                    add([Compared(rp.name, epoch, layer) for layer in layers[rp.name]], phase)
    elif options.pairs == "epochs":
        for rp in run_plans:
            for layer in layers[rp.name]:
                for phase in options.phases:
                    add([Compared(rp.name, e, layer) for e in rp.epochs], phase)
    else:
        names = [n for n in layers[run_plans[0].name] if all(n in layers[rp.name] for rp in run_plans)]
        if not names:
            raise AnalysisError.invalid(
                "layers", "pairs='runs' compares layers of the same name, and the runs share none"
            )
        for epoch in _common_epochs(run_plans):
            for layer in names:
                for phase in options.phases:
                    add([Compared(rp.name, epoch, layer) for rp in run_plans], phase)
    return out


def _check_options(options: AnalysisOptions) -> None:
    if options.delve_compat:
        raise AnalysisError.invalid("compat", "delve 0.1.50 computes no similarity; leave compat unset")
    if options.pairs in ("epochs", "runs") and "train" in options.phases:
        warnings.warn(
            f"pairs={options.pairs!r} compares the train phase's rows of different "
            f"{'epochs' if options.pairs == 'epochs' else 'runs'}: the store cannot tell whether they are the same "
            "samples in the same order (shuffled training batches are not); compare the eval phase "
            "(phases='eval', --phase eval) on fixed evaluation data",
            UserWarning,
            stacklevel=4,
        )


def plan_similarity(
    runs: str | Sequence[str], options: AnalysisOptions, storage_options: Mapping[str, Any] | None = None
) -> SimilarityPlan:
    """Plan the comparisons of ``runs`` with ``options`` (reads the stores' metadata only).

    ``storage_options`` apply to every run at a URL (see :func:`analyze.plan.plan_analysis`).

    Raises
    ------
    AnalysisError
        Bad options for similarity (``compat``, ``source="gram"``), a glob that matches nothing, an
        epoch out of range, a layer without raw activations (unless ``on_error="skip"``), items
        whose rows do not correspond (see the module docstring), joint moments too wide.
    FileNotFoundError, capture.StoreFormatError
        A missing or foreign store.

    Warns
    -----
    UserWarning
        ``pairs="epochs"`` or ``"runs"`` with the train phase (see :func:`analyze.similarity`).
    RuntimeWarning
        A layer left out with ``on_error="skip"``.
    """
    _check_options(options)
    # plan_analysis opens the stores, resolves the epochs and layers and checks the device; its
    # covariance targets are not used (similarity reads raw rows of its own).
    base = plan_analysis(runs, options.replace(source="raw", on_error="skip", stats=("trc",)), storage_options)
    run_plans = base.runs
    layers, skipped = _usable_layers(run_plans, options)
    builder = _Builder(options, {rp.name: rp for rp in run_plans})
    matrices = _matrices(builder, run_plans, layers)
    if not matrices:
        raise AnalysisError(
            f"pairs={options.pairs!r}: nothing to compare: no recorded samples of the layers, epochs and phases "
            f"asked ({', '.join(options.phases)}); choose others (--layers, --epochs, --phase)"
        )
    return SimilarityPlan(
        options=options,
        runs=tuple(run_plans),
        layers=layers,
        items=builder.items,
        comparisons=tuple(builder.comparisons),
        matrices=tuple(matrices),
        needs=needs_of(options.measures),
        skipped=tuple(skipped),
    )
