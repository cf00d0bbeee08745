"""Statistics of a layer's covariance matrix: saturation, intrinsic dimensionality and friends.

Every statistic is computed from a :class:`Spectrum`: the eigenvalues of the covariance
matrix ``C`` (float64, population covariance) and its trace, plus whatever else the
statistics asked for need (the leading eigenvectors, the determinant, ``C`` itself). ``C`` is decomposed once (:func:`spectrum_of`); that one spectrum then serves every
statistic it was built for and any number of thresholds, and it can be stored and rebuilt
without ``C`` (:meth:`Spectrum.to_dict` / :meth:`Spectrum.from_dict`), so a re-run with
another threshold needs neither the activations nor the covariance.

Statistics are looked up by name in :data:`REGISTRY` (error messages list its names); each
entry says which parts of a spectrum it needs (:attr:`StatSpec.needs`), and
:func:`spectrum_needs` turns a list of statistics into the ``need`` of :func:`spectrum_of`,
so that only that work is done: the eigenvalues alone come from ``eigvalsh`` (2.2-2.4x
faster than ``eigh`` with eigenvectors for ``d`` from 50 to 1024), the determinant (one LU,
``slogdet``, for ``det`` and ``logdet`` both) only when asked. Each part always comes from
the same routine, whatever else is asked, so a spectrum built for some statistics holds,
part by part, the same bits as one built for all of them.

Two semantics are offered for the thresholded statistics (``lsat`` and ``idim``); all the
other statistics are the same under both.

``"default"``
    What delve's documentation and the papers describe: with the eigenvalues
    ``l_1 >= ... >= l_d`` (negatives set to 0) and the cumulative fractions
    ``p_k = (l_1 + ... + l_k) / (l_1 + ... + l_d)``, ``idim`` is the smallest ``k`` with
    ``p_k >= t - IDIM_TOLERANCE`` (``IDIM_TOLERANCE = 1e-12``). The tolerance absorbs the
    round-off of ``p_k`` (a few ulps), so a fraction that equals the threshold in exact
    arithmetic counts as reaching it. With ``t = 1`` this gives the number of leading
    eigenvalues that explain all the variance except at most ``1e-12`` of it, a numerical
    rank that does not depend on round-off noise in the null space.
``"delve-0.1.50"``
    What delve 0.1.50 computes: ``idim`` is the number of ``i`` with ``p_i < t`` (strict),
    one less than the documented definition whenever no ``p_i`` lies in
    ``[t - IDIM_TOLERANCE, t)``. The fractions are computed with delve's operations in
    delve's order (``eigh`` on the upper triangle, sort descending, clamp negatives to 0,
    ``cumsum / sum``). The values are equal to delve's except where some ``p_i`` is within
    round-off (about ``d * 1e-16``) of ``t``: delve's eigenvalues come from torch's LAPACK
    (``syevd`` with eigenvectors), ours from ``eigvalsh`` (``syevd`` without them, the same
    upper triangle; the two agree to a few ulps of the largest eigenvalue) and delve's sums
    from torch's reduction order, which pure numpy does not reproduce bit for bit.
    In particular delve's ``idim`` at ``t = 1`` depends on round-off (whether the last
    fractions land just below 1.0) and can differ from run to run of delve itself on
    another machine; this module agrees with it within that uncertainty only.

In both semantics ``lsat = idim / d``, ``d`` being the width of ``C``.

Edge cases (both semantics unless said otherwise):

* total variance 0 (``C`` all zero, e.g. from a single sample, or no positive eigenvalue):
  ``idim = 0``, ``lsat = 0``, ``pr = 0``, ``erank = 0`` (no direction carries variance,
  consistently with ``idim``), ``trc`` and ``dtrc`` their values (0 for an all-zero ``C``),
  ``det = 0`` and ``logdet = -inf``. delve gives NaN fractions and ``idim = 0`` here.
* ``det(C) <= 0`` (a singular covariance; a slightly negative determinant is round-off):
  ``logdet = -inf``.
* ``C`` with a NaN or an infinite entry anywhere, or an eigensolver failure: every
  statistic is NaN, the spectrum and the eigenvectors all NaN. No exception is raised.
  (delve 0.1.50 returns arbitrary numbers here, e.g. ``idim = 0`` or a finite trace.)
* ``d = 1``: ``idim = 1`` under the default semantics when the variance is positive; delve
  gives 0 for every threshold (the only fraction is 1.0, never ``< t``).

No numpy warning escapes from this module. Scalar statistics are returned as Python
floats (``idim`` too, so that NaN is representable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ARRAY_STATS",
    "DEFAULT_SEMANTICS",
    "DELVE_SEMANTICS",
    "IDIM_TOLERANCE",
    "PART_FIELDS",
    "REGISTRY",
    "SAMPLE_STATS",
    "SCALAR_STATS",
    "SEMANTICS",
    "SPECTRUM_PARTS",
    "STATS",
    "THRESHOLDED_STATS",
    "Spectrum",
    "StatSpec",
    "StatValue",
    "check_semantics",
    "check_stats",
    "check_threshold",
    "check_thresholds",
    "compute_stat",
    "compute_stats",
    "delve_embed",
    "pca_embed",
    "spectrum_needs",
    "spectrum_of",
]

DEFAULT_SEMANTICS = "default"
DELVE_SEMANTICS = "delve-0.1.50"
SEMANTICS: tuple[str, ...] = (DEFAULT_SEMANTICS, DELVE_SEMANTICS)

IDIM_TOLERANCE = 1e-12
"""Absolute tolerance on the cumulative fraction in the default ``idim``."""

SPECTRUM_PARTS: tuple[str, ...] = ("vectors", "det", "cov")
"""What a spectrum may hold besides its eigenvalues and trace (which it always holds): the
leading eigenvectors, the determinant (with ``slogdet``) and the covariance matrix itself."""

#: The :meth:`Spectrum.to_dict` fields of each part (what a stored spectrum must hold for it).
PART_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"vectors": ("vectors",), "det": ("det", "logdet_sign", "logabsdet"), "cov": ("cov",)}
)


# --------------------------------------------------------------------------- spectrum


def _frozen_array(x: Any, ndim: int, name: str) -> np.ndarray:
    a = np.array(x, dtype=np.float64, copy=True)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {a.shape}")
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Eigenvalues and trace of one covariance matrix, and what else its statistics need.

    Build it with :func:`spectrum_of` from a covariance matrix, or directly from stored
    values (no covariance needed), e.g. with :meth:`from_dict`. The optional parts
    (:data:`SPECTRUM_PARTS`) are None when they were not computed; a statistic that needs a
    missing part raises ``ValueError``.

    Parameters
    ----------
    raw : array_like, shape (d,)
        Eigenvalues sorted in descending order, not clamped (round-off can make some
        slightly negative). All NaN for an invalid covariance.
    trace : float
        ``trace(C)``.
    det : float, optional
        ``det(C)`` (LU in float64, may under- or overflow to 0 or inf).
    logdet_sign, logabsdet : float, optional
        ``numpy.linalg.slogdet(C)``. The three come together (the part ``"det"``).
    vectors : array_like, shape (d, k), optional
        The eigenvectors of the ``k`` largest eigenvalues, in the order of ``raw``, each
        with its largest-magnitude entry positive (a deterministic sign).
    cov : array_like, shape (d, d), optional
        ``C`` itself, only when kept (statistic ``"cov"``).

    Examples
    --------
    >>> s = Spectrum(raw=[3.0, 1.0, -1e-17], trace=4.0, det=-3e-17, logdet_sign=-1.0,
    ...              logabsdet=math.log(3e-17))
    >>> s.width, s.eigenvalues
    (3, array([3., 1., 0.]))
    >>> compute_stat("logdet", s), compute_stat("idim", Spectrum.from_dict(s.to_dict()), 0.75)
    (-inf, 1.0)
    """

    raw: np.ndarray
    trace: float
    det: float | None = None
    logdet_sign: float | None = None
    logabsdet: float | None = None
    vectors: np.ndarray | None = None
    cov: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        raw = _frozen_array(self.raw, 1, "raw")
        if raw.size == 0:
            raise ValueError("a spectrum needs at least one eigenvalue, got none")
        if np.isfinite(raw).all() and np.any(raw[1:] > raw[:-1]):
            raise ValueError("raw eigenvalues must be sorted in descending order")
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "trace", float(self.trace))
        for name in ("det", "logdet_sign", "logabsdet"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        if len({getattr(self, name) is None for name in PART_FIELDS["det"]}) > 1:
            raise ValueError("det, logdet_sign and logabsdet come together: give all three or none")
        d = raw.size
        if self.vectors is not None:
            v = _frozen_array(self.vectors, 2, "vectors")
            if v.shape[0] != d or not 1 <= v.shape[1] <= d:
                raise ValueError(f"vectors must have shape ({d}, k) with 1 <= k <= {d}, got {v.shape}")
            object.__setattr__(self, "vectors", v)
        if self.cov is not None:
            c = _frozen_array(self.cov, 2, "cov")
            if c.shape != (d, d):
                raise ValueError(f"cov must have shape ({d}, {d}), got {c.shape}")
            object.__setattr__(self, "cov", c)

    @property
    def width(self) -> int:
        """The width ``d`` of the covariance matrix."""
        return int(self.raw.size)

    @property
    def parts(self) -> frozenset[str]:
        """The optional parts (:data:`SPECTRUM_PARTS`) this spectrum holds.

        Examples
        --------
        >>> sorted(spectrum_of(np.eye(2), need=["det"]).parts)
        ['det']
        """
        return frozenset(p for p in SPECTRUM_PARTS if getattr(self, PART_FIELDS[p][0]) is not None)

    @property
    def finite(self) -> bool:
        """False when the covariance had a NaN or an infinite entry (all stats NaN)."""
        return bool(np.isfinite(self.raw).all())

    @cached_property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues in descending order, negatives set to 0."""
        e = np.where(self.raw < 0, 0.0, self.raw)
        e.flags.writeable = False
        return e

    @cached_property
    def total(self) -> float:
        """Sum of the clamped eigenvalues (``dtrc``)."""
        return float(np.sum(self.eigenvalues))

    @cached_property
    def cumulative_fractions(self) -> np.ndarray:
        """``cumsum(eigenvalues) / sum(eigenvalues)``, delve's operations in delve's order.

        NaN when the total variance is not positive.
        """
        e = self.eigenvalues
        if not self.total > 0:
            p = np.full(e.shape, np.nan)
        else:
            p = np.cumsum(e) / np.sum(e)
        p.flags.writeable = False
        return p

    def to_dict(self) -> dict[str, np.ndarray | float]:
        """The stored form: arrays and floats; the optional parts only when present.

        Examples
        --------
        >>> sorted(spectrum_of(np.eye(2)).to_dict())
        ['det', 'logabsdet', 'logdet_sign', 'raw', 'trace', 'vectors']
        >>> sorted(spectrum_of(np.eye(2), need=()).to_dict())
        ['raw', 'trace']
        """
        out: dict[str, np.ndarray | float] = {"raw": self.raw, "trace": self.trace}
        for name in ("det", "logdet_sign", "logabsdet", "vectors", "cov"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Spectrum:
        """Rebuild a spectrum from :meth:`to_dict`'s output (0-d arrays are fine as scalars).

        Examples
        --------
        >>> s = Spectrum.from_dict({"raw": [2.0, 1.0], "trace": 3.0, "det": 2.0,
        ...                         "logdet_sign": 1.0, "logabsdet": math.log(2.0)})
        >>> compute_stat("idim", s, 0.6)
        1.0
        """
        known = {"raw", "trace", "det", "logdet_sign", "logabsdet", "vectors", "cov"}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown spectrum field(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**dict(values))


def _sign_fixed(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude entry (first one on ties) is positive."""
    idx = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def _det_of(sign: float, logabsdet: float) -> float:
    """``sign * exp(logabsdet)`` with the C library's ``exp``, as numpy's ``det`` computes it."""
    try:
        return sign * math.exp(logabsdet)
    except OverflowError:
        return sign * math.inf


def _check_need(need: Any) -> frozenset[str]:
    items = [need] if isinstance(need, str) else list(need)
    bad = [p for p in items if p not in SPECTRUM_PARTS]
    if bad:
        raise ValueError(f"need: unknown part(s) {bad}; valid: {', '.join(SPECTRUM_PARTS)}")
    return frozenset(items)


def spectrum_of(
    cov: Any, *, need: Iterable[str] | None = None, n_vectors: int = 2, keep_cov: bool = False
) -> Spectrum:
    """Decompose a covariance matrix once, for the statistics it is built for and any threshold.

    The eigenvalues come from ``numpy.linalg.eigvalsh(C, UPLO="U")`` (LAPACK ``syevd``
    without eigenvectors), whatever else is computed: only the upper triangle is read, as
    delve 0.1.50's ``torch.linalg.eigh(C, UPLO="U")`` does. The eigenvectors, when needed,
    come from ``numpy.linalg.eigh(C, UPLO="U")``; trace and determinant use the whole matrix:
    ``slogdet(C)`` (one LU), and ``det = sign * exp(logabsdet)`` from it, which is how numpy's
    ``det`` computes it (the same bits). So each part has the same bits whatever else was
    asked for.

    Parameters
    ----------
    cov : array_like, shape (d, d)
        The covariance matrix; converted to float64. ``d >= 1``.
    need : iterable of str, optional
        The optional parts to compute, from :data:`SPECTRUM_PARTS`: ``"vectors"`` (the
        ``n_vectors`` leading eigenvectors), ``"det"`` (determinant and ``slogdet``),
        ``"cov"`` (keep ``C``).
        :func:`spectrum_needs` gives them for a list of statistics; ``()`` computes the
        eigenvalues and the trace alone. Default (None): every part, the eigenvectors only if
        ``n_vectors > 0`` and ``C`` only with ``keep_cov``.
    n_vectors : int, default 2
        How many leading eigenvectors to keep (capped at ``d``; 0 keeps none).
    keep_cov : bool, default False
        Keep ``C`` in the spectrum (needed for the ``"cov"`` statistic), as ``"cov"`` in
        ``need`` does.

    Returns
    -------
    Spectrum
        All NaN (and no exception) when ``C`` holds a NaN or an infinity, or when the
        eigensolver fails: the eigenvalues, the trace and every part asked for.

    Raises
    ------
    ValueError
        If ``cov`` is not a non-empty square matrix, ``n_vectors`` is negative or ``need``
        names an unknown part.

    Examples
    --------
    >>> s = spectrum_of(np.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> s.eigenvalues, s.trace, round(s.det, 12)
    (array([3., 1.]), 4.0, 3.0)
    >>> np.round(s.vectors[:, 0], 6)
    array([0.707107, 0.707107])
    >>> lean = spectrum_of(np.array([[2.0, 1.0], [1.0, 2.0]]), need=spectrum_needs(["lsat"]))
    >>> lean.eigenvalues, lean.det, lean.vectors
    (array([3., 1.]), None, None)
    >>> spectrum_of(np.full((2, 2), np.nan)).finite
    False
    """
    a = np.array(cov, dtype=np.float64, copy=True)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"cov must be a non-empty square 2-D matrix, got shape {a.shape}")
    if isinstance(n_vectors, bool) or not isinstance(n_vectors, int | np.integer) or n_vectors < 0:
        raise ValueError(f"n_vectors must be an integer >= 0, got {n_vectors!r}")
    if need is None:
        parts = {"det"} | ({"vectors"} if n_vectors else set())
    else:
        parts = set(_check_need(need))
    if keep_cov:
        parts.add("cov")
    d = a.shape[0]
    k = min(int(n_vectors), d) if "vectors" in parts else 0
    kept = a if "cov" in parts else None

    w = v = None
    if np.isfinite(a).all():
        try:
            with np.errstate(all="ignore"):
                w = np.linalg.eigvalsh(a, UPLO="U")
                if k:
                    v = np.linalg.eigh(a, UPLO="U")[1]
        except np.linalg.LinAlgError:
            w = v = None
    if w is None or not np.isfinite(w).all() or (k and (v is None or not np.isfinite(v).all())):
        nan = math.nan
        return Spectrum(
            raw=np.full(d, nan),
            trace=nan,
            det=nan if "det" in parts else None,
            logdet_sign=nan if "det" in parts else None,
            logabsdet=nan if "det" in parts else None,
            vectors=np.full((d, k), nan) if k else None,
            cov=kept,
        )

    det = sign = logabsdet = None
    if "det" in parts:
        with np.errstate(all="ignore"):
            sign, logabsdet = (float(v) for v in np.linalg.slogdet(a))
        det = _det_of(sign, logabsdet)
    return Spectrum(
        raw=w[::-1],
        trace=float(np.trace(a)),
        det=det,
        logdet_sign=sign,
        logabsdet=logabsdet,
        vectors=_sign_fixed(v[:, ::-1][:, :k]) if k else None,
        cov=kept,
    )


# --------------------------------------------------------------------------- validation


def check_semantics(name: Any, argument: str = "semantics") -> str:
    """Return ``name`` if it is one of :data:`SEMANTICS`, else raise ``ValueError``.

    Examples
    --------
    >>> check_semantics("delve-0.1.50")
    'delve-0.1.50'
    >>> check_semantics("delve")
    Traceback (most recent call last):
    ...
    ValueError: invalid semantics 'delve'; valid: 'default', 'delve-0.1.50'
    """
    if not isinstance(name, str) or name not in SEMANTICS:
        raise ValueError(f"invalid {argument} {name!r}; valid: {', '.join(map(repr, SEMANTICS))}")
    return name


def check_threshold(t: Any, argument: str = "threshold") -> float:
    """Return ``t`` as a float if it lies in (0, 1], else raise ``ValueError``.

    Numbers and numeric strings are accepted; booleans, NaN and other strings are not.

    Examples
    --------
    >>> check_threshold("0.99")
    0.99
    >>> check_threshold(0)
    Traceback (most recent call last):
    ...
    ValueError: invalid threshold 0: must be a number in (0, 1]
    """
    message = f"invalid {argument} {t!r}: must be a number in (0, 1]"
    if isinstance(t, bool | np.bool_):
        raise ValueError(message)
    try:
        value = float(t)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(message)
    return value


def check_thresholds(ts: Any, argument: str = "thresholds") -> tuple[float, ...]:
    """Validate one threshold or several (no duplicates, at least one); return a tuple.

    Examples
    --------
    >>> check_thresholds([0.9, "0.99"])
    (0.9, 0.99)
    >>> check_thresholds(0.5)
    (0.5,)
    """
    items = [ts] if isinstance(ts, str | int | float | np.number) else list(ts)
    if not items:
        raise ValueError(f"{argument} must name at least one threshold in (0, 1]")
    values = tuple(check_threshold(t, argument) for t in items)
    if len(set(values)) != len(values):
        raise ValueError(f"{argument} has duplicates: {list(values)}")
    return values


def check_stats(names: str | Iterable[str], argument: str = "stats") -> tuple[str, ...]:
    """Validate statistic names against :data:`REGISTRY`; return them as a tuple.

    A single string is taken as one name. Empty lists and duplicates are rejected.

    Examples
    --------
    >>> check_stats(["lsat", "det"])
    ('lsat', 'det')
    >>> check_stats(["lsat", "sat"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: invalid stats value 'sat'; valid: lsat, idim, trc, ..., embed
    """
    items = [names] if isinstance(names, str) else list(names)
    if not items:
        raise ValueError(f"{argument} must name at least one statistic; valid: {', '.join(STATS)}")
    for name in items:
        if not isinstance(name, str) or name not in REGISTRY:
            raise ValueError(f"invalid {argument} value {name!r}; valid: {', '.join(STATS)}")
    if len(set(items)) != len(items):
        raise ValueError(f"{argument} has duplicates: {items}")
    return tuple(items)


# --------------------------------------------------------------------------- statistics


def _idim(s: Spectrum, t: float, semantics: str) -> float:
    if not s.finite:
        return math.nan
    if not s.total > 0:
        return 0.0
    p = s.cumulative_fractions
    if semantics == DELVE_SEMANTICS:
        return float(np.count_nonzero(p < t))
    # p is non-decreasing, so the smallest k with p_k >= t - tol is one more than the count below.
    return float(min(np.count_nonzero(p < t - IDIM_TOLERANCE) + 1, s.width))


def _lsat(s: Spectrum, t: float, semantics: str) -> float:
    return _idim(s, t, semantics) / s.width


def _trc(s: Spectrum, t: float | None, semantics: str) -> float:
    return s.trace if s.finite else math.nan


def _dtrc(s: Spectrum, t: float | None, semantics: str) -> float:
    return s.total if s.finite else math.nan


def _require(s: Spectrum, part: str, stat: str) -> None:
    if part not in s.parts:
        raise ValueError(
            f"statistic {stat!r} needs the spectrum part {part!r}, which was not computed: build the "
            f"spectrum with spectrum_of(cov, need=spectrum_needs([..., {stat!r}]))"
        )


def _det(s: Spectrum, t: float | None, semantics: str) -> float:
    _require(s, "det", "det")
    return s.det if s.finite else math.nan


def _logdet(s: Spectrum, t: float | None, semantics: str) -> float:
    _require(s, "det", "logdet")
    if not s.finite:
        return math.nan
    return s.logabsdet if s.logdet_sign > 0 else -math.inf


def _pr(s: Spectrum, t: float | None, semantics: str) -> float:
    if not s.finite:
        return math.nan
    if not s.total > 0:
        return 0.0
    q = s.eigenvalues / s.eigenvalues[0]  # scaled by the largest: no overflow in the squares
    return float(np.sum(q) ** 2 / np.sum(q * q))


def _erank(s: Spectrum, t: float | None, semantics: str) -> float:
    if not s.finite:
        return math.nan
    if not s.total > 0:
        return 0.0
    q = s.eigenvalues / s.total
    q = q[q > 0]
    return float(np.exp(-np.sum(q * np.log(q))))


def _spectrum(s: Spectrum, t: float | None, semantics: str) -> np.ndarray:
    return s.eigenvalues.copy()


def _cov(s: Spectrum, t: float | None, semantics: str) -> np.ndarray:
    _require(s, "cov", "cov")
    return s.cov.copy()


def _embed(s: Spectrum, t: float | None, semantics: str) -> np.ndarray:
    raise ValueError("statistic 'embed' needs the recorded samples: use delve_embed() or pca_embed()")


StatFunction = Callable[[Spectrum, Any, str], "float | np.ndarray"]


@dataclass(frozen=True)
class StatSpec:
    """One registered statistic.

    ``kind`` is ``"scalar"`` (a float), ``"array"`` (an array computed from the spectrum)
    or ``"samples"`` (needs the recorded samples, computed by :func:`delve_embed` or
    :func:`pca_embed`). ``thresholded`` statistics take a threshold. ``needs`` are the parts
    of a spectrum (:data:`SPECTRUM_PARTS`) it needs besides the eigenvalues and the trace;
    ``delve_needs``, when set, replaces them under the ``"delve-0.1.50"`` semantics.
    """

    name: str
    kind: str
    thresholded: bool
    description: str
    function: StatFunction
    needs: tuple[str, ...] = ()
    delve_needs: tuple[str, ...] | None = None

    def needs_under(self, semantics: str) -> tuple[str, ...]:
        """The spectrum parts this statistic needs under ``semantics``."""
        if semantics == DELVE_SEMANTICS and self.delve_needs is not None:
            return self.delve_needs
        return self.needs


_SPECS = (
    StatSpec("lsat", "scalar", True, "saturation: idim / width", _lsat),
    StatSpec("idim", "scalar", True, "intrinsic dimensionality at the threshold", _idim),
    StatSpec("trc", "scalar", False, "trace of C (total variance)", _trc),
    StatSpec("dtrc", "scalar", False, "sum of the eigenvalues, negatives set to 0", _dtrc),
    StatSpec("det", "scalar", False, "determinant of C (generalised variance)", _det, ("det",)),
    StatSpec("logdet", "scalar", False, "log det C from slogdet; -inf when det <= 0", _logdet, ("det",)),
    StatSpec("pr", "scalar", False, "participation ratio (sum l)^2 / sum l^2", _pr),
    StatSpec("erank", "scalar", False, "effective rank exp(entropy of l / sum l)", _erank),
    StatSpec("spectrum", "array", False, "eigenvalues, descending, negatives set to 0", _spectrum),
    StatSpec("cov", "array", False, "the covariance matrix C", _cov, ("cov",)),
    # default: the projection onto the two leading eigenvectors; delve's: C[0:2]^T C[0:2]
    StatSpec(
        "embed", "samples", False, "2-D embedding of the recorded samples", _embed, ("vectors",), ("cov",)
    ),
)

REGISTRY: Mapping[str, StatSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
"""Statistic name -> :class:`StatSpec`, in the canonical order."""

STATS: tuple[str, ...] = tuple(REGISTRY)
THRESHOLDED_STATS: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.thresholded)
SCALAR_STATS: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.kind == "scalar")
ARRAY_STATS: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.kind == "array")
SAMPLE_STATS: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.kind == "samples")


def spectrum_needs(stats: str | Iterable[str], semantics: str = DEFAULT_SEMANTICS) -> frozenset[str]:
    """The spectrum parts (:data:`SPECTRUM_PARTS`) that some statistics need: ``need`` of :func:`spectrum_of`.

    Duplicates are allowed (statistics of several phases may be joined).

    Examples
    --------
    >>> sorted(spectrum_needs(["lsat", "idim", "trc"]))
    []
    >>> sorted(spectrum_needs(["lsat", "det", "embed"])), sorted(spectrum_needs("embed", "delve-0.1.50"))
    (['det', 'vectors'], ['cov'])
    """
    items = [stats] if isinstance(stats, str) else list(stats)
    check_stats(list(dict.fromkeys(items)) or ["lsat"])
    semantics = check_semantics(semantics)
    return frozenset(part for name in items for part in REGISTRY[name].needs_under(semantics))


def compute_stat(
    name: str,
    spectrum: Spectrum,
    threshold: float | None = None,
    semantics: str = DEFAULT_SEMANTICS,
) -> float | np.ndarray:
    """Compute one statistic from a spectrum.

    Parameters
    ----------
    name : str
        A name from :data:`STATS` (not ``"embed"``, which needs the samples).
    spectrum : Spectrum
        From :func:`spectrum_of` or :meth:`Spectrum.from_dict`.
    threshold : float, optional
        Required by the thresholded statistics (``lsat``, ``idim``), in (0, 1]; must be
        None for the others.
    semantics : {"default", "delve-0.1.50"}
        Only changes ``lsat`` and ``idim`` (see the module docstring).

    Returns
    -------
    float or numpy.ndarray
        A Python float for scalar statistics, a new array for array statistics.

    Examples
    --------
    >>> s = spectrum_of(np.diag([4.0, 3.0, 2.0, 1.0]))  # fractions 0.4, 0.7, 0.9, 1.0
    >>> compute_stat("idim", s, 0.7)
    2.0
    >>> compute_stat("idim", s, 0.7, semantics="delve-0.1.50")
    1.0
    >>> compute_stat("lsat", s, 0.95)
    1.0
    >>> compute_stat("trc", s), round(compute_stat("det", s), 9), round(compute_stat("pr", s), 6)
    (10.0, 24.0, 3.333333)
    >>> compute_stat("idim", spectrum_of(np.zeros((3, 3))), 0.99)
    0.0
    """
    check_stats([name], argument="stat")
    semantics = check_semantics(semantics)
    spec = REGISTRY[name]
    if spec.thresholded:
        if threshold is None:
            raise ValueError(f"statistic {name!r} needs a threshold in (0, 1]")
        threshold = check_threshold(threshold)
    elif threshold is not None:
        raise ValueError(f"statistic {name!r} takes no threshold, got {threshold!r}")
    return spec.function(spectrum, threshold, semantics)


class StatValue(NamedTuple):
    """One computed value: the statistic, its threshold (None if it has none) and the value."""

    stat: str
    threshold: float | None
    value: float | np.ndarray


def compute_stats(
    spectrum: Spectrum,
    stats: str | Iterable[str],
    thresholds: Any = (0.99,),
    semantics: str = DEFAULT_SEMANTICS,
) -> list[StatValue]:
    """Compute several statistics from one spectrum, each thresholded one at every threshold.

    Values come in the order of ``stats``; a thresholded statistic gives one value per
    threshold, in the order of ``thresholds``.

    Examples
    --------
    >>> s = spectrum_of(np.diag([4.0, 3.0, 2.0, 1.0]))
    >>> for v in compute_stats(s, ["idim", "trc"], thresholds=[0.5, 0.99]):
    ...     print(v.stat, v.threshold, v.value)
    idim 0.5 2.0
    idim 0.99 4.0
    trc None 10.0
    """
    names = check_stats(stats)
    ts = check_thresholds(thresholds)
    semantics = check_semantics(semantics)
    out: list[StatValue] = []
    for name in names:
        if REGISTRY[name].thresholded:
            out.extend(StatValue(name, t, compute_stat(name, spectrum, t, semantics)) for t in ts)
        else:
            out.append(StatValue(name, None, compute_stat(name, spectrum, None, semantics)))
    return out


# --------------------------------------------------------------------------- embeddings


def _samples_2d(samples: Any, d: int) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"samples must have shape (n, {d}), got {x.shape}")
    return x


def delve_embed(cov: Any, samples: Any) -> np.ndarray:
    """delve 0.1.50's ``embed``: each sample ``x`` becomes ``((M x)[0], (M x)[1])``.

    ``M = C[0:2]^T C[0:2]`` (a d x d matrix); this is not a projection onto the leading
    eigenvectors. The samples are used as recorded (not centred). Only the first two rows
    of ``M`` are needed, ``M[0:2] = C[0:2, 0:2]^T C[0:2]``, so ``M`` is never formed.

    Parameters
    ----------
    cov : array_like, shape (d, d)
    samples : array_like, shape (n, d)

    Returns
    -------
    numpy.ndarray, shape (n, 2)
        For ``d = 1`` the second column is NaN (delve raises IndexError there).

    Examples
    --------
    >>> c = np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    >>> delve_embed(c, [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    array([[5., 4.],
           [0., 0.]])
    """
    c = np.asarray(cov, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] == 0:
        raise ValueError(f"cov must be a non-empty square 2-D matrix, got shape {c.shape}")
    d = c.shape[0]
    x = _samples_2d(samples, d)
    k = min(2, d)
    rows = c[:k, :k].T @ c[:k]  # M[0:k]
    out = np.full((x.shape[0], 2), np.nan)
    with np.errstate(all="ignore"):
        out[:, :k] = x @ rows.T
    return out


def pca_embed(samples: Any, vectors: Any, mean: Any = None) -> np.ndarray:
    """Project centred samples onto the two leading eigenvectors (the default ``embed``).

    Parameters
    ----------
    samples : array_like, shape (n, d)
    vectors : array_like, shape (d, k)
        Leading eigenvectors in order, e.g. :attr:`Spectrum.vectors`; the first two are used.
    mean : array_like, shape (d,), optional
        The centre; defaults to the mean of ``samples``. Pass the layer's mean over all
        recorded samples when ``samples`` is only a subset.

    Returns
    -------
    numpy.ndarray, shape (n, 2)
        The second column is NaN when only one eigenvector is given (``d = 1``).

    Examples
    --------
    >>> x = np.array([[1.0, 1.0], [3.0, 3.0], [2.0, 2.0]])
    >>> s = spectrum_of(np.cov(x.T, bias=True))
    >>> np.round(pca_embed(x, s.vectors), 6) + 0.0
    array([[-1.414214,  0.      ],
           [ 1.414214,  0.      ],
           [ 0.      ,  0.      ]])
    """
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] == 0:
        raise ValueError(f"vectors must have shape (d, k) with k >= 1, got {v.shape}")
    x = _samples_2d(samples, v.shape[0])
    if mean is None:
        mu = x.mean(axis=0) if x.shape[0] else np.zeros(v.shape[0])
    else:
        mu = np.asarray(mean, dtype=np.float64)
        if mu.shape != (v.shape[0],):
            raise ValueError(f"mean must have shape ({v.shape[0]},), got {mu.shape}")
    k = min(2, v.shape[1])
    out = np.full((x.shape[0], 2), np.nan)
    with np.errstate(all="ignore"):
        out[:, :k] = (x - mu) @ v[:, :k]
    return out
