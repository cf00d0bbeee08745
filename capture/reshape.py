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
    ``timestepwise``).
``flat``
    ``(N, D)``: used as is.

The default semantics choose the layout from the module type (a ``Conv1d`` output
is a conv map, not a sequence). The ``delve-0.1.50`` semantics choose it from the
rank alone, as delve 0.1.50 does (4-D: conv, 3-D: sequence, 2-D: flat).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CONV_METHODS",
    "TIMESERIES_METHODS",
    "INTERPOLATION_MODES",
    "LAYOUTS",
    "FLAT_METHOD",
    "layout_of",
    "methods_for_layout",
    "interpolate_maps",
    "resizes",
    "to_matrix",
    "matrix_width",
    "check_conv_method",
    "check_timeseries_method",
    "check_interpolation",
]

LAYOUTS = ("conv", "sequence", "flat")
#: Name used for the reduction of a ``flat`` layer (it has no method).
FLAT_METHOD = "none"


def _channelwise(x: torch.Tensor, feature_major: bool) -> torch.Tensor:
    c = x.shape[1]
    per_channel = x.transpose(0, 1).reshape(c, -1)  # (C, N * spatial)
    return per_channel if feature_major else per_channel.T


def _mean(x: torch.Tensor, feature_major: bool) -> torch.Tensor:
    out = x.flatten(2).mean(dim=2)
    return out.T if feature_major else out


def _max(x: torch.Tensor, feature_major: bool) -> torch.Tensor:
    out = x.flatten(2).max(dim=2).values
    return out.T if feature_major else out


def _median(x: torch.Tensor, feature_major: bool) -> torch.Tensor:
    # torch.median returns the lower of the two middle values for an even count,
    # as delve 0.1.50 does.
    out = x.flatten(2).median(dim=2).values
    return out.T if feature_major else out


def _flatten(x: torch.Tensor, feature_major: bool) -> torch.Tensor:
    out = x.reshape(x.shape[0], -1)
    return out.T if feature_major else out


def _last_timestep(x: torch.Tensor, feature_major: bool) -> torch.Tensor:
    out = x[:, -1, :]
    return out.T if feature_major else out


def _timestepwise(x: torch.Tensor, feature_major: bool) -> torch.Tensor:
    out = x.reshape(x.shape[0], -1)
    return out.T if feature_major else out


def _identity(x: torch.Tensor, feature_major: bool) -> torch.Tensor:
    out = x.reshape(x.shape[0], -1)
    return out.T if feature_major else out


#: conv method name -> function of an ``(N, C, *spatial)`` tensor.
CONV_METHODS: dict[str, Callable[[torch.Tensor, bool], torch.Tensor]] = {
    "channelwise": _channelwise,
    "mean": _mean,
    "max": _max,
    "median": _median,
    "flatten": _flatten,
}

#: time-series method name -> function of an ``(N, T, U)`` tensor.
TIMESERIES_METHODS: dict[str, Callable[[torch.Tensor, bool], torch.Tensor]] = {
    "last_timestep": _last_timestep,
    "timestepwise": _timestepwise,
}

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


def _unknown(kind: str, value: object, valid: Any) -> ValueError:
    return ValueError(f"unknown {kind} {value!r}; valid values are: {', '.join(sorted(valid))}")


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


def to_matrix(
    x: Any,
    layout: str,
    method: str = FLAT_METHOD,
    *,
    interpolation: str | None = None,
    downsample: int | None = None,
    feature_major: bool = False,
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
        Return ``(d, n)`` instead of ``(n, d)`` (cheaper for channelwise Gram products).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    >>> to_matrix(x, "conv", "channelwise").shape, to_matrix(x, "conv", "mean").shape
    ((8, 3), (2, 3))
    """
    as_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(x)) if as_numpy else x
    if layout == "conv":
        check_conv_method(method)
        t = interpolate_maps(t, interpolation, downsample)
        out = CONV_METHODS[method](t, feature_major)
    elif layout == "sequence":
        check_timeseries_method(method)
        out = TIMESERIES_METHODS[method](t, feature_major)
    elif layout == "flat":
        out = _identity(t, feature_major)
    else:
        raise ValueError(f"unknown layout {layout!r}; valid values are: {', '.join(LAYOUTS)}")
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
    if layout == "flat":
        return int(np.prod(shape, dtype=np.int64))
    if layout == "sequence":
        return int(shape[-1]) if method == "last_timestep" else int(np.prod(shape, dtype=np.int64))
    channels, spatial = int(shape[0]), tuple(int(s) for s in shape[1:])
    if resizes(spatial, interpolation, downsample):
        spatial = (downsample,) * len(spatial)
    if method == "flatten":
        return channels * int(np.prod(spatial, dtype=np.int64))
    return channels
