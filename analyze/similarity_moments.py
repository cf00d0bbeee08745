"""Streaming, mergeable accumulators for representational similarity of row-aligned layers.

Similarity measures compare the outputs of several *layers* (or of one layer at several epochs,
or of several runs) on the **same samples**: every layer contributes a matrix of shape
``(n, d_i)`` whose row ``k`` is sample ``k``. Two accumulators read those matrices chunk by
chunk (each chunk: the same rows of every layer) and keep only what the measures of
:mod:`analyze.similarity_measures` need, never the activations:

:class:`JointMoments` (measures ``cka``, ``cka_debiased``, ``svcca``, ``pwcca``)
    For the concatenated matrix ``Z = [X_1 ... X_N]`` of width ``D = d_1 + ... + d_N``, centred
    on its mean ``mu`` (``Z~ = Z - 1 mu^T``, ``X~_i`` its blocks):

    * ``count`` ``n`` and ``mean`` ``mu`` (``D``);
    * ``m2 = Z~^T Z~`` (``D x D``): every pair's centred cross product ``X~_i^T X~_j`` is a
      block of it, so one pass over the chunks serves all ``N x N`` pairs; memory is
      ``O(d_i d_j)`` per pair;
    * ``norm_products`` ``S`` (``N x N``): ``S_ij = sum_k a_ik a_jk`` with the per-sample squared
      norms ``a_ik = ||x~_ik||^2`` (row ``k`` of ``X~_i``), which the debiased estimator needs;
    * ``norm_moments`` ``R`` (``N x D``): block ``(i, j)`` is ``sum_k a_ik x~_jk``. It is zero
      for the final centring but not for a partial result centred on its own mean, and it is what
      moves ``S`` exactly from one centre to another when partial results merge.

:class:`MinibatchHSIC` (measure ``minibatch_cka``)
    The unbiased HSIC (Song et al. 2012) of the linear Gram matrices of every pair of layers on
    each minibatch of ``minibatch_size`` consecutive rows, summed over minibatches: an ``N x N``
    matrix, whatever the widths and ``n``. Minibatches are anchored at row 0 of the data (batch
    ``k`` is rows ``[k m, (k + 1) m)``), so a partial result for any row range knows which of
    its rows belong to a minibatch it does not complete.

Both are fed the same way and merge the same way:

* ``acc.update(chunk)`` appends a chunk (a mapping layer -> ``(rows, d_i)`` array, or a sequence
  in layer order) to a sequential accumulator;
* ``Acc.from_chunk(widths, chunk, ...)`` makes the partial result of one chunk (a dask task),
  ``a.merge(b)`` returns the merged result of two partials (``MinibatchHSIC`` needs ``b``'s rows
  to follow ``a``'s), and :func:`merge_partials` merges a list in a fixed balanced tree that only
  depends on the positions in the list: the same partials give bit-identical results whatever
  the scheduler.

Numerics
--------
Everything is float64 (float16 / float32 input is widened before any arithmetic). A chunk is
first shifted by its first row and then centred on its own mean, so an exactly constant feature
gives exactly zero centred values (and a constant layer exactly zero moments). Partial results
merge with Chan, Golub and LeVeque's pairwise update, generalised to ``S`` and ``R``: moving a
partial result of ``n_c`` rows from its centre ``m_c`` to the merged centre ``mu`` shifts every
row by ``delta = m_c - mu`` (``delta_i`` its block for layer ``i``, ``e_i = ||delta_i||^2``,
``T_i = trace(M_ii)``, ``M`` the partial's ``m2``), and since the partial's centred rows sum to
zero,

* ``M' = M + n_c delta delta^T`` (summed over both parts: Chan's ``(n_a n_b / n) D D^T``);
* ``R'_ij = R_ij + (T_i + n_c e_i) delta_j + 2 M_ji delta_i``;
* ``S'_ij = S_ij + 2 delta_j . R_ij + 2 delta_i . R_ji + 4 delta_i^T M_ij delta_j
  + T_i e_j + e_i T_j + n_c e_i e_j``.

The shifts are differences of means, of the order of the data's spread rather than of its
offset, so no term cancels catastrophically (a +1000 offset costs no accuracy).

Inputs with a NaN or an infinity are refused with a one-line ``ValueError`` naming the layer,
as are rows that do not match across layers.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "DEFAULT_MINIBATCH_SIZE",
    "MIN_MINIBATCH_ROWS",
    "JointMoments",
    "MinibatchHSIC",
    "check_minibatch_size",
    "merge_partials",
]

DEFAULT_MINIBATCH_SIZE = 256
"""Rows per minibatch of ``minibatch_cka`` (Nguyen, Raghu and Kornblith 2021)."""

MIN_MINIBATCH_ROWS = 4
"""The unbiased HSIC estimator needs at least 4 rows; a shorter last minibatch is dropped."""


# --------------------------------------------------------------------------- layers and chunks


class _Layers:
    """The layers' keys, widths and column offsets in the concatenated matrix."""

    def __init__(self, widths: Mapping[Hashable, int] | Sequence[int]) -> None:
        items = list(widths.items()) if isinstance(widths, Mapping) else list(enumerate(widths))
        if not items:
            raise ValueError("widths must name at least one layer")
        for key, width in items:
            if isinstance(width, bool) or not isinstance(width, int | np.integer) or width < 1:
                raise ValueError(f"layer {key!r}: width must be an integer >= 1, got {width!r}")
        self.keys: tuple[Hashable, ...] = tuple(k for k, _ in items)
        self.widths: tuple[int, ...] = tuple(int(w) for _, w in items)
        self.offsets = np.concatenate([[0], np.cumsum(self.widths)]).astype(np.intp)
        self.starts = self.offsets[:-1]
        self.index = {key: i for i, key in enumerate(self.keys)}

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Layers) and (self.keys, self.widths) == (other.keys, other.widths)

    def __hash__(self) -> int:  # pragma: no cover - not used as a dict key
        return hash((self.keys, self.widths))

    def stack(self, chunk: Mapping[Hashable, Any] | Sequence[Any]) -> np.ndarray:
        """Validate one chunk and return its layers side by side as a new float64 matrix."""
        if isinstance(chunk, Mapping):
            unknown = [k for k in chunk if k not in self.index]
            if unknown:
                raise ValueError(f"unknown layer {unknown[0]!r} in chunk; layers: {list(self.keys)}")
            missing = [k for k in self.keys if k not in chunk]
            if missing:
                raise ValueError(f"chunk has no rows for layer {missing[0]!r}")
            arrays = [np.asarray(chunk[k]) for k in self.keys]
        else:
            arrays = [np.asarray(a) for a in chunk]
            if len(arrays) != len(self.keys):
                raise ValueError(f"chunk has {len(arrays)} layers, expected {len(self.keys)}")
        n = None
        for key, width, a in zip(self.keys, self.widths, arrays, strict=True):
            if a.ndim != 2 or a.shape[1] != width:
                raise ValueError(f"layer {key!r}: rows must have shape (n, {width}), got {a.shape}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(
                    f"layer {key!r} has {a.shape[0]} rows but layer {self.keys[0]!r} has {n}: "
                    "similarity needs the same samples in every layer"
                )
            if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
                raise ValueError(f"layer {key!r}: activations must be real numbers, got dtype {a.dtype}")
        z = np.empty((n or 0, self.total), dtype=np.float64)
        for key, lo, hi, a in zip(self.keys, self.starts, self.offsets[1:], arrays, strict=True):
            z[:, lo:hi] = a
            if not np.isfinite(z[:, lo:hi]).all():
                raise ValueError(f"layer {key!r} has NaN or infinite activations")
        return z


class _LayerAccess:
    """Read access to the layers of an accumulator (its ``_layers``)."""

    _layers: _Layers

    @property
    def keys(self) -> tuple[Hashable, ...]:
        """The layers' keys, in order."""
        return self._layers.keys

    @property
    def widths(self) -> tuple[int, ...]:
        """The layers' widths, in order."""
        return self._layers.widths

    def index(self, key: Hashable) -> int:
        """Position of layer ``key``; ``KeyError`` naming it if unknown."""
        try:
            return self._layers.index[key]
        except KeyError:
            raise KeyError(f"unknown layer {key!r}; layers: {list(self.keys)}") from None


def _centre_in_place(z: np.ndarray) -> np.ndarray:
    """Centre ``z`` (n >= 1 rows) in place on its mean; return the mean.

    The first row is subtracted first: exactly constant columns become exactly zero.
    """
    shift = z[0].copy()
    z -= shift
    inner = z.mean(axis=0)
    z -= inner
    return shift + inner


# --------------------------------------------------------------------------- joint moments


def _chunk_moments(
    z: np.ndarray, layers: _Layers
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(n, mean, m2, S, R)`` of one chunk, centred on its own mean (``z`` is overwritten)."""
    n = z.shape[0]
    if n == 0:
        return _empty_moments(layers)
    mean = _centre_in_place(z)
    m2 = z.T @ z
    norms = np.add.reduceat(z * z, layers.starts, axis=1)  # (n, N): a_ik
    return n, mean, m2, norms.T @ norms, norms.T @ z


def _empty_moments(layers: _Layers) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d, k = layers.total, len(layers.keys)
    return 0, np.zeros(d), np.zeros((d, d)), np.zeros((k, k)), np.zeros((k, d))


def _shifted_norm_terms(
    n: int, m2: np.ndarray, s: np.ndarray, r: np.ndarray, delta: np.ndarray, layers: _Layers
) -> tuple[np.ndarray, np.ndarray]:
    """``S`` and ``R`` of a partial result once its rows are shifted by ``delta`` (its centre minus the new one)."""
    starts = layers.starts
    traces = np.add.reduceat(np.diagonal(m2), starts)  # T_i
    e = np.add.reduceat(delta * delta, starts)  # ||delta_i||^2
    md = np.empty((layers.total, len(layers.keys)))  # column i: M[:, block i] @ delta_i
    for i, (lo, hi) in enumerate(zip(starts, layers.offsets[1:], strict=True)):
        md[:, i] = m2[:, lo:hi] @ delta[lo:hi]
    quad = np.add.reduceat(delta[:, None] * md, starts, axis=0)  # delta_i^T M_ij delta_j (symmetric)
    lin = np.add.reduceat(r * delta[None, :], starts, axis=1)  # delta_j . R_ij
    s_new = (
        s
        + 2.0 * (lin + lin.T)
        + 4.0 * quad
        + (np.outer(traces, e) + np.outer(e, traces))
        + n * np.outer(e, e)
    )
    r_new = r + np.outer(traces + n * e, delta) + 2.0 * md.T
    return s_new, r_new


class JointMoments(_LayerAccess):
    """Joint float64 moments of several layers' outputs on the same samples (streaming, mergeable).

    Keeps the count, the mean, the joint centred second moment ``m2 = Z~^T Z~`` of the
    concatenated layers (every pair's ``X~_i^T X~_j`` is a block), and the per-sample squared-norm
    terms that the debiased CKA estimator needs (see the module docstring). Memory is
    ``8 (D^2 + N D + N^2 + D)`` bytes for ``N`` layers of total width ``D``; never the activations.

    Parameters
    ----------
    widths : mapping of layer key -> width, or sequence of widths
        The layers in order (any hashable keys; a sequence gives keys ``0 .. N-1``).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(100, 3)), rng.normal(size=(100, 2)) + 1000.0
    >>> acc = JointMoments({"x": 3, "y": 2})
    >>> for rows in np.array_split(np.arange(100), 7):
    ...     _ = acc.update({"x": x[rows], "y": y[rows]})
    >>> xc, yc = x - x.mean(0), y - y.mean(0)
    >>> bool(np.allclose(acc.block("x", "y"), xc.T @ yc, rtol=1e-12, atol=1e-9))
    True
    >>> a, b = np.sum(xc**2, axis=1), np.sum(yc**2, axis=1)
    >>> bool(np.isclose(acc.norm_products[0, 1], a @ b, rtol=1e-12))
    True
    """

    def __init__(self, widths: Mapping[Hashable, int] | Sequence[int]) -> None:
        self._layers = widths if isinstance(widths, _Layers) else _Layers(widths)
        self.reset()

    def reset(self) -> None:
        """Forget every sample."""
        self._set(_empty_moments(self._layers))

    def _set(self, state: tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
        self.count, self.mean, self.m2, self.norm_products, self.norm_moments = state

    @classmethod
    def from_chunk(
        cls, widths: Mapping[Hashable, int] | Sequence[int], chunk: Mapping[Hashable, Any] | Sequence[Any]
    ) -> JointMoments:
        """The partial result of one chunk (each layer's ``(rows, d_i)`` array, same rows)."""
        out = cls(widths)
        out._set(_chunk_moments(out._layers.stack(chunk), out._layers))
        return out

    def update(self, chunk: Mapping[Hashable, Any] | Sequence[Any]) -> JointMoments:
        """Add one chunk (in place); returns ``self``."""
        merged = self.merge(type(self).from_chunk(self._layers, chunk))
        self._set(merged.state)
        return self

    @property
    def state(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(count, mean, m2, norm_products, norm_moments)``."""
        return self.count, self.mean, self.m2, self.norm_products, self.norm_moments

    def merge(self, other: JointMoments) -> JointMoments:
        """A new result for the samples of ``self`` and ``other`` (Chan-style, cancellation safe).

        The order of the rows does not matter; the result only depends on the two operands, so a
        fixed merge tree gives bit-identical results.
        """
        if not isinstance(other, JointMoments) or other._layers != self._layers:
            raise ValueError("can only merge joint moments of the same layers and widths")
        out = type(self)(self._layers)
        if other.count == 0 or self.count == 0:
            n, *arrays = (other if self.count == 0 else self).state
            out._set((n, *(a.copy() for a in arrays)))
            return out
        na, nb = self.count, other.count
        n = na + nb
        diff = other.mean - self.mean
        mean = self.mean + diff * (nb / n)
        m2 = (self.m2 + other.m2) + np.outer(diff, diff) * (na * nb / n)
        sa, ra = _shifted_norm_terms(
            na, self.m2, self.norm_products, self.norm_moments, diff * (-nb / n), self._layers
        )
        sb, rb = _shifted_norm_terms(
            nb, other.m2, other.norm_products, other.norm_moments, diff * (na / n), self._layers
        )
        out._set((n, mean, m2, sa + sb, ra + rb))
        return out

    # -- read access --------------------------------------------------------------------------

    @property
    def offsets(self) -> np.ndarray:
        """Column offsets of the layers in ``m2`` and ``mean`` (length ``N + 1``)."""
        return self._layers.offsets

    def block(self, a: Hashable, b: Hashable) -> np.ndarray:
        """``X~_a^T X~_b`` (a view of ``m2``)."""
        i, j = self.index(a), self.index(b)
        off = self.offsets
        return self.m2[off[i] : off[i + 1], off[j] : off[j + 1]]

    def __repr__(self) -> str:
        return f"JointMoments(count={self.count}, widths={dict(zip(self.keys, self.widths, strict=True))})"


# --------------------------------------------------------------------------- minibatch HSIC


def check_minibatch_size(value: Any, argument: str = "minibatch_size") -> int:
    """Return ``value`` as an int if it is an integer >= :data:`MIN_MINIBATCH_ROWS`, else raise ``ValueError``.

    Integers and integer strings are accepted; booleans, fractions and other strings are not.

    Examples
    --------
    >>> check_minibatch_size("128")
    128
    >>> check_minibatch_size(3)
    Traceback (most recent call last):
    ...
    ValueError: invalid minibatch_size 3: must be an integer >= 4
    """
    message = f"invalid {argument} {value!r}: must be an integer >= {MIN_MINIBATCH_ROWS}"
    if isinstance(value, bool | np.bool_ | float | np.floating):
        raise ValueError(message)
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if size < MIN_MINIBATCH_ROWS:
        raise ValueError(message)
    return size


def _minibatch_hsic(z: np.ndarray, layers: _Layers) -> np.ndarray:
    """Unbiased HSIC (Song et al. 2012) of the linear Grams of every pair of layers on one minibatch.

    ``z`` holds the minibatch's rows (``b >= 4``) of all layers side by side; it is not modified.
    Each layer is centred on the minibatch mean first (the estimator is invariant to it; it keeps
    large offsets from cancelling), then ``K~`` is its Gram matrix with a zero diagonal and
    ``HSIC = [tr(K~ L~) + 1'K~1 1'L~1 / ((b-1)(b-2)) - 2/(b-2) 1'K~L~1] / (b (b-3))``.
    """
    b = z.shape[0]
    grams = np.empty((len(layers.keys), b, b))
    for i, (lo, hi) in enumerate(zip(layers.starts, layers.offsets[1:], strict=True)):
        x = z[:, lo:hi].copy()
        _centre_in_place(x)
        np.matmul(x, x.T, out=grams[i])
        np.fill_diagonal(grams[i], 0.0)
    flat = grams.reshape(len(layers.keys), b * b)
    totals = flat.sum(axis=1)  # 1'K~1
    row_sums = grams.sum(axis=2)  # K~1
    return (
        flat @ flat.T
        + np.outer(totals, totals) / ((b - 1) * (b - 2))
        - (2.0 / (b - 2)) * (row_sums @ row_sums.T)
    ) / (b * (b - 3))


class MinibatchHSIC(_LayerAccess):
    """Per-minibatch unbiased HSIC of every pair of layers, summed (streaming, mergeable by row range).

    Minibatch ``k`` is rows ``[k m, (k + 1) m)`` of the data (``m = minibatch_size``, rows in the
    order they are fed, counted from 0). A result covers one contiguous row range
    ``[start, stop)`` and holds

    * ``sums`` (``N x N``): the HSIC sums over the minibatches that lie inside the range, and
      ``batches`` their number;
    * ``head``: its rows before the first minibatch boundary (a minibatch begun before
      ``start``; empty when ``start`` is a boundary);
    * ``tail``: its rows after the last boundary (a minibatch that continues after ``stop``).

    When the range contains no boundary at all, every row is in ``head``. So a minibatch that
    straddles two chunks is completed when the chunks' results merge; memory is at most
    ``2 (m - 1)`` rows of the concatenated layers plus ``N^2`` floats, whatever ``n``.
    :meth:`hsic_sums` adds the incomplete minibatches at the ends (the last batch of the data)
    when they hold at least :data:`MIN_MINIBATCH_ROWS` rows; shorter ones are dropped.

    Parameters
    ----------
    widths : mapping of layer key -> width, or sequence of widths
    minibatch_size : int, default 256
        Rows per minibatch, ``>= 4``.
    start : int, default 0
        Index of the first row this result will hold.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> x = rng.normal(size=(50, 4))
    >>> parts = [MinibatchHSIC.from_chunk([4], [x[a:b]], start=a, minibatch_size=8)
    ...          for a, b in [(0, 13), (13, 30), (30, 50)]]
    >>> total = merge_partials(parts)
    >>> total.batches, total.tail.shape, total.hsic_sums()[1]
    (6, (2, 4), 6)
    >>> seq = MinibatchHSIC([4], minibatch_size=8)
    >>> for a, b in [(0, 5), (5, 50)]:
    ...     _ = seq.update([x[a:b]])
    >>> bool(np.allclose(seq.hsic_sums()[0], total.hsic_sums()[0], rtol=1e-12))
    True
    """

    def __init__(
        self,
        widths: Mapping[Hashable, int] | Sequence[int],
        minibatch_size: int = DEFAULT_MINIBATCH_SIZE,
        start: int = 0,
    ) -> None:
        self._layers = widths if isinstance(widths, _Layers) else _Layers(widths)
        self.minibatch_size = check_minibatch_size(minibatch_size)
        if isinstance(start, bool) or not isinstance(start, int | np.integer) or start < 0:
            raise ValueError(f"invalid start {start!r}: must be an integer >= 0")
        self._reset_at(int(start))

    def _reset_at(self, start: int) -> None:
        empty = np.zeros((0, self._layers.total))
        self.start = self.stop = start
        self.head, self.tail = empty, empty.copy()
        self.sums = np.zeros((len(self._layers.keys),) * 2)
        self.batches = 0

    def reset(self) -> None:
        """Forget every row; the next row fed is row 0 again."""
        self._reset_at(0)

    @property
    def spans_boundary(self) -> bool:
        """Whether ``[start, stop]`` reaches a minibatch boundary (else every row is in ``head``)."""
        return -(-self.start // self.minibatch_size) * self.minibatch_size <= self.stop

    @classmethod
    def from_chunk(
        cls,
        widths: Mapping[Hashable, int] | Sequence[int],
        chunk: Mapping[Hashable, Any] | Sequence[Any],
        start: int,
        minibatch_size: int = DEFAULT_MINIBATCH_SIZE,
    ) -> MinibatchHSIC:
        """The partial result of one chunk whose first row is row ``start`` of the data."""
        out = cls(widths, minibatch_size, start)
        z = out._layers.stack(chunk)
        m = out.minibatch_size
        out.stop = start + z.shape[0]
        first = -(-start // m) * m
        if first > out.stop:
            out.head = z
            return out
        last = (out.stop // m) * m
        out.head = z[: first - start].copy()
        for lo in range(first, last, m):
            out.sums = out.sums + _minibatch_hsic(z[lo - start : lo - start + m], out._layers)
            out.batches += 1
        out.tail = z[last - start :].copy()
        return out

    def update(self, chunk: Mapping[Hashable, Any] | Sequence[Any]) -> MinibatchHSIC:
        """Append one chunk (the rows that follow the ones fed so far), in place; returns ``self``."""
        merged = self.merge(type(self).from_chunk(self._layers, chunk, self.stop, self.minibatch_size))
        self.start, self.stop, self.head, self.tail = merged.start, merged.stop, merged.head, merged.tail
        self.sums, self.batches = merged.sums, merged.batches
        return self

    def merge(self, other: MinibatchHSIC) -> MinibatchHSIC:
        """A new result for ``self``'s rows followed by ``other``'s (``other.start == self.stop``).

        A minibatch split between the two is completed here. The result only depends on the two
        operands, so a fixed merge tree gives bit-identical results.
        """
        if not isinstance(other, MinibatchHSIC) or other._layers != self._layers:
            raise ValueError("can only merge minibatch HSIC results of the same layers and widths")
        if other.minibatch_size != self.minibatch_size:
            raise ValueError(f"minibatch_size differs: {self.minibatch_size} and {other.minibatch_size}")
        if other.start != self.stop:
            raise ValueError(
                f"rows must be consecutive: the first part ends at row {self.stop}, the second starts at {other.start}"
            )
        out = type(self)(self._layers, self.minibatch_size, self.start)
        out.stop = other.stop
        a_spans, b_spans = self.spans_boundary, other.spans_boundary
        if not a_spans:
            out.head = np.concatenate([self.head, other.head])
            out.sums, out.batches, out.tail = other.sums.copy(), other.batches, other.tail.copy()
        elif not b_spans:
            out.head, out.sums, out.batches = self.head.copy(), self.sums.copy(), self.batches
            out.tail = np.concatenate([self.tail, other.head])
        else:
            out.head, out.tail = self.head.copy(), other.tail.copy()
            middle = np.concatenate([self.tail, other.head])
            out.sums, out.batches = self.sums.copy(), self.batches + other.batches
            if middle.shape[0]:  # the minibatch split between the two: complete by construction
                out.sums = out.sums + _minibatch_hsic(middle, self._layers)
                out.batches += 1
            out.sums = out.sums + other.sums
        return out

    def hsic_sums(self) -> tuple[np.ndarray, int]:
        """The HSIC sums of every pair including the incomplete minibatches at the ends, and their number.

        An incomplete minibatch (the last batch of the data, or rows before the first boundary
        when ``start`` is not one) counts when it has at least :data:`MIN_MINIBATCH_ROWS` rows.
        """
        sums, batches = self.sums.copy(), self.batches
        edges = [self.head, self.tail] if self.spans_boundary else [self.head]
        for rows in edges:
            if rows.shape[0] >= MIN_MINIBATCH_ROWS:
                sums = sums + _minibatch_hsic(rows, self._layers)
                batches += 1
        return sums, batches

    def __repr__(self) -> str:
        return (
            f"MinibatchHSIC(rows=[{self.start}, {self.stop}), minibatch_size={self.minibatch_size}, "
            f"batches={self.batches}, widths={dict(zip(self.keys, self.widths, strict=True))})"
        )


# --------------------------------------------------------------------------- merge tree

_Partial = TypeVar("_Partial", JointMoments, MinibatchHSIC)


def merge_partials(parts: Sequence[_Partial]) -> _Partial:
    """Merge partial results pairwise in a fixed balanced tree: ``(p0 p1) (p2 p3) ...`` per level.

    The tree only depends on the positions in ``parts``, so the result is bit-for-bit the same
    for the same list, whichever scheduler computed the parts. Neighbours merge with neighbours,
    so consecutive :class:`MinibatchHSIC` row ranges stay consecutive.

    Examples
    --------
    >>> x = np.arange(24.0).reshape(8, 3) ** 1.5
    >>> parts = [JointMoments.from_chunk([1, 2], [x[i:i + 3, :1], x[i:i + 3, 1:]]) for i in (0, 3, 6)]
    >>> total = merge_partials(parts)
    >>> total.count, bool(np.allclose(total.m2, np.cov(x.T, bias=True) * 8))
    (8, True)
    """
    if not parts:
        raise ValueError("merge_partials needs at least one partial result")
    level = list(parts)
    while len(level) > 1:
        merged = [level[i].merge(level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            merged.append(level[-1])
        level = merged
    return level[0]
