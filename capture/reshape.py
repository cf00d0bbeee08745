"""How a layer output becomes a 2-D sample matrix (rows = samples, columns = features).

These rules are shared by both stages: the capture hook applies them when it
accumulates Gram moments, the analysis applies them to stored raw outputs.

Layouts
-------
Every recorded output is one of three layouts:

``conv``
    ``(N, C, *spatial)``: reduced by a *conv method* (``channelwise``, ``mean``,
    ``max``, ``median``, ``flatten``), after an optional interpolation.
``sequence``
    ``(N, T, U)``: reduced by a *time-series method* (``last_timestep``,
    ``timestepwise``, ``tokenwise``).
``flat``
    ``(N, D)``: used as is.

The default semantics choose the layout from the module type (a ``Conv1d`` output
is a conv map, not a sequence). The ``delve-0.1.50`` semantics choose it from the
rank alone, as delve 0.1.50 does (4-D: conv, 3-D: sequence, 2-D: flat).

Methods
-------
Each method is one :class:`MatrixMethod` entry of :data:`METHODS`: its matrix function, its width
rule and its preferred layout for the moment products. :data:`CONV_METHODS` and
:data:`TIMESERIES_METHODS` are the name views that the options, the command line and the error
messages list.

Token masks
-----------
A sequence output may come with a token mask ``(N, T)`` (true: a token, false: padding; the
``attention_mask`` of a Hugging Face model). A method that knows what padding means for it has a
``masked`` function: ``tokenwise`` leaves padding positions out of its rows, ``last_timestep``
takes each sample's last token (a sample without any token gives no row). ``timestepwise`` keeps
every position (its columns are positions), and conv and flat outputs have no positions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CONV_METHODS",
    "TIMESERIES_METHODS",
    "METHODS",
    "MatrixMethod",
    "INTERPOLATION_MODES",
    "LAYOUTS",
    "FLAT_METHOD",
    "layout_of",
    "methods_for_layout",
    "method_entry",
    "interpolate_maps",
    "resizes",
    "matrix_source",
    "to_matrix",
    "token_mask_of",
    "masks_apply",
    "matrix_width",
    "check_conv_method",
    "check_timeseries_method",
    "check_delve_methods",
    "check_interpolation",
]

LAYOUTS = ("conv", "sequence", "flat")
#: Name used for the reduction of a ``flat`` layer (it has no method).
FLAT_METHOD = "none"


@dataclass(frozen=True)
class MatrixMethod:
    """One way to turn a recorded output into its sample matrix: an entry of :data:`METHODS`.

    Attributes
    ----------
    name : str
        The method's name (``conv_methods=...``, ``--conv-method``).
    layout : {"conv", "sequence", "flat"}
        The outputs it applies to.
    rows : callable
        ``rows(x)`` of a torch output ``(N, ...)`` (conv maps already resized): the matrix in the
        preferred layout, a view where possible. Sample major: ``(n, d)``. Feature major:
        ``(d, a, b)``, whose ``a * b`` rows are ``b`` consecutive rows ``a`` times (``channelwise``:
        ``(C, N, H * W)``, a view of a contiguous ``(N, C, H, W)``).
    width : callable
        ``width(shape)``: the number of columns ``d`` for one sample of ``shape`` (the sample axis
        left out; conv maps already resized).
    feature_major : bool
        Whether :attr:`rows` gives the feature-major layout (the products read it without a copy).
    masked : callable, optional
        ``masked(x, mask)`` of a sequence output ``(N, T, U)`` and its token mask ``(N, T)`` (bool,
        true for a token): the sample-major matrix without the padding positions. None: the
        method ignores token masks.
    delve : bool
        Whether delve 0.1.50 has the method (its semantics, ``"delve-0.1.50"``, refuse the others).
    """

    name: str
    layout: str
    rows: Callable[[torch.Tensor], torch.Tensor]
    width: Callable[[tuple[int, ...]], int]
    feature_major: bool = False
    masked: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    delve: bool = True


def _tensor(x: np.ndarray) -> torch.Tensor:
    """``x`` as a CPU tensor sharing its memory (read-only arrays too: nothing here writes to them)."""
    if x.flags.writeable:
        return torch.from_numpy(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(x)


def _features(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _channels(shape: tuple[int, ...]) -> int:
    return int(shape[0])


def _last_axis(shape: tuple[int, ...]) -> int:
    return int(shape[-1])


def _maps(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, *spatial)`` as ``(N, C, positions)``."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def _channelwise(x: torch.Tensor) -> torch.Tensor:
    return _maps(x).transpose(0, 1)  # (C, N, positions): each position of each map is a row


def _mean(x: torch.Tensor) -> torch.Tensor:
    maps = _maps(x)
    if maps.device.type != "cpu":
        return maps.to(torch.float64).mean(dim=2)
    # float64 sums in numpy: independent of torch's thread count, the same bits in every stage
    values = maps if maps.dtype in (torch.float64, torch.float32, torch.float16) else maps.float()
    return torch.from_numpy(np.ascontiguousarray(values.numpy()).mean(axis=2, dtype=np.float64))


def _max(x: torch.Tensor) -> torch.Tensor:
    return _maps(x).max(dim=2).values


def _median(x: torch.Tensor) -> torch.Tensor:
    # torch.median returns the lower of the two middle values for an even count, as delve 0.1.50 does.
    return _maps(x).median(dim=2).values


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _last_timestep(x: torch.Tensor) -> torch.Tensor:
    return x[:, -1, :]


def _last_token(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sample's output at its last token (``mask`` true); a sample without a token gives no row."""
    mask = mask.to(x.device)
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = (mask * positions).argmax(dim=1)  # the largest position holding a token (0 when none)
    has = mask.any(dim=1)
    return x[torch.arange(x.shape[0], device=x.device)[has], last[has]]


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # (N * T, U): each position of each sequence is a row


def _real_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.to(x.device)]  # (tokens, U), in sample order then position order


#: layout -> method name -> entry. Adding a method is one entry here (and its tests).
METHODS: dict[str, dict[str, MatrixMethod]] = {
    "conv": {
        m.name: m
        for m in (
            MatrixMethod("channelwise", "conv", _channelwise, _channels, feature_major=True),
            MatrixMethod("mean", "conv", _mean, _channels),
            MatrixMethod("max", "conv", _max, _channels),
            MatrixMethod("median", "conv", _median, _channels),
            MatrixMethod("flatten", "conv", _per_sample, _features),
        )
    },
    "sequence": {
        m.name: m
        for m in (
            MatrixMethod("last_timestep", "sequence", _last_timestep, _last_axis, masked=_last_token),
            MatrixMethod("timestepwise", "sequence", _per_sample, _features),
            MatrixMethod("tokenwise", "sequence", _tokens, _last_axis, masked=_real_tokens, delve=False),
        )
    },
    "flat": {FLAT_METHOD: MatrixMethod(FLAT_METHOD, "flat", _per_sample, _features)},
}
#: conv method name -> entry (a view of :data:`METHODS`; ``(N, C, *spatial)`` outputs).
CONV_METHODS: dict[str, MatrixMethod] = METHODS["conv"]
#: time-series method name -> entry (a view of :data:`METHODS`; ``(N, T, U)`` outputs).
TIMESERIES_METHODS: dict[str, MatrixMethod] = METHODS["sequence"]

#: ``torch.nn.functional.interpolate`` modes and the spatial ranks they accept.
INTERPOLATION_MODES: dict[str, tuple[int, ...]] = {
    "nearest": (1, 2, 3),
    "nearest-exact": (1, 2, 3),
    "area": (1, 2, 3),
    "linear": (1,),
    "bilinear": (2,),
    "bicubic": (2,),
    "trilinear": (3,),
}


def check_conv_method(name: str, argument: str = "conv_method") -> str:
    """Return ``name`` if it is a known conv method, else raise a ValueError naming ``argument``."""
    if name not in CONV_METHODS:
        raise ValueError(
            f"{argument}: unknown conv method {name!r}; valid values are: {', '.join(CONV_METHODS)}"
        )
    return name


def check_timeseries_method(name: str, argument: str = "timeseries_method") -> str:
    """Return ``name`` if it is a known time-series method, else raise a ValueError."""
    if name not in TIMESERIES_METHODS:
        raise ValueError(
            f"{argument}: unknown time-series method {name!r}; valid values are: "
            f"{', '.join(TIMESERIES_METHODS)}"
        )
    return name


def method_entry(layout: str, method: str = FLAT_METHOD) -> MatrixMethod:
    """The registry entry of ``method`` for ``layout`` (``flat`` has the one method ``none``).

    Examples
    --------
    >>> method_entry("conv", "channelwise").feature_major, method_entry("flat").width((3, 4))
    (True, 12)
    """
    if layout == "conv":
        return CONV_METHODS[check_conv_method(method)]
    if layout == "sequence":
        return TIMESERIES_METHODS[check_timeseries_method(method)]
    if layout == "flat":
        return METHODS["flat"][FLAT_METHOD]
    raise ValueError(f"unknown layout {layout!r}; valid values are: {', '.join(LAYOUTS)}")


def masks_apply(layout: str, methods: Any) -> bool:
    """Whether a token mask changes the matrix of any of ``methods`` for an output of ``layout``.

    Examples
    --------
    >>> masks_apply("sequence", ["timestepwise"]), masks_apply("sequence", ["tokenwise"])
    (False, True)
    """
    if layout != "sequence":
        return False
    return any(method_entry(layout, m).masked is not None for m in methods)


def check_delve_methods(methods: Any, argument: str = "timeseries_methods") -> None:
    """Refuse a time-series method delve 0.1.50 does not have (under its semantics), naming ``argument``.

    Examples
    --------
    >>> check_delve_methods(["last_timestep"])
    >>> check_delve_methods(["tokenwise"], "timeseries_method")
    Traceback (most recent call last):
    ...
    ValueError: timeseries_method: delve 0.1.50 has no 'tokenwise' method (it has last_timestep, timestepwise); use the default semantics for it
    """
    ours = [m for m in methods if not TIMESERIES_METHODS[check_timeseries_method(m, argument)].delve]
    if ours:
        theirs = ", ".join(m for m, e in TIMESERIES_METHODS.items() if e.delve)
        raise ValueError(
            f"{argument}: delve 0.1.50 has no {ours[0]!r} method (it has {theirs}); use the default "
            "semantics for it"
        )


def check_interpolation(mode: str | None, size: int | None) -> None:
    """Validate an interpolation mode and its target size (``downsample``)."""
    if mode is None:
        return
    if mode not in INTERPOLATION_MODES:
        raise ValueError(
            f"interpolation: unknown mode {mode!r}; valid values are: {', '.join(INTERPOLATION_MODES)}"
        )
    if size is None or isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"downsample: the target size must be a positive integer, got {size!r}")


def layout_of(kind: str, ndim: int, compat: bool = False) -> str:
    """The layout of an output of rank ``ndim`` from a module of ``kind``.

    Parameters
    ----------
    kind : {"conv", "recurrent", "dense", "other"}
        Module family, as recorded in the store's model summary.
    ndim : int
        Rank of the recorded output (samples first).
    compat : bool
        Follow delve 0.1.50, which looks at the rank alone.

    Examples
    --------
    >>> layout_of("conv", 3), layout_of("conv", 3, compat=True), layout_of("dense", 2)
    ('conv', 'sequence', 'flat')
    """
    if not compat and kind == "conv" and ndim >= 3:
        return "conv"
    if ndim == 4:
        return "conv"
    if ndim == 3:
        return "sequence"
    if ndim <= 2:
        return "flat"
    return "flat" if compat else "conv"


def methods_for_layout(layout: str, conv_methods: Any, timeseries_methods: Any) -> tuple[str, ...]:
    """The reductions that apply to a layer of ``layout``."""
    if layout == "conv":
        return tuple(conv_methods)
    if layout == "sequence":
        return tuple(timeseries_methods)
    return (FLAT_METHOD,)


def resizes(spatial: tuple[int, ...], mode: str | None, size: int | None) -> bool:
    """Whether :func:`interpolate_maps` resizes maps of this spatial shape (``(H, W)``, ``(L,)``, ...).

    As in delve 0.1.50 a map is resized only when one spatial extent is larger than
    ``size`` (strictly). A mode that does not apply to the map's rank (``bilinear`` on a
    ``Conv1d`` output) leaves it as it is: delve never interpolates anything but 4-D outputs.

    Examples
    --------
    >>> resizes((32, 32), "bilinear", 8), resizes((8, 8), "bilinear", 8), resizes((32,), "bilinear", 8)
    (True, False, False)
    """
    if mode is None or size is None or not spatial:
        return False
    if len(spatial) not in INTERPOLATION_MODES.get(mode, ()):
        return False
    return any(int(s) > size for s in spatial)


def interpolate_maps(x: torch.Tensor, mode: str | None, size: int | None) -> torch.Tensor:
    """Resize the spatial maps of ``(N, C, *spatial)`` to ``size`` along every axis.

    As in delve 0.1.50 this happens only when one spatial extent is larger than
    ``size`` (strictly), and then every spatial axis becomes ``size`` (see :func:`resizes`).
    """
    if x.dim() < 3 or not resizes(tuple(x.shape[2:]), mode, size):
        return x
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        return F.interpolate(x.float(), size=size, mode=mode).to(x.dtype)
    return F.interpolate(x, size=size, mode=mode)


def token_mask_of(mask: Any) -> torch.Tensor:
    """A token mask as a bool tensor (true: a token): from a tensor or array of 0 / 1 or bools.

    Examples
    --------
    >>> token_mask_of(np.array([[1, 1, 0]], dtype=np.uint8))
    tensor([[ True,  True, False]])
    """
    t = _tensor(np.asarray(mask)) if not isinstance(mask, torch.Tensor) else mask
    return t if t.dtype == torch.bool else t != 0


def matrix_source(
    x: Any,
    layout: str,
    method: str = FLAT_METHOD,
    *,
    interpolation: str | None = None,
    downsample: int | None = None,
    mask: Any = None,
) -> tuple[Any, bool]:
    """The sample matrix of one output in its method's preferred layout, for the moment kernels.

    Returns ``(matrix, feature_major)``: ``(n, d)``, or ``(d, a, b)`` when ``feature_major`` (see
    :class:`MatrixMethod`); a view of ``x`` where the method allows. A numpy input gives numpy.
    ``mask``: the token mask ``(N, T)`` of a sequence output (see *Token masks* above), applied
    by the methods that know one; None: every position is a token.

    Examples
    --------
    >>> x = np.zeros((2, 3, 4, 5), dtype=np.float32)
    >>> m, fm = matrix_source(x, "conv", "channelwise")
    >>> m.shape, fm, bool(np.shares_memory(m, x))
    ((3, 2, 20), True, True)
    >>> seq, mask = np.zeros((2, 3, 4), dtype=np.float32), np.array([[1, 1, 0], [1, 0, 0]])
    >>> matrix_source(seq, "sequence", "tokenwise", mask=mask)[0].shape
    (3, 4)
    """
    entry = method_entry(layout, method)
    as_numpy = isinstance(x, np.ndarray)
    t = _tensor(x) if as_numpy else x
    if layout == "conv":
        t = interpolate_maps(t, interpolation, downsample)
    if mask is not None and entry.masked is not None:
        out, feature_major = entry.masked(t, token_mask_of(mask)), False
    else:
        out, feature_major = entry.rows(t), entry.feature_major
    return (out.numpy() if as_numpy else out), feature_major


def to_matrix(
    x: Any,
    layout: str,
    method: str = FLAT_METHOD,
    *,
    interpolation: str | None = None,
    downsample: int | None = None,
    feature_major: bool = False,
    mask: Any = None,
) -> Any:
    """Turn one recorded output into its 2-D sample matrix.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        Output with samples along the first axis. A numpy input gives a numpy output.
    layout : {"conv", "sequence", "flat"}
        See the module docstring.
    method : str
        A conv method for ``conv``, a time-series method for ``sequence``; ignored for ``flat``.
    interpolation, downsample : optional
        Resize conv maps first (``torch.nn.functional.interpolate`` mode and target size).
    feature_major : bool
        Return ``(d, n)`` instead of ``(n, d)``.
    mask : tensor or array, optional
        The token mask ``(N, T)`` of a sequence output (true / 1: a token, false / 0: padding).

    Examples
    --------
    >>> x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    >>> to_matrix(x, "conv", "channelwise").shape, to_matrix(x, "conv", "mean").shape
    ((8, 3), (2, 3))
    >>> seq = np.arange(2 * 3, dtype=np.float32).reshape(2, 3, 1)
    >>> to_matrix(seq, "sequence", "last_timestep", mask=np.array([[1, 1, 0], [1, 1, 1]])).ravel()
    array([1., 5.], dtype=float32)
    """
    as_numpy = isinstance(x, np.ndarray)
    t = _tensor(np.ascontiguousarray(x)) if as_numpy else x
    out, preferred = matrix_source(
        t, layout, method, interpolation=interpolation, downsample=downsample, mask=mask
    )
    if preferred:
        out = out.reshape(out.shape[0], -1)
    if preferred != feature_major:
        out = out.T
    return out.numpy() if as_numpy else out


def matrix_width(
    shape: tuple[int, ...],
    layout: str,
    method: str = FLAT_METHOD,
    *,
    interpolation: str | None = None,
    downsample: int | None = None,
) -> int:
    """Number of columns of the sample matrix of an output with per-sample ``shape``.

    ``shape`` excludes the sample axis.

    Examples
    --------
    >>> matrix_width((16, 32, 32), "conv", "flatten", interpolation="bilinear", downsample=8)
    1024
    """
    shape = tuple(int(s) for s in shape)
    if layout == "conv" and resizes(shape[1:], interpolation, downsample):
        shape = (shape[0], *([downsample] * (len(shape) - 1)))
    return method_entry(layout, method).width(shape)
