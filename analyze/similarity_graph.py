"""The one-pass dask graph of a similarity analysis, and the cache of its accumulators.

How the pass reads
------------------
Two kinds of tasks share one graph, computed by one ``dask.compute`` call:

**Read tasks**, one per ``(run, rank, layer)`` and aligned group of ``2**k`` store chunks of the
layer's raw array (``k`` from ``task_bytes``), read each chunk of that group once
(:func:`analyze.similarity_io.read_chunks`), and turn the kept rows of every item that lies there
(any epoch, phase or reshaping method) into its matrix rows with :func:`capture.reshape.to_matrix`,
one store chunk at a time. Every chunk of every layer that holds a compared row is read by exactly
one read task, whatever the layers' chunk grids (they differ: a chunk holds about 16 MiB of rows).

**Moment tasks** work in sample space, per comparison: its samples (rank after rank) are cut into
*leaves* of a fixed number of samples (about 32 MiB of the concatenated float64 matrix, at least
256 rows; it depends on the widths only). A task takes an aligned group of ``2**j`` leaves (``j``
from ``task_bytes``), gathers each leaf's rows of every compared item from the read tasks' outputs,
reduces each leaf with the core's accumulators
(:meth:`analyze.similarity_moments.JointMoments.from_chunk`,
:meth:`analyze.similarity_moments.MinibatchHSIC.from_chunk`) and merges its leaves with
:func:`analyze.similarity_moments.merge_partials`; pairwise merges of the task results build the
rest of the same balanced tree. The leaves and the tree depend only on the comparison, so the
result is bit-for-bit the same whatever the scheduler or the task size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask import delayed

from analyze.cache import CovarianceCache
from analyze.options import AnalysisError
from analyze.similarity_io import (
    RawSource,
    compute_with_progress,
    one_blas_thread,
    one_torch_thread,
    raw_source,
    read_chunks,
)
from analyze.similarity_measures import new_accumulator
from analyze.similarity_moments import JointMoments, MinibatchHSIC, merge_partials
from analyze.similarity_plan import Compared, Comparison, Item, ItemRows, SimilarityPlan
from capture.reshape import to_matrix

__all__ = ["LEAF_BYTES", "MIN_LEAF_ROWS", "accumulate", "leaf_samples"]

#: Bytes of the concatenated float64 matrix rows of one leaf.
LEAF_BYTES = 32 * 2**20
#: Fewest matrix rows of a leaf (a leaf's merge costs about as much as 1-2 rows per column).
MIN_LEAF_ROWS = 256

Accumulator = JointMoments | MinibatchHSIC


def leaf_samples(comparison: Comparison) -> int:
    """Samples per leaf of a comparison (its widths and rows per sample decide; nothing else)."""
    rows = max(MIN_LEAF_ROWS, LEAF_BYTES // (8 * comparison.total_width))
    return max(1, rows // comparison.rows_per_sample)


def _power_of_two(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


# --------------------------------------------------------------------------- read tasks


@dataclass(frozen=True)
class _Reshape:
    """How rows of one layer become matrices (shared by its items)."""

    layout: str
    interpolation: str | None
    downsample: int | None
    device: str


def _matrix(x: np.ndarray, method: str, how: _Reshape) -> np.ndarray:
    if how.device != "cpu":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x)).to(how.device)
        out = to_matrix(t, how.layout, method, interpolation=how.interpolation, downsample=how.downsample)
        return out.cpu().numpy()
    return to_matrix(x, how.layout, method, interpolation=how.interpolation, downsample=how.downsample)


def _wanted_chunks(
    src: RawSource, chunk_lo: int, chunk_hi: int, wanted: dict[int, tuple[str, list[tuple[int, int, int]]]]
) -> Iterator[tuple[int, int, np.ndarray]]:
    """The store chunks in ``[chunk_lo, chunk_hi)`` that hold a wanted row, each read once, in order."""
    r = src.chunk_rows
    needed = sorted(
        {c for _, ranges in wanted.values() for a, b, _ in ranges for c in range(a // r, (b - 1) // r + 1)}
    )
    needed = [c for c in needed if chunk_lo <= c < chunk_hi]
    start = 0
    for i in range(1, len(needed) + 1):  # runs of consecutive chunks
        if i == len(needed) or needed[i] != needed[i - 1] + 1:
            yield from read_chunks(src, needed[start], needed[i - 1] + 1)
            start = i


def _read_task(
    src: RawSource,
    chunk_lo: int,
    chunk_hi: int,
    how: _Reshape,
    wanted: dict[int, tuple[str, list[tuple[int, int, int]]]],
) -> dict[int, tuple[int, np.ndarray]]:
    """Matrix rows of every wanted item in store chunks ``[chunk_lo, chunk_hi)``, each chunk read once.

    ``wanted``: item id -> (method, ranges ``(first row, stop row, first sample)`` of the array).
    Returns item id -> (first sample, its matrix rows), the samples being consecutive.
    """
    pieces: dict[int, list[np.ndarray]] = {i: [] for i in wanted}
    first: dict[int, int] = {}
    with one_torch_thread():
        for _, c0, data in _wanted_chunks(src, chunk_lo, chunk_hi, wanted):
            c1 = c0 + len(data)
            for item, (method, ranges) in wanted.items():
                parts = [
                    (max(a, c0), min(b, c1), s + max(a, c0) - a) for a, b, s in ranges if a < c1 and b > c0
                ]
                if not parts:
                    continue
                first.setdefault(item, parts[0][2])
                x = [data[a - c0 : b - c0] for a, b, _ in parts]
                mat = _matrix(x[0] if len(x) == 1 else np.concatenate(x), method, how)
                pieces[item].append(mat.copy() if np.may_share_memory(mat, data) else mat)
    return {i: (first[i], p[0] if len(p) == 1 else np.concatenate(p)) for i, p in pieces.items() if p}


def _rows_of_samples(rows: ItemRows, s0: int, s1: int) -> list[tuple[int, int, int]]:
    """The array row ranges ``(first row, stop row, first sample)`` holding samples ``[s0, s1)`` of an item."""
    out, start = [], 0
    for a, b in rows.ranges:
        lo, hi = max(s0, start), min(s1, start + b - a)
        if hi > lo:
            out.append((a + lo - start, a + hi - start, lo))
        start += b - a
        if start >= s1:
            break
    return out


class _Reads:
    """The read tasks of a pass: one per (run, rank, layer) and chunk group, serving every item there."""

    def __init__(self, plan: SimilarityPlan, comparisons: Sequence[Comparison]) -> None:
        self.plan = plan
        items = list(dict.fromkeys(i for c in comparisons for rank_items in c.items for i in rank_items))
        self.item_ids = {item: n for n, item in enumerate(items)}
        self.span: dict[tuple[str, int, str], int] = {}
        self.tasks: dict[tuple[str, int, str, int], Any] = {}
        by_source: dict[tuple[str, int, str], list[Item]] = {}
        for item in items:
            by_source.setdefault((item.run, item.rank, item.layer), []).append(item)
        for source, source_items in by_source.items():
            self._add(source, source_items)

    def _add(self, source: tuple[str, int, str], items: list[Item]) -> None:
        src, per_task, how = self._source(source, self.plan.items[items[0]].layout)
        span = self.span[source] = per_task * src.chunk_rows
        groups: dict[int, dict[int, tuple[str, list[tuple[int, int, int]]]]] = {}
        for item in items:
            rows = self.plan.items[item]
            for a, b, s in _rows_of_samples(rows, 0, rows.samples):
                for g in range(a // span, (b - 1) // span + 1):
                    lo, hi = max(a, g * span), min(b, (g + 1) * span)
                    parts = groups.setdefault(g, {}).setdefault(self.item_ids[item], (item.method, []))[1]
                    if parts and parts[-1][1] == lo and parts[-1][2] + lo - parts[-1][0] == s + lo - a:
                        parts[-1] = (parts[-1][0], hi, parts[-1][2])  # consecutive calls: one slice
                    else:
                        parts.append((lo, hi, s + lo - a))
        for g, wanted in sorted(groups.items()):
            self.tasks[(*source, g)] = delayed(_read_task, pure=False)(
                src, g * per_task, (g + 1) * per_task, how, wanted
            )

    def _source(self, source: tuple[str, int, str], layout: str) -> tuple[RawSource, int, _Reshape]:
        run_name, rank, layer = source
        run = next(rp.run for rp in self.plan.runs if rp.name == run_name)
        part = next(p for p in run.ranks if p.rank == rank)
        options = self.plan.options
        interpolation = options.interpolation if layout == "conv" else None
        how = _Reshape(layout, interpolation, options.downsample if interpolation else None, options.device)
        src, row_bytes = raw_source(
            run.path, part, layer, layout, how.interpolation, how.downsample, how.device
        )
        return src, _power_of_two(options.task_bytes // max(1, src.chunk_rows * row_bytes)), how

    def covering(self, item: Item, s0: int, s1: int) -> tuple[int, list[Any]]:
        """The item's id and the read tasks that hold its samples ``[s0, s1)``."""
        source = (item.run, item.rank, item.layer)
        span = self.span[source]
        groups = sorted(
            {
                g
                for a, b, _ in _rows_of_samples(self.plan.items[item], s0, s1)
                for g in range(a // span, (b - 1) // span + 1)
            }
        )
        return self.item_ids[item], [self.tasks[(*source, g)] for g in groups]


# --------------------------------------------------------------------------- moment tasks


@dataclass(frozen=True)
class _Spec:
    """What the moment tasks of one comparison need to know."""

    keys: tuple[Compared, ...]
    widths: tuple[int, ...]
    needs: tuple[str, ...]
    minibatch_size: int
    rows_per_sample: int
    phase: str
    ranks: tuple[int, ...]


def _gather(
    outputs: list[dict[int, tuple[int, np.ndarray]]], item: int, s0: int, s1: int, per_sample: int
) -> np.ndarray:
    """The matrix rows of samples ``[s0, s1)`` of an item, from the read tasks' outputs."""
    parts = []
    for out in outputs:
        if item not in out:
            continue
        first, mat = out[item]
        lo, hi = max(s0, first), min(s1, first + len(mat) // per_sample)
        if hi > lo:
            parts.append((lo, mat[(lo - first) * per_sample : (hi - first) * per_sample]))
    parts.sort(key=lambda p: p[0])
    rows = parts[0][1] if len(parts) == 1 else np.concatenate([p for _, p in parts])
    if len(rows) != (s1 - s0) * per_sample:  # pragma: no cover - a planning error, never bad input
        raise RuntimeError(f"gathered {len(rows)} rows for samples [{s0}, {s1})")
    return rows


def _moment_task(
    spec: _Spec,
    leaves: list[tuple[int, int, int, int]],
    inputs: list[list[tuple[int, list[dict[int, tuple[int, np.ndarray]]]]]],
) -> dict[str, Accumulator]:
    """The accumulators of a group of leaves ``(rank position, first sample, stop sample, first row)``.

    ``inputs[leaf][key]`` is the item id and the read outputs holding that leaf's rows of the key.
    """
    widths = dict(zip(spec.keys, spec.widths, strict=True))
    parts: dict[str, list[Any]] = {need: [] for need in spec.needs}
    with one_blas_thread():
        for (pos, s0, s1, row0), per_key in zip(leaves, inputs, strict=True):
            chunk = [_gather(outputs, item, s0, s1, spec.rows_per_sample) for item, outputs in per_key]
            try:
                if "moments" in parts:
                    parts["moments"].append(JointMoments.from_chunk(widths, chunk))
                if "minibatch" in parts:
                    parts["minibatch"].append(
                        MinibatchHSIC.from_chunk(
                            widths, chunk, start=row0, minibatch_size=spec.minibatch_size
                        )
                    )
            except ValueError as exc:
                raise AnalysisError(
                    f"{spec.phase}, rank {spec.ranks[pos]}, samples {s0}-{s1 - 1}: {exc}; similarity needs finite "
                    "activations"
                ) from None
        return {need: merge_partials(p) for need, p in parts.items()}


def _merge_pair(a: dict[str, Accumulator], b: dict[str, Accumulator]) -> dict[str, Accumulator]:
    with one_blas_thread():
        return {need: a[need].merge(b[need]) for need in a}


def _comparison_graph(comparison: Comparison, needs: tuple[str, ...], reads: _Reads) -> Any:
    """A delayed giving ``{need: accumulator}`` of one comparison (see the module docstring)."""
    options = reads.plan.options
    per_leaf = leaf_samples(comparison)
    per_sample = comparison.rows_per_sample
    spec = _Spec(
        comparison.keys,
        comparison.widths,
        needs,
        options.minibatch_size,
        per_sample,
        comparison.phase,
        comparison.ranks,
    )
    leaves, offset = [], 0
    for pos, n in enumerate(comparison.samples):
        leaves += [
            (pos, s0, min(n, s0 + per_leaf), (offset + s0) * per_sample) for s0 in range(0, n, per_leaf)
        ]
        offset += n
    leaf_bytes = per_leaf * per_sample * comparison.total_width * 8
    per_task = _power_of_two(options.task_bytes // max(1, leaf_bytes))
    level = []
    for t in range(0, len(leaves), per_task):
        group = leaves[t : t + per_task]
        inputs = [
            [reads.covering(item, s0, s1) for item in comparison.items[pos]] for pos, s0, s1, _ in group
        ]
        level.append(delayed(_moment_task, pure=False)(spec, group, inputs))
    while len(level) > 1:  # the upper levels of merge_partials' tree
        merged = [
            delayed(_merge_pair, pure=False)(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)
        ]
        level = merged + ([level[-1]] if len(level) % 2 else [])
    return level[0]


# --------------------------------------------------------------------------- the cache


def _entry(acc: Accumulator) -> dict[str, np.ndarray]:
    if isinstance(acc, JointMoments):
        return dict(zip(("count", "mean", "m2", "norm_products", "norm_moments"), acc.state, strict=True))
    return {
        "start": np.asarray(acc.start),
        "stop": np.asarray(acc.stop),
        "head": acc.head,
        "tail": acc.tail,
        "sums": acc.sums,
        "batches": np.asarray(acc.batches),
        "minibatch_size": np.asarray(acc.minibatch_size),
    }


def _restore(
    need: str, comparison: Comparison, entry: dict[str, np.ndarray], minibatch_size: int
) -> Accumulator:
    widths = dict(zip(comparison.keys, comparison.widths, strict=True))
    acc = new_accumulator(need, widths, minibatch_size=minibatch_size)
    if isinstance(acc, JointMoments):
        acc.count = int(entry["count"])
        acc.mean, acc.m2 = entry["mean"], entry["m2"]
        acc.norm_products, acc.norm_moments = entry["norm_products"], entry["norm_moments"]
    else:
        acc.start, acc.stop, acc.batches = int(entry["start"]), int(entry["stop"]), int(entry["batches"])
        acc.head, acc.tail, acc.sums = entry["head"], entry["tail"], entry["sums"]
    return acc


def accumulate(plan: SimilarityPlan, cache: CovarianceCache, progress: bool) -> list[dict[str, Accumulator]]:
    """The accumulators of every comparison of ``plan`` (``{need: accumulator}`` in plan order).

    Served from ``cache`` when it holds them; the rest come from one pass over the stores (one
    ``dask.compute`` of the graph described in the module docstring), and are cached.
    """
    options = plan.options
    out: list[dict[str, Accumulator]] = []
    pending: list[tuple[int, tuple[str, ...]]] = []
    for n, comparison in enumerate(plan.comparisons):
        found: dict[str, Accumulator] = {}
        for need in plan.needs:
            entry = cache.get(comparison.cache_keys[need])
            if entry is not None:
                found[need] = _restore(need, comparison, entry, options.minibatch_size)
        out.append(found)
        missing = tuple(need for need in plan.needs if need not in found)
        if missing:
            pending.append((n, missing))
    if not pending:
        return out
    reads = _Reads(plan, [plan.comparisons[n] for n, _ in pending])
    graphs = [_comparison_graph(plan.comparisons[n], needs, reads) for n, needs in pending]
    # One torch and one BLAS thread for the whole computation (the tasks are the parallelism): held
    # here, the tasks' own limits (needed in worker processes) cost nothing in this process.
    with one_torch_thread(), one_blas_thread():
        computed = compute_with_progress(graphs, options.scheduler, progress, "similarity")
    for (n, _), accumulators in zip(pending, computed, strict=True):
        for need, acc in accumulators.items():
            out[n][need] = acc
            cache.put(plan.comparisons[n].cache_keys[need], _entry(acc))
    return out
