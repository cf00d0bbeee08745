"""Representational similarity measures of layers on the same samples, from streamed moments.

Every measure compares two layers ``X`` (``n x p``) and ``Y`` (``n x q``) whose rows are the same
samples, and is computed from one of the accumulators of :mod:`analyze.similarity_moments`,
never from the activations. Measures are looked up by name in :data:`MEASURES` (error messages
list its names); each entry says which accumulator it needs and which options it reads.
``X~``, ``Y~`` are the matrices centred on their column means; ``n`` the number of samples.

``cka``: linear CKA (Kornblith, Norouzi, Lee and Hinton 2019)
    ``||X~^T Y~||_F^2 / (||X~^T X~||_F ||Y~^T Y~||_F)``, from the blocks of the joint ``m2``.
``cka_debiased``: linear CKA with the unbiased HSIC estimator (Song et al. 2012; Kornblith et al. 2019)
    ``HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` with ``K = X X^T``, ``L = Y Y^T`` and
    ``HSIC_1(K, L) = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``,
    ``K~``, ``L~`` the Grams with a zero diagonal. The estimator is invariant to a common
    translation of the rows, so it may be evaluated on ``X~``, ``Y~``; then ``K 1 = 0`` and with
    the per-sample squared norms ``a_k = ||x~_k||^2``, ``b_k = ||y~_k||^2``:
    ``tr(K~L~) = ||X~^T Y~||_F^2 - a.b``, ``1'K~1 = -sum(a) = -tr(X~^T X~)``, ``K~1 = -a``, so
    ``n(n-3) HSIC_1 = ||X~^T Y~||_F^2 - n/(n-2) a.b + tr(X~^T X~) tr(Y~^T Y~) / ((n-1)(n-2))``.
    ``a.b`` is :attr:`JointMoments.norm_products`, streamed exactly (see
    :mod:`analyze.similarity_moments`). Needs ``n >= 4``; it can be negative for unrelated layers.
``minibatch_cka``: minibatch CKA (Nguyen, Raghu and Kornblith 2021)
    ``sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) sum_b HSIC_1(L_b, L_b))`` over the
    minibatches ``b`` of ``minibatch_size`` consecutive rows (:class:`MinibatchHSIC`); memory does
    not grow with the widths or ``n``. A last batch of fewer than 4 rows is dropped.
``svcca``: SVCCA (Raghu, Gilmer, Yosinski and Sohl-Dickstein 2017)
    Each layer is reduced to its top principal directions that explain ``svcca_threshold``
    (default 0.99) of its variance: the smallest ``k`` whose eigenvalues of ``X~^T X~`` reach that
    share, the rule of ``idim`` in :mod:`analyze.stats` (variance, i.e. squared singular values
    of ``X~``). The value is the mean of the ``min(k_x, k_y)`` canonical correlations of the
    reduced layers (all of them, as the paper's SVCCA similarity; google/svcca's
    ``get_cca_similarity`` also reports a mean trimmed at 98% of the correlations' sum, not used
    here). Canonical correlations are the singular values of
    ``L_x^{-1/2} V_x^T X~^T Y~ V_y L_y^{-1/2}`` (``V``, ``L`` the kept eigenvectors and
    eigenvalues), capped at 1.
``pwcca``: projection-weighted CCA (Morcos, Raghu and Bengio 2018)
    CCA of the two layers on their whole numerical range (no SVD truncation, as google/svcca's
    ``compute_pwcca``), the correlations ``rho_i`` weighted by how much of the layer the canonical
    variate ``h_i`` accounts for: ``alpha_i = sum_j |<h_i, x~_j>|`` over the layer's centred
    neurons ``x~_j``, ``pwcca = sum_i alpha_i rho_i / sum_i alpha_i``. The weights come from the
    layer with fewer canonical directions (numerical rank), ``X`` on a tie, as google/svcca
    picks the layer with fewer neurons and ``X`` on a tie: ``pwcca`` is not symmetric. With unit
    variates ``h_i = X~ V L^{-1/2} u_i``, ``<h_i, x~_j> = (V L^{1/2} u_i)_j``: moments suffice.
    Choices that differ from google/svcca, documented: neurons and variates are centred (its
    code adds the means back and orthonormalises the un-whitened variates by QR, which makes the
    weights depend on the layers' offsets); no ``epsilon`` regularisation: directions whose
    variance is at most :data:`CCA_RANK_TOLERANCE` times the layer's largest are left out (a
    pseudo-inverse, as its ``epsilon = 0`` default), which also applies to ``svcca``. Working
    from the covariance blocks squares the layers' condition numbers: the correlation of a
    direction that holds a share ``r`` of its layer's largest variance is accurate to about
    ``1e-16 / r`` (so to about 1e-6 at the tolerance).

Degenerate cases give :data:`DEGENERATE_VALUE` (0.0), never NaN and never a warning: a layer that is
exactly constant on the samples (so also ``n = 1``), ``n < 4`` for ``cka_debiased``, no minibatch of
at least 4 rows for ``minibatch_cka``, or a self-HSIC estimate that is not positive. Values are
clipped to ``[-1, 1]`` (round-off can push a layer against itself a few ulps past 1).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from analyze.similarity_moments import (
    DEFAULT_MINIBATCH_SIZE,
    JointMoments,
    MinibatchHSIC,
    check_minibatch_size,
)
from analyze.stats import check_threshold, compute_stat, spectrum_of

__all__ = [
    "CCA_RANK_TOLERANCE",
    "DEFAULT_SVCCA_THRESHOLD",
    "DEGENERATE_VALUE",
    "MEASURES",
    "MEASURE_NAMES",
    "NEEDS",
    "PARAMETERS",
    "MeasureSpec",
    "ParameterSpec",
    "check_measure_options",
    "check_measures",
    "cka",
    "cka_debiased",
    "minibatch_cka",
    "needs_of",
    "new_accumulator",
    "pwcca",
    "similarity_matrix",
    "svcca",
]

DEGENERATE_VALUE = 0.0
"""The value of a measure that is undefined on the data (see the module docstring)."""

DEFAULT_SVCCA_THRESHOLD = 0.99

CCA_RANK_TOLERANCE = 1e-10
"""CCA ignores directions whose variance is at most this share of the layer's largest one."""

Source = JointMoments | MinibatchHSIC
MatrixFunction = Callable[[Any, Sequence[int], Sequence[int], Mapping[str, Any]], np.ndarray]


# --------------------------------------------------------------------------- normalised HSIC


def _block_squared_norms(m: JointMoments) -> np.ndarray:
    """``||X~_i^T X~_j||_F^2`` for every pair of layers (``N x N``)."""
    off = m.offsets
    out = np.empty((len(m.keys), len(m.keys)))
    for i in range(len(m.keys)):
        rows = m.m2[off[i] : off[i + 1]]
        out[i] = np.add.reduceat(np.einsum("ij,ij->j", rows, rows), off[:-1])
    return out


def _normalised(num: np.ndarray, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
    """``num_ij / sqrt(num_ii num_jj)`` clipped to [-1, 1]; the degenerate value where a diagonal is <= 0."""
    diag = np.diagonal(num)
    good = diag > 0
    scale = np.sqrt(np.where(good, diag, 1.0))
    r, c = np.asarray(rows, dtype=np.intp), np.asarray(cols, dtype=np.intp)
    value = num[np.ix_(r, c)] / scale[r][:, None] / scale[c][None, :]
    ok = good[r][:, None] & good[c][None, :]
    return np.where(ok, np.clip(value, -1.0, 1.0), DEGENERATE_VALUE)


def _cka_matrix(
    m: JointMoments, rows: Sequence[int], cols: Sequence[int], options: Mapping[str, Any]
) -> np.ndarray:
    return _normalised(_block_squared_norms(m), rows, cols)


def _cka_debiased_matrix(
    m: JointMoments, rows: Sequence[int], cols: Sequence[int], options: Mapping[str, Any]
) -> np.ndarray:
    n = m.count
    if n < 4:
        return np.full((len(rows), len(cols)), DEGENERATE_VALUE)
    traces = np.add.reduceat(np.diagonal(m.m2), m.offsets[:-1])
    num = (
        _block_squared_norms(m)
        - (n / (n - 2)) * m.norm_products
        + np.outer(traces, traces) / ((n - 1) * (n - 2))
    )
    return _normalised(num, rows, cols)


def _minibatch_cka_matrix(
    h: MinibatchHSIC, rows: Sequence[int], cols: Sequence[int], options: Mapping[str, Any]
) -> np.ndarray:
    sums, batches = h.hsic_sums()
    if batches == 0:
        return np.full((len(rows), len(cols)), DEGENERATE_VALUE)
    return _normalised(sums, rows, cols)


# --------------------------------------------------------------------------- CCA family


@dataclass(frozen=True)
class _Axes:
    """A layer's kept principal directions (columns of ``vectors``) and their variances ``values`` (of m2)."""

    vectors: np.ndarray
    values: np.ndarray


def _principal_axes(m: JointMoments, i: int, threshold: float | None) -> _Axes:
    """Directions above the rank tolerance; with a threshold, only the top ones explaining it."""
    lo, hi = m.offsets[i], m.offsets[i + 1]
    spectrum = spectrum_of(m.m2[lo:hi, lo:hi], n_vectors=hi - lo)
    raw = spectrum.raw
    rank = int(np.count_nonzero(raw > CCA_RANK_TOLERANCE * raw[0])) if raw[0] > 0 else 0
    k = rank if threshold is None else min(rank, int(compute_stat("idim", spectrum, threshold)))
    return _Axes(spectrum.vectors[:, :k], raw[:k])


def _whitened_cross(m: JointMoments, i: int, j: int, ax: _Axes, ay: _Axes) -> np.ndarray:
    """``L_x^{-1/2} V_x^T X~^T Y~ V_y L_y^{-1/2}``: its singular values are the canonical correlations."""
    off = m.offsets
    cross = ax.vectors.T @ m.m2[off[i] : off[i + 1], off[j] : off[j + 1]] @ ay.vectors
    return cross / np.sqrt(ax.values)[:, None] / np.sqrt(ay.values)[None, :]


def _svcca(m: JointMoments, i: int, j: int, ax: _Axes, ay: _Axes) -> float:
    if ax.values.size == 0 or ay.values.size == 0:
        return DEGENERATE_VALUE
    rho = np.linalg.svd(_whitened_cross(m, i, j, ax, ay), compute_uv=False)
    return float(np.mean(np.minimum(rho, 1.0)))


def _pwcca(m: JointMoments, i: int, j: int, ax: _Axes, ay: _Axes) -> float:
    if ax.values.size == 0 or ay.values.size == 0:
        return DEGENERATE_VALUE
    u, rho, vt = np.linalg.svd(_whitened_cross(m, i, j, ax, ay), full_matrices=False)
    rho = np.minimum(rho, 1.0)
    side, directions = (ax, u) if ax.values.size <= ay.values.size else (ay, vt.T)
    # <h_i, x~_j> = (V L^{1/2} u_i)_j for the unit canonical variate h_i = X~ V L^{-1/2} u_i
    weights = np.abs((side.vectors * np.sqrt(side.values)[None, :]) @ directions).sum(axis=0)
    return float(np.sum(weights * rho) / np.sum(weights))


def _pairwise(
    pair: Callable[[JointMoments, int, int, _Axes, _Axes], float],
    symmetric: bool,
    threshold_option: str | None,
) -> MatrixFunction:
    """A matrix function that decomposes each layer once and evaluates ``pair`` on every pair."""

    def matrix(
        m: JointMoments, rows: Sequence[int], cols: Sequence[int], options: Mapping[str, Any]
    ) -> np.ndarray:
        threshold = None if threshold_option is None else options[threshold_option]
        axes = {i: _principal_axes(m, i, threshold) for i in dict.fromkeys([*rows, *cols])}
        done: dict[tuple[int, int], float] = {}
        out = np.empty((len(rows), len(cols)))
        for a, i in enumerate(rows):
            for b, j in enumerate(cols):
                if symmetric and (j, i) in done:
                    out[a, b] = done[(i, j)] = done[(j, i)]
                else:
                    out[a, b] = done[(i, j)] = pair(m, i, j, axes[i], axes[j])
        return out

    return matrix


# --------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class ParameterSpec:
    """One option of the similarity measures: its default, its validator and what it means.

    ``check(value, argument)`` returns the validated value or raises a one-line ``ValueError``
    naming ``argument``.
    """

    name: str
    default: Any
    check: Callable[[Any, str], Any]
    description: str


PARAMETERS: Mapping[str, ParameterSpec] = MappingProxyType(
    {
        "svcca_threshold": ParameterSpec(
            "svcca_threshold",
            DEFAULT_SVCCA_THRESHOLD,
            check_threshold,
            "share of each layer's variance that its directions kept by svcca explain, in (0, 1]",
        ),
        "minibatch_size": ParameterSpec(
            "minibatch_size",
            DEFAULT_MINIBATCH_SIZE,
            check_minibatch_size,
            "consecutive rows per minibatch of minibatch_cka, >= 4",
        ),
    }
)
"""Option name -> :class:`ParameterSpec`."""

NEEDS: Mapping[str, type] = MappingProxyType({"moments": JointMoments, "minibatch": MinibatchHSIC})
"""What a measure is computed from -> the accumulator class that provides it."""


@dataclass(frozen=True)
class MeasureSpec:
    """One registered similarity measure.

    ``needs`` names the accumulator in :data:`NEEDS`; ``parameters`` the options of
    :data:`PARAMETERS` it reads (an accumulator option such as ``minibatch_size`` included);
    ``symmetric`` whether ``value(a, b) == value(b, a)``; ``function(source, rows, cols, options)``
    returns the ``len(rows) x len(cols)`` matrix of values for layer positions ``rows``, ``cols``.
    """

    name: str
    needs: str
    parameters: tuple[str, ...]
    symmetric: bool
    description: str
    reference: str
    function: MatrixFunction


_SPECS = (
    MeasureSpec("cka", "moments", (), True, "linear CKA", "Kornblith et al. 2019", _cka_matrix),
    MeasureSpec(
        "cka_debiased",
        "moments",
        (),
        True,
        "linear CKA with the unbiased HSIC estimator (can be negative)",
        "Song et al. 2012; Kornblith et al. 2019",
        _cka_debiased_matrix,
    ),
    MeasureSpec(
        "minibatch_cka",
        "minibatch",
        ("minibatch_size",),
        True,
        "linear CKA from unbiased HSIC summed over minibatches",
        "Nguyen, Raghu and Kornblith 2021",
        _minibatch_cka_matrix,
    ),
    MeasureSpec(
        "svcca",
        "moments",
        ("svcca_threshold",),
        True,
        "mean canonical correlation of the top principal directions",
        "Raghu et al. 2017",
        _pairwise(_svcca, True, "svcca_threshold"),
    ),
    MeasureSpec(
        "pwcca",
        "moments",
        (),
        False,
        "projection-weighted mean canonical correlation",
        "Morcos, Raghu and Bengio 2018",
        _pairwise(_pwcca, False, None),
    ),
)

MEASURES: Mapping[str, MeasureSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
"""Measure name -> :class:`MeasureSpec`, in the canonical order."""

MEASURE_NAMES: tuple[str, ...] = tuple(MEASURES)


# --------------------------------------------------------------------------- validation


def check_measures(names: str | Iterable[str], argument: str = "measure") -> tuple[str, ...]:
    """Validate measure names against :data:`MEASURES`; return them as a tuple.

    A single string is one name. Empty lists and duplicates are rejected.

    Examples
    --------
    >>> check_measures(["cka", "svcca"])
    ('cka', 'svcca')
    >>> check_measures("cca")
    Traceback (most recent call last):
    ...
    ValueError: invalid measure 'cca'; valid: cka, cka_debiased, minibatch_cka, svcca, pwcca
    """
    items = [names] if isinstance(names, str) else list(names)
    valid = ", ".join(MEASURE_NAMES)
    if not items:
        raise ValueError(f"{argument} must name at least one measure; valid: {valid}")
    for name in items:
        if not isinstance(name, str) or name not in MEASURES:
            raise ValueError(f"invalid {argument} {name!r}; valid: {valid}")
    if len(set(items)) != len(items):
        raise ValueError(f"{argument} has duplicates: {items}")
    return tuple(items)


def check_measure_options(**options: Any) -> dict[str, Any]:
    """Validate similarity options; return every option of :data:`PARAMETERS`, defaults filled in.

    Examples
    --------
    >>> check_measure_options(svcca_threshold="0.95")
    {'svcca_threshold': 0.95, 'minibatch_size': 256}
    >>> check_measure_options(svcca_threshold=0)
    Traceback (most recent call last):
    ...
    ValueError: invalid svcca_threshold 0: must be a number in (0, 1]
    >>> check_measure_options(batch=3)
    Traceback (most recent call last):
    ...
    ValueError: unknown similarity option 'batch'; valid: svcca_threshold, minibatch_size
    """
    for name in options:
        if name not in PARAMETERS:
            raise ValueError(f"unknown similarity option {name!r}; valid: {', '.join(PARAMETERS)}")
    return {
        name: spec.check(options[name], name) if name in options else spec.default
        for name, spec in PARAMETERS.items()
    }


def needs_of(measures: str | Iterable[str]) -> tuple[str, ...]:
    """The accumulators (keys of :data:`NEEDS`) that ``measures`` need, each once, in order.

    Examples
    --------
    >>> needs_of(["svcca", "minibatch_cka", "cka"])
    ('moments', 'minibatch')
    """
    return tuple(dict.fromkeys(MEASURES[name].needs for name in check_measures(measures)))


def new_accumulator(need: str, widths: Mapping[Hashable, int] | Sequence[int], **options: Any) -> Source:
    """An empty accumulator of kind ``need`` (``"moments"`` or ``"minibatch"``) for these layers.

    Examples
    --------
    >>> new_accumulator("minibatch", {"fc": 6, "out": 3}, minibatch_size=64)
    MinibatchHSIC(rows=[0, 0), minibatch_size=64, batches=0, widths={'fc': 6, 'out': 3})
    """
    if need not in NEEDS:
        raise ValueError(f"invalid need {need!r}; valid: {', '.join(NEEDS)}")
    opts = check_measure_options(**options)
    if need == "minibatch":
        return MinibatchHSIC(widths, minibatch_size=opts["minibatch_size"])
    return JointMoments(widths)


# --------------------------------------------------------------------------- entry points


def similarity_matrix(
    source: Source,
    measure: str,
    rows: Sequence[Hashable] | None = None,
    cols: Sequence[Hashable] | None = None,
    **options: Any,
) -> np.ndarray:
    """The values of one measure for every pair of layers ``rows x cols`` (default: all layers).

    Parameters
    ----------
    source : JointMoments or MinibatchHSIC
        A finished accumulator of the kind the measure needs (``MEASURES[measure].needs``).
    measure : str
        A name from :data:`MEASURE_NAMES`.
    rows, cols : sequence of layer keys, optional
    **options
        Options of :data:`PARAMETERS` (e.g. ``svcca_threshold``); ``minibatch_size`` is the
        accumulator's and only validated here.

    Returns
    -------
    numpy.ndarray, shape (len(rows), len(cols))
        float64; no NaN (degenerate pairs give :data:`DEGENERATE_VALUE`).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 5))
    >>> y = np.hstack([x[:, :2] @ rng.normal(size=(2, 2)), rng.normal(size=(200, 1))])
    >>> m = JointMoments({"x": 5, "y": 3}).update({"x": x, "y": y})
    >>> np.round(similarity_matrix(m, "cka"), 3)
    array([[1.  , 0.33],
           [0.33, 1.  ]])
    >>> round(float(similarity_matrix(m, "svcca", ["x"], ["y"], svcca_threshold=0.99)[0, 0]), 3)
    0.701
    """
    spec = MEASURES[check_measures([measure])[0]]
    opts = check_measure_options(**options)
    kind = NEEDS[spec.needs]
    if not isinstance(source, kind):
        raise TypeError(f"measure {measure!r} is computed from {kind.__name__}, got {type(source).__name__}")
    row_keys = source.keys if rows is None else rows
    col_keys = source.keys if cols is None else cols
    r = [source.index(k) for k in row_keys]
    c = [source.index(k) for k in col_keys]
    return spec.function(source, r, c, opts)


def _pair(source: Source, measure: str, a: Hashable, b: Hashable, **options: Any) -> float:
    return float(similarity_matrix(source, measure, [a], [b], **options)[0, 0])


def cka(moments: JointMoments, a: Hashable, b: Hashable) -> float:
    """Linear CKA of layers ``a`` and ``b`` (Kornblith et al. 2019).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(100, 4))
    >>> q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    >>> m = JointMoments({"x": 4, "y": 4}).update({"x": x, "y": 3.0 * x @ q + 7.0})
    >>> round(cka(m, "x", "y"), 12)
    1.0
    """
    return _pair(moments, "cka", a, b)


def cka_debiased(moments: JointMoments, a: Hashable, b: Hashable) -> float:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012); can be negative.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> m = JointMoments([50, 50]).update([rng.normal(size=(40, 50)), rng.normal(size=(40, 50))])
    >>> round(cka(m, 0, 1), 2), round(cka_debiased(m, 0, 1), 2)  # unrelated: biased CKA is far from 0
    (0.55, -0.03)
    """
    return _pair(moments, "cka_debiased", a, b)


def minibatch_cka(hsic: MinibatchHSIC, a: Hashable, b: Hashable) -> float:
    """Minibatch CKA of layers ``a`` and ``b`` (Nguyen, Raghu and Kornblith 2021).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 8))
    >>> h = MinibatchHSIC([8, 8], minibatch_size=64).update([x, x @ rng.normal(size=(8, 8))])
    >>> 0.0 < minibatch_cka(h, 0, 1) < 1.0, minibatch_cka(h, 0, 0)
    (True, 1.0)
    """
    return _pair(hsic, "minibatch_cka", a, b)


def svcca(
    moments: JointMoments, a: Hashable, b: Hashable, svcca_threshold: float = DEFAULT_SVCCA_THRESHOLD
) -> float:
    """SVCCA of layers ``a`` and ``b`` (Raghu et al. 2017): mean CCA correlation of the top directions.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(500, 3)) * [10.0, 5.0, 0.01]  # the third direction holds < 1% of the variance
    >>> y = np.hstack([x[:, :2] @ rng.normal(size=(2, 2)), rng.normal(size=(500, 1)) * 0.01])
    >>> m = JointMoments([3, 3]).update([x, y])  # y shares x's two main directions, not the third
    >>> round(svcca(m, 0, 1), 12), round(svcca(m, 0, 1, svcca_threshold=1.0), 3)
    (1.0, 0.689)
    """
    return _pair(moments, "svcca", a, b, svcca_threshold=svcca_threshold)


def pwcca(moments: JointMoments, a: Hashable, b: Hashable) -> float:
    """Projection-weighted CCA of layers ``a`` and ``b`` (Morcos et al. 2018); not symmetric.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(500, 3)) * [10.0, 5.0, 0.01]
    >>> m = JointMoments([3, 2]).update([x, x[:, :2] @ rng.normal(size=(2, 2))])
    >>> round(pwcca(m, 0, 1), 12)  # weights from the 2-wide layer: both its directions match
    1.0
    """
    return _pair(moments, "pwcca", a, b)
