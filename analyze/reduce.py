"""Dask reduction of stored runs to per-(epoch, phase) moments, deterministically.

Raw activations
---------------
A layer's raw array is read in tasks of ``2**k`` consecutive store chunks (aligned),
by the store's chunk reader (:class:`capture.store.RawChunks`). The chunks are
grouped in *leaves* of ``2**j`` consecutive chunks (aligned; :func:`leaf_chunks`:
about ``LEAF_BYTES`` each, fixed by the chunk grid and the row size alone), and a
task holds whole leaves. For every leaf and every (epoch, phase) group with
selected rows in it, each reduction method's matrix is reduced chunk by chunk with
the capture hook's kernel (:func:`capture.moments.shifted_sums`: the cast fused
with the shift, one product per slab, no centring pass) into one pair of
accumulators, turned into float64 moments once per leaf (one leaf of one chunk
gives the bits of :func:`capture.moments.batch_moments`). Moments are merged over a
binary tree whose shape depends only on the leaf index (node ``[lo, hi)`` = merge
of its two halves, an empty half being the identity): tasks build the lower
levels, dask ``delayed`` merges build the upper ones. The result is therefore
bit-for-bit the same whatever the task size, the scheduler (synchronous, threads,
processes, distributed) or the number of workers.

Gram blocks
-----------
Blocks stored by the capture hook are merged in block order with
:func:`capture.moments.tree_merge`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dask import delayed

from capture.moments import (
    batch_moments,
    merge_moments,
    moments_of_sums,
    one_blas_thread,
    shifted_sums,
    tree_merge,
)
from capture.reshape import matrix_source
from capture.store import RawChunks

__all__ = [
    "Partial",
    "RawSource",
    "merge_partials",
    "raw_reduction_graph",
    "gram_partial",
    "chunk_reads",
    "ChunkReadError",
    "LEAF_BYTES",
    "leaf_chunks",
]

#: ``(count, mean, m2, nonfinite_rows)`` with numpy float64 arrays; ``None`` for "no rows".
Partial = tuple[int, np.ndarray, np.ndarray, int]

#: Counts the raw chunk ranges read (tests use it to prove that a cached re-run reads none).
chunk_reads: dict[str, int] = {"tasks": 0, "rows": 0}

#: Decoded bytes of the chunks reduced into one pair of accumulators before their moments are
#: taken (a leaf of the merge tree). One moment recovery and one merge per leaf, not per chunk: for
#: a 1024-wide layer in 16 MiB chunks they cost about a fifth of a chunk's product each
#: (bench/README.md).
LEAF_BYTES = 64 * 2**20


def leaf_chunks(chunk_rows: int, row_bytes: int, device: str = "cpu") -> int:
    """Store chunks per leaf: the largest power of two whose chunks hold at most ``LEAF_BYTES``
    (at least 1; 1 for a reduction on another device, whose kernel takes one chunk at a time).

    Examples
    --------
    >>> leaf_chunks(4096, 4096), leaf_chunks(1024, 4), leaf_chunks(10**6, 4096)
    (4, 16384, 1)
    """
    if device != "cpu":
        return 1
    per_leaf = max(1, LEAF_BYTES // max(1, chunk_rows * row_bytes))
    return 1 << (per_leaf.bit_length() - 1)


@dataclass(frozen=True)
class RawSource:
    """Where a (rank, layer) raw array lives and how its rows become matrices.

    Plain values only (the store's path or URL and its ``storage_options``, never an open store or
    a client), so that a task carries it to any worker, which opens the store itself.
    """

    store: str
    array_path: str
    stored_dtype: str
    layout: str
    chunk_rows: int
    rows: int
    interpolation: str | None = None
    downsample: int | None = None
    device: str = "cpu"
    label: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    #: The token-mask array aligned with the rows (format 1.2), applied to the matrices; None: none.
    mask_path: str | None = None

    def reader(self) -> RawChunks:
        return RawChunks(
            self.store, self.array_path, self.rows, self.chunk_rows, self.stored_dtype, self.storage_options
        )

    def masks(self, chunk_lo: int, chunk_hi: int) -> np.ndarray | None:
        """The token masks (bool) of the rows of store chunks ``[chunk_lo, chunk_hi)``; None without masks."""
        if self.mask_path is None:
            return None
        reader = dataclasses.replace(self.reader(), array_path=self.mask_path, stored_dtype="uint8")
        parts = [rows != 0 for _, _, rows in reader.chunks(chunk_lo, chunk_hi)]  # copies: buffers are reused
        return np.concatenate(parts) if parts else None


class ChunkReadError(RuntimeError):
    """A chunk range of a raw array could not be read or reduced."""


def merge_partials(a: Partial | None, b: Partial | None, *, inplace: bool = False) -> Partial | None:
    """Merge two partial results; ``None`` is the identity (exactly).

    ``inplace``: ``a``'s arrays may be updated (the caller made them and nobody else holds them).
    """
    if a is None:
        return b
    if b is None:
        return a
    n, mean, m2 = merge_moments(a[:3], b[:3], inplace=inplace)
    return n, mean, m2, a[3] + b[3]


def _merge_dicts(a: dict[Any, Partial], b: dict[Any, Partial], inplace: bool = False) -> dict[Any, Partial]:
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_partials(out.get(key), value, inplace=inplace)
    return out


def _tree_over_positions(leaves: dict[int, dict[Any, Partial]], lo: int, hi: int) -> dict[Any, Partial]:
    """Merge ``leaves`` (position -> partials, the caller's own) over the aligned binary tree on ``[lo, hi)``.

    The leaves' arrays are merged in place.
    """
    present = [p for p in leaves if lo <= p < hi]
    if not present:
        return {}
    if hi - lo == 1:
        return leaves[lo]
    mid = (lo + hi) // 2
    left = _tree_over_positions(leaves, lo, mid)
    right = _tree_over_positions(leaves, mid, hi)
    return _merge_dicts(left, right, inplace=True)


def _row_count(mat: Any, feature_major: bool) -> int:
    """The rows of a matrix in its kernel layout (``(n, d)``, or ``(d, ...)`` when feature major)."""
    return int(np.prod(mat.shape[1:])) if feature_major else int(mat.shape[0])


def _device_moments(x: np.ndarray, method: str, src: RawSource, mask: np.ndarray | None) -> Partial | None:
    """Float64 moments of the matrix of ``x`` (rows of one group in one chunk) on ``src.device``.

    The torch form of the kernel (:func:`capture.moments.batch_moments`), one chunk at a time.
    ``mask``: the rows' token masks. None when the matrix has no row (sequences without a token).
    """
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)).to(src.device)
    mat, feature_major = matrix_source(
        t, src.layout, method, interpolation=src.interpolation, downsample=src.downsample, mask=mask
    )
    if _row_count(mat, feature_major) == 0:
        return None
    n, mean, m2 = batch_moments(mat, feature_major)
    mean, m2 = mean.cpu().numpy(), m2.cpu().numpy()
    nonfinite = 0
    if not np.isfinite(mean).all():
        nonfinite = int((~np.isfinite(x.reshape(x.shape[0], -1))).any(axis=1).sum())
    return int(n), mean, m2, nonfinite


class _LeafSums:
    """The shifted sums of one (group, method) matrix over the chunks of one leaf."""

    __slots__ = ("count", "shift", "first", "second", "nonfinite")

    def __init__(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.first: np.ndarray | None = None
        self.second: np.ndarray | None = None
        self.nonfinite = 0

    def add(self, mat: np.ndarray, feature_major: bool, x: np.ndarray) -> None:
        """Add the matrix ``mat`` of the chunk rows ``x``; counts the rows of ``x`` with NaN / Inf."""
        d = int(mat.shape[0] if feature_major else mat.shape[1])
        if self.first is None:
            self.first = np.zeros((d + 1, d + 1), order="F")
            self.second = np.zeros((d + 1, d + 1), order="F")
        self.shift, _ = shifted_sums(mat, self.shift, self.first, feature_major, second=self.second)
        self.count += int(np.prod(mat.shape[1:]) if feature_major else mat.shape[0])
        # a NaN / Inf in these rows reaches the column sums (and stays there: later chunks look
        # at their own rows)
        if not (np.isfinite(self.first[d, :d]).all() and np.isfinite(self.second[d, :d]).all()):
            self.nonfinite += int((~np.isfinite(x.reshape(x.shape[0], -1))).any(axis=1).sum())

    def partial(self) -> Partial:
        assert self.first is not None and self.second is not None
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are counted in add()
            self.first += self.second
        n, mean, m2 = moments_of_sums(self.count, self.shift, self.first)
        return n, mean, m2, self.nonfinite


def _rows(data: np.ndarray, spans: list[tuple[int, int]], first: int) -> np.ndarray:
    """Rows ``[a, b)`` of each span of ``data`` (whose row 0 is row ``first``), one view if one span."""
    parts = [data[a - first : b - first] for a, b in spans]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _reduce_chunk_range(
    src: RawSource,
    chunk_lo: int,
    chunk_hi: int,
    groups: dict[Any, list[tuple[int, int]]],
    methods: tuple[str, ...],
    leaf: int = 1,
) -> dict[Any, Partial]:
    """Partials of every (group, method) over store chunks ``[chunk_lo, chunk_hi)`` (one task).

    ``leaf``: chunks per leaf of the merge tree (the task holds whole leaves; :func:`leaf_chunks`).
    """
    r = src.chunk_rows
    start, stop = chunk_lo * r, min(chunk_hi * r, src.rows)
    epochs = sorted({g[0] for g in groups if isinstance(g, tuple)})
    leaves: dict[int, dict[Any, Partial]] = {}
    sums: dict[int, dict[Any, _LeafSums]] = {}
    chunks = src.reader().chunks(chunk_lo, chunk_hi)
    with one_blas_thread():
        masks = None
        while True:
            try:
                if masks is None and src.mask_path is not None:
                    masks = src.masks(chunk_lo, chunk_hi)
                item = next(chunks, None)
            except Exception as exc:  # noqa: BLE001 - re-raised with its context
                raise ChunkReadError(
                    f"{src.label or src.store}: epoch(s) {epochs}: reading chunks "
                    f"{chunk_lo}-{min(chunk_hi, -(-src.rows // r)) - 1} "
                    f"(rows {start}-{stop - 1}) of {src.array_path} failed: {type(exc).__name__}: {exc}"
                ) from exc
            if item is None:
                break
            chunk, c0, data = item
            c1 = c0 + len(data)
            for group, ranges in groups.items():
                spans = [(max(a, c0), min(b, c1)) for a, b in ranges if a < c1 and b > c0]
                if not spans:
                    continue
                x = _rows(data, spans, c0)  # calls apart (a selection): concatenated
                mask = None if masks is None else _rows(masks, spans, start)
                for method in methods:
                    if src.device != "cpu":  # one chunk per leaf (leaf_chunks)
                        partial = _device_moments(x, method, src, mask)
                        if partial is not None:
                            leaves.setdefault(chunk, {})[(group, method)] = partial
                        continue
                    mat, feature_major = matrix_source(
                        x,
                        src.layout,
                        method,
                        interpolation=src.interpolation,
                        downsample=src.downsample,
                        mask=mask,
                    )
                    if _row_count(mat, feature_major) == 0:  # sequences without a token
                        continue
                    acc = sums.setdefault(chunk // leaf, {}).setdefault((group, method), _LeafSums())
                    acc.add(mat, feature_major, x)
        for position, accs in sums.items():
            leaves[position] = {key: acc.partial() for key, acc in accs.items()}
        chunk_reads["tasks"] += 1
        chunk_reads["rows"] += stop - start
        return _tree_over_positions(leaves, chunk_lo // leaf, -(-chunk_hi // leaf))


def _joined(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Row ranges with adjacent ones joined (calls one after the other: one view of a chunk, no copy)."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return out


def raw_reduction_graph(
    src: RawSource,
    groups: dict[Any, list[tuple[int, int]]],
    methods: Sequence[str],
    task_bytes: int = 16 * 2**20,
    row_bytes: int = 1,
) -> Any:
    """A dask ``delayed`` giving ``{(group, method): Partial}`` for one (rank, layer) raw array.

    Parameters
    ----------
    src : RawSource
        The array and its reshaping.
    groups : dict
        group key (e.g. ``(epoch, phase)``) -> selected row ranges ``(start, stop)``.
    methods : sequence of str
        Reduction methods for the layer's layout.
    task_bytes : int
        Decoded bytes per task (rounded to a power-of-two number of store chunks, at least
        one leaf). It does not change the result, only the parallelism.
    row_bytes : int
        Decoded bytes of one row (with the chunk rows, it sets the leaves: :func:`leaf_chunks`).
    """
    r = src.chunk_rows
    n_chunks = -(-src.rows // r) if src.rows else 0
    per_task = max(1, task_bytes // max(1, r * row_bytes))
    per_task = 1 << (per_task.bit_length() - 1)  # power of two: tasks align with the tree
    leaf = leaf_chunks(r, row_bytes, src.device)
    per_task = max(per_task, leaf)  # whole leaves (both powers of two)
    needed: set[int] = set()
    for ranges in groups.values():
        for a, b in ranges:
            if b > a:
                needed.update(range(a // r // per_task, (b - 1) // r // per_task + 1))
    size = 1
    while size < max(1, -(-n_chunks // per_task)):
        size *= 2
    methods = tuple(methods)
    groups = {g: _joined(rs) for g, rs in groups.items()}
    nodes: dict[int, Any] = {}
    for t in sorted(needed):
        lo = t * per_task
        hi = lo + per_task
        sub = {g: [(a, b) for a, b in rs if a < hi * r and b > lo * r] for g, rs in groups.items()}
        sub = {g: rs for g, rs in sub.items() if rs}
        nodes[t] = delayed(_reduce_chunk_range, pure=True)(src, lo, hi, sub, methods, leaf)
    # Upper levels of the same aligned tree, over task positions [0, size).
    while size > 1:
        merged: dict[int, Any] = {}
        for left in range(0, size, 2):
            a, b = nodes.get(left), nodes.get(left + 1)
            if a is not None and b is not None:
                merged[left // 2] = delayed(_merge_dicts, pure=True)(a, b)
            elif a is not None or b is not None:
                merged[left // 2] = a if a is not None else b
        nodes, size = merged, size // 2
    return nodes.get(0, delayed(dict)())


def gram_partial(
    read_block: Callable[[int], tuple[int, np.ndarray, np.ndarray]],
    blocks: Sequence[int],
    nonfinite_rows: int,
) -> Partial | None:
    """Merge stored gram blocks (indices in store order) into one partial."""
    if not len(blocks):
        return None
    n, mean, m2 = tree_merge([read_block(int(i)) for i in blocks])
    return n, mean, m2, nonfinite_rows
