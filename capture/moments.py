"""Partial moments of a 2-D sample matrix: count, mean and centred second moment.

The covariance of a layer is built from partial moments that are merged pairwise
(Chan, Golub and LeVeque's update), which is cancellation safe: every partial result
is centred on its own mean and the merge only adds a rank-one correction.

The kernels work on numpy arrays and on torch tensors alike (they only use
operators both libraries share), so the same arithmetic runs inside the capture
hook on the layer's device and inside the analysis on dask chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Moments",
    "batch_moments",
    "merge_moments",
    "tree_merge",
]


def _to_float64(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False)
    import torch

    return x.to(torch.float64)


def batch_moments(x: Any, feature_major: bool = False, *, overwrite: bool = False) -> tuple[int, Any, Any]:
    """Count, mean and centred second moment of one batch, in float64.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        The sample matrix, shape ``(n, d)``; or ``(d, n)`` with ``feature_major=True``
        (the faster layout for a channelwise convolution).
    feature_major : bool
        Whether features run along the first axis.
    overwrite : bool
        Centre ``x`` in place when it is already float64 (saves a copy of ``x``; for a buffer the
        caller owns). The numbers are the same.

    Returns
    -------
    count : int
        Number of samples ``n``.
    mean : array of shape (d,)
        Sample mean, float64.
    m2 : array of shape (d, d)
        ``sum_i (x_i - mean)(x_i - mean)^T``, float64.

    Examples
    --------
    >>> import numpy as np
    >>> n, mean, m2 = batch_moments(np.array([[1.0, 2.0], [3.0, 6.0]]))
    >>> n, mean.tolist(), m2.tolist()
    (2, [2.0, 4.0], [[2.0, 4.0], [4.0, 8.0]])
    """
    axis = 1 if feature_major else 0
    n = int(x.shape[axis])
    d = int(x.shape[1 - axis])
    if isinstance(x, np.ndarray) and n > 0:
        # One fused pass casts to float64 and centres; ``a @ a.T`` then runs as a SYRK.
        mean = x.mean(axis=axis, dtype=np.float64)
        if feature_major:
            centred = np.subtract(x, mean[:, None], dtype=np.float64)
            return n, mean, centred @ centred.T
        centred = np.subtract(x, mean[None, :], dtype=np.float64)
        return n, mean, centred.T @ centred
    x64 = _to_float64(x)
    if n == 0:
        return 0, _zeros_like(x64, (d,)), _zeros_like(x64, (d, d))
    in_place = overwrite and x64 is x
    if feature_major:
        mean = x64.sum(1) / n
        # A float64 buffer is needed anyway for the centring: x itself when the caller allows it.
        if in_place:
            x64 -= mean[:, None]
            centred = x64
        else:
            centred = x64 - mean[:, None]
        m2 = centred @ centred.T
    else:
        mean = x64.sum(0) / n
        if in_place:
            x64 -= mean[None, :]
            centred = x64
        else:
            centred = x64 - mean[None, :]
        m2 = centred.T @ centred
    return n, mean, m2


def _zeros_like(ref: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(ref, np.ndarray):
        return np.zeros(shape, dtype=np.float64)
    import torch

    return torch.zeros(shape, dtype=torch.float64, device=ref.device)


def merge_moments(
    a: tuple[int, Any, Any], b: tuple[int, Any, Any], *, inplace: bool = False
) -> tuple[int, Any, Any]:
    """Merge two partial moments ``(count, mean, m2)`` (Chan et al.'s pairwise update).

    With ``inplace=True`` the result's ``m2`` is ``a``'s ``m2`` array, updated in place (no
    temporary d x d arrays beyond one; for an accumulator that owns ``a``). The numbers are the same.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(12.0).reshape(6, 2) ** 1.5
    >>> n, mean, m2 = merge_moments(batch_moments(x[:2]), batch_moments(x[2:]))
    >>> bool(np.allclose(m2 / n, np.cov(x.T, bias=True)))
    True
    """
    na, ma, sa = a
    nb, mb, sb = b
    if na == 0:
        return nb, mb, sb
    if nb == 0:
        return na, ma, sa
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    if inplace:
        # Same operations in the same order as below: (sa + sb) + (outer * factor).
        sa += sb
        outer = delta[:, None] * delta[None, :]
        outer *= na * nb / n
        sa += outer
        return n, mean, sa
    m2 = sa + sb + (delta[:, None] * delta[None, :]) * (na * nb / n)
    return n, mean, m2


def tree_merge(parts: Sequence[tuple[int, Any, Any]]) -> tuple[int, Any, Any]:
    """Merge partial moments pairwise in a fixed, balanced tree order.

    The order only depends on the position of each part in ``parts``, so the
    result is bit-for-bit reproducible for a given list.
    """
    if not parts:
        raise ValueError("tree_merge needs at least one partial moment")
    level = list(parts)
    while len(level) > 1:
        nxt = [merge_moments(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@dataclass
class Moments:
    """Streaming moments of a sample matrix (a stateful shell around the kernels).

    Attributes
    ----------
    count : int
        Number of samples seen.
    mean : array of shape (d,) or None
        Running mean (float64), None before the first update.
    m2 : array of shape (d, d) or None
        Centred second moment (float64).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(100, 3))
    >>> acc = Moments()
    >>> for part in np.array_split(x, 7):
    ...     _ = acc.update(part)
    >>> bool(np.allclose(acc.covariance(), np.cov(x.T, bias=True)))
    True
    """

    count: int = 0
    mean: Any = None
    m2: Any = None

    def update(self, x: Any, feature_major: bool = False) -> Moments:
        """Add a batch ``x`` of shape ``(n, d)`` (or ``(d, n)`` when feature major)."""
        self.merge(Moments(*batch_moments(x, feature_major=feature_major)))
        return self

    def merge(self, other: Moments) -> Moments:
        """Merge another partial result into this one (in place)."""
        if other.mean is None:
            return self
        if self.mean is None:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            return self
        self.count, self.mean, self.m2 = merge_moments(self.as_tuple(), other.as_tuple())
        return self

    def as_tuple(self) -> tuple[int, Any, Any]:
        return self.count, self.mean, self.m2

    def reset(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    @property
    def dim(self) -> int | None:
        return None if self.mean is None else int(self.mean.shape[0])

    def covariance(self) -> np.ndarray:
        """Population covariance ``m2 / count`` as a float64 numpy array."""
        if self.mean is None or self.count == 0:
            raise ValueError("no samples were added to these moments")
        return to_numpy(self.m2) / self.count

    def to_numpy(self) -> Moments:
        """A copy whose arrays are numpy float64 arrays."""
        if self.mean is None:
            return Moments()
        return Moments(self.count, to_numpy(self.mean), to_numpy(self.m2))


def to_numpy(x: Any) -> np.ndarray:
    """A float64 numpy array from a numpy array or a torch tensor on any device."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False)
    return x.detach().to("cpu").numpy().astype(np.float64, copy=False)
