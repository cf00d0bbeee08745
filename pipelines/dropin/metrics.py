"""delve's ``delve.metrics`` and ``TorchCovarianceMatrix``, on this package's moments and statistics.

The functions keep delve 0.1.50's names and signatures (a covariance matrix as a torch tensor
in, a number out) and add a ``semantics`` keyword: ``"default"`` (the documented intrinsic
dimensionality, the smallest ``k`` whose top-``k`` eigenvalues explain ``thresh`` of the
variance) or ``"delve-0.1.50"`` (delve's numbers: the count of cumulative fractions below
``thresh``, one less in general). Only ``idim`` and ``lsat`` depend on it. The arithmetic is
:func:`analyze.stats.spectrum_of` and :func:`analyze.stats.compute_stat` in float64.

:class:`TorchCovarianceMatrix` streams batches into :class:`capture.moments.Moments` (Chan's
pairwise update, float64) instead of delve's raw sums ``sum x^T x / n - mean mean^T``, which
cancel catastrophically when the mean is large against the spread; it adds :meth:`merge`.

Differences from delve 0.1.50
-----------------------------
- ``compute_intrinsic_dimensionality`` returns the documented value by default (delve's docstring
  promises "an integer value greater than zero"; delve returns 0 for a one-column covariance or an
  all-zero one, and one less than documented in general). ``semantics="delve-0.1.50"`` gives
  delve's number.
- A covariance with a NaN or infinite entry gives NaN for every function (delve returned
  arbitrary numbers); numbers are Python ``int`` / ``float`` (delve: numpy scalars for det, trc
  and dtrc).
- Inputs may be numpy arrays too; they are never modified (delve's ``compute_diag_trace`` clamps
  a tensor it creates, so it did not either).
- ``TorchCovarianceMatrix(device=None)`` computes on the device of the first batch (delve:
  ``'cuda:0'``, which fails on a machine without a GPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from analyze.stats import (
    DEFAULT_SEMANTICS,
    Spectrum,
    check_semantics,
    compute_stat,
    spectrum_needs,
    spectrum_of,
)
from capture.moments import Moments

__all__ = [
    "TorchCovarianceMatrix",
    "compute_cov_determinant",
    "compute_cov_trace",
    "compute_diag_trace",
    "compute_intrinsic_dimensionality",
    "compute_saturation",
]


def _spectrum(cov: Any, stat: str) -> Spectrum:
    """The spectrum of ``cov`` with what ``stat`` needs (the eigenvalues alone for all but ``det``)."""
    if isinstance(cov, torch.Tensor):
        cov = cov.detach().to("cpu", torch.float64).numpy()
    return spectrum_of(np.asarray(cov, dtype=np.float64), need=spectrum_needs([stat]))


def compute_intrinsic_dimensionality(
    cov: torch.Tensor, thresh: float = 0.99, *, semantics: str = DEFAULT_SEMANTICS
) -> int | float:
    """Intrinsic dimensionality of a covariance matrix at the explained-variance threshold ``thresh``.

    Parameters
    ----------
    cov : torch.Tensor or numpy.ndarray, shape (d, d)
        The covariance matrix (only its upper triangle is read for the eigenvalues).
    thresh : float, default 0.99
        Share of the variance to explain, in (0, 1].
    semantics : {"default", "delve-0.1.50"}
        ``"default"``: the smallest ``k`` whose ``k`` largest eigenvalues explain at least
        ``thresh`` of the variance. ``"delve-0.1.50"``: the number of cumulative fractions below
        ``thresh`` (delve's value).

    Returns
    -------
    int
        NaN (a float) when ``cov`` holds a NaN or an infinite value; 0 when the total variance is 0.

    Examples
    --------
    >>> cov = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    >>> compute_intrinsic_dimensionality(cov, thresh=0.7)
    2
    >>> compute_intrinsic_dimensionality(cov, thresh=0.7, semantics="delve-0.1.50")
    1
    """
    value = compute_stat("idim", _spectrum(cov, "idim"), thresh, check_semantics(semantics))
    return int(value) if np.isfinite(value) else value


def compute_saturation(
    cov: torch.Tensor, thresh: float = 0.99, *, semantics: str = DEFAULT_SEMANTICS
) -> float:
    """Layer saturation: intrinsic dimensionality divided by the width ``d`` of ``cov``.

    Parameters are those of :func:`compute_intrinsic_dimensionality`.

    Examples
    --------
    >>> cov = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    >>> compute_saturation(cov, thresh=0.7), compute_saturation(cov, 0.7, semantics="delve-0.1.50")
    (0.5, 0.25)
    """
    return float(compute_stat("lsat", _spectrum(cov, "lsat"), thresh, check_semantics(semantics)))


def compute_cov_determinant(cov: torch.Tensor, *, semantics: str = DEFAULT_SEMANTICS) -> float:
    """Determinant of the covariance matrix (the generalised variance), in float64.

    ``semantics`` is accepted for symmetry; the value is the same under both.

    Examples
    --------
    >>> round(compute_cov_determinant(torch.tensor([[2.0, 1.0], [1.0, 2.0]])), 12)
    3.0
    """
    check_semantics(semantics)
    return float(compute_stat("det", _spectrum(cov, "det")))


def compute_cov_trace(cov: torch.Tensor, *, semantics: str = DEFAULT_SEMANTICS) -> float:
    """Trace of the covariance matrix (the total variance).

    Examples
    --------
    >>> compute_cov_trace(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    4.0
    """
    check_semantics(semantics)
    return float(compute_stat("trc", _spectrum(cov, "trc")))


def compute_diag_trace(cov: torch.Tensor, *, semantics: str = DEFAULT_SEMANTICS) -> float:
    """Sum of the eigenvalues of the covariance matrix, negative ones (round-off) set to 0.

    Examples
    --------
    >>> round(compute_diag_trace(torch.tensor([[1.0, 2.0], [2.0, 1.0]])), 12)  # eigenvalues 3, -1
    3.0
    """
    check_semantics(semantics)
    return float(compute_stat("dtrc", _spectrum(cov, "dtrc")))


class TorchCovarianceMatrix:
    """Streaming covariance of a layer's features (delve's class, on :class:`capture.moments.Moments`).

    Parameters
    ----------
    bias : bool
        Accepted for compatibility; unused (as in delve).
    device : str or torch.device, optional
        Where the moments are kept and :meth:`fix` returns the covariance. Default: the device of
        the first batch.
    save_data : bool
        Keep every sample (float64) in :attr:`saved_samples`, as delve does for ``embed``.

    Examples
    --------
    >>> torch.manual_seed(0) is not None
    True
    >>> x = torch.randn(100, 3, dtype=torch.float64)
    >>> a, b = TorchCovarianceMatrix(), TorchCovarianceMatrix()
    >>> a.update(x[:30]); b.update(x[30:])
    >>> cov = a.merge(b).fix()
    >>> bool(torch.allclose(cov, torch.cov(x.T, correction=0)))
    True
    >>> a._tlen, a._input_dim
    (100, 3)
    """

    def __init__(
        self, bias: bool = False, device: str | torch.device | None = None, save_data: bool = False
    ) -> None:
        self.bias = bias
        self.device = None if device is None else torch.device(device)
        self.save_data = save_data
        self.saved_samples: torch.Tensor | None = None
        self.moments = Moments()

    # delve's attribute names, read-only views of the moments
    @property
    def _tlen(self) -> int:
        return self.moments.count

    @property
    def _input_dim(self) -> int | None:
        return self.moments.dim

    @property
    def _cov_mtx(self) -> torch.Tensor | None:
        """None before the first batch (delve's test for "not initialised"), else the centred second moment."""
        return self.moments.m2

    def reset(self) -> None:
        """Forget every batch."""
        self.moments.reset()
        self.saved_samples = None

    def update(self, x: torch.Tensor, vae: bool = False) -> None:
        """Add a batch ``x`` of shape ``(n, d)``.

        With ``vae=True`` the batch is first reshaped as delve does for its LSTM auto-encoder
        layers: a 3-D ``x`` is squeezed and transposed, a 2-D one transposed, a 1-D one made a column.
        """
        x = torch.as_tensor(x)
        if self.device is None:
            self.device = x.device
        x = x.detach().to(device=self.device, dtype=torch.float64)
        if vae:
            if x.dim() == 3:
                x = x.squeeze().t()
            elif x.dim() == 2:
                x = x.t()
            else:
                x = x.unsqueeze(0).t()
        if x.dim() == 1:
            x = x[None, :]
        self.moments.update(x)
        if self.save_data:
            self.saved_samples = x if self.saved_samples is None else torch.cat([self.saved_samples, x])

    def merge(self, other: TorchCovarianceMatrix) -> TorchCovarianceMatrix:
        """Merge another accumulator's batches into this one (in place); returns ``self``."""
        part = other.moments
        if part.mean is not None and self.device is not None:
            part = Moments(part.count, part.mean.to(self.device), part.m2.to(self.device))
        if self.device is None:
            self.device = other.device
        self.moments.merge(part)
        if self.save_data and other.saved_samples is not None:
            extra = other.saved_samples.to(self.device)
            self.saved_samples = (
                extra if self.saved_samples is None else torch.cat([self.saved_samples, extra])
            )
        return self

    def fix(self, center: bool = True) -> torch.Tensor:
        """The covariance matrix (``center=True``) or the second moment ``E[x x^T]``, float64.

        Raises
        ------
        ValueError
            Before the first batch (delve divided by zero).
        """
        if self.moments.mean is None or self.moments.count == 0:
            raise ValueError("TorchCovarianceMatrix.fix: no batch was added")
        n, mean, m2 = self.moments.as_tuple()
        cov = m2 / n
        if not center:
            cov = cov + torch.outer(mean, mean)
        return cov
