"""What an analysis computes: one frozen :class:`AnalysisOptions`, validated in one place.

Every entry point builds one: :func:`analyze.analyze_runs` and :func:`analyze.run_stats` from
their keyword arguments, the command line from its options, a sweep from its configuration
keys, and ``provenance.json`` records :meth:`AnalysisOptions.to_dict`. The valid names come
from the registries (:data:`capture.reshape.CONV_METHODS`, :data:`capture.reshape.TIMESERIES_METHODS`,
:data:`analyze.stats.STATS`, :data:`analyze.stats.SEMANTICS`, :data:`capture.format.PHASES`), so a
new method or statistic is valid everywhere once it is registered.

A bad value raises :class:`AnalysisError` whose message is one line, ``<option>: <reason>``;
its ``argument`` and ``reason`` attributes let the command line and the sweep configuration
report the same reason under their own name for the option (``--threshold``, ``'thresholds'``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from analyze.selection import Selection
from analyze.similarity_measures import PARAMETERS, check_measure_options, check_measures
from analyze.stats import DEFAULT_SEMANTICS, DELVE_SEMANTICS, SEMANTICS, STATS, check_threshold
from capture.format import PHASES
from capture.reshape import CONV_METHODS, INTERPOLATION_MODES, TIMESERIES_METHODS

__all__ = [
    "AnalysisError",
    "AnalysisOptions",
    "ON_ERROR",
    "PAIRS",
    "POSITIONAL",
    "SCHEDULERS",
    "SOURCES",
    "parse_epochs",
    "resolve_options",
]

#: Local dask schedulers by name; anything with ``://`` is a ``dask.distributed`` scheduler address.
SCHEDULERS = ("synchronous", "threads", "processes")
#: Stored data an analysis may reduce (``auto``: gram moments when they serve the request, else raw).
SOURCES = ("auto", "raw", "gram")
#: What happens to a layer that cannot be analysed: stop, or skip it and list it.
ON_ERROR = ("raise", "skip")
#: What :func:`analyze.similarity` compares: the layers of one run and epoch, one layer across
#: epochs, or one layer across runs.
PAIRS = ("layers", "epochs", "runs")
#: The options :func:`analyze.analyze_runs` takes positionally after ``runs``, in order.
POSITIONAL = (
    "thresholds",
    "conv_methods",
    "timeseries_methods",
    "stats",
    "phases",
    "epochs",
    "layers",
    "compat",
    "device",
    "scheduler",
)
_EPOCH_HINT = "use e.g. 'all', 'last', '0,2,5-7'"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


class AnalysisError(ValueError):
    """Bad input to an analysis; the message is one line naming the argument, run or layer.

    Attributes
    ----------
    argument : str or None
        The option at fault (an :class:`AnalysisOptions` field), when one is.
    reason : str
        The message without the option's name.
    """

    def __init__(self, message: str, *, argument: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument
        self.reason = message if reason is None else reason

    @classmethod
    def invalid(cls, argument: str, reason: str) -> AnalysisError:
        """The error for a bad value of ``argument``: ``"<argument>: <reason>"``.

        Examples
        --------
        >>> err = AnalysisError.invalid("thresholds", "'1.5' is not a number in (0, 1]")
        >>> str(err), err.argument
        ("thresholds: '1.5' is not a number in (0, 1]", 'thresholds')
        """
        return cls(f"{argument}: {reason}", argument=argument, reason=reason)


class _Invalid(Exception):
    """A reason a value is refused (the validator adds the option's name)."""


# --------------------------------------------------------------------------- value checks


def _listed(valid: Iterable[str]) -> str:
    return ", ".join(valid)


def _items(value: Any, expected: str) -> tuple[Any, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise _Invalid(f"must be {expected}, got {value!r}")
    return tuple(value)


def _no_duplicates(items: tuple[Any, ...], what: str) -> tuple[Any, ...]:
    if len(set(items)) != len(items):
        raise _Invalid(f"duplicate {what} in {list(items)}")
    return items


def _names(what: str, valid: Sequence[str], plural: str) -> Callable[[Any], tuple[str, ...]]:
    """A check of a name or a list of names from ``valid``."""

    def check(value: Any) -> tuple[str, ...]:
        items = (value,) if isinstance(value, str) else _items(value, "a string or a list of strings")
        if not all(isinstance(v, str) for v in items):
            raise _Invalid(f"must be a string or a list of strings, got {value!r}")
        if not items:
            raise _Invalid(f"name at least one {what}; valid values are: {_listed(valid)}")
        for name in items:
            if name not in valid:
                raise _Invalid(f"unknown {what} {name!r}; valid values are: {_listed(valid)}")
        return _no_duplicates(items, plural)

    return check


def _choice(valid: Sequence[str], optional: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or value not in valid:
            raise _Invalid(f"unknown value {value!r}; valid values are: {_listed(valid)}")
        return value

    return check


def _thresholds(value: Any) -> tuple[float, ...]:
    scalar = isinstance(value, str | int | float | np.number)
    items = (value,) if scalar else _items(value, "a number or a list of numbers in (0, 1]")
    if not items:
        raise _Invalid("name at least one threshold in (0, 1]")
    out = []
    for t in items:
        try:
            out.append(check_threshold(t))
        except ValueError:
            raise _Invalid(f"'{t}' is not a number in (0, 1]") from None
    return _no_duplicates(tuple(out), "thresholds")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _positive_int(optional: bool) -> Callable[[Any], int | None]:
    def check(value: Any) -> int | None:
        if value is None and optional:
            return None
        if not _is_int(value) or value < 1:
            raise _Invalid(f"must be a positive integer, got {value!r}")
        return int(value)

    return check


def _epoch_numbers(spec: str) -> list[int | None]:
    """The epochs a spec string names, ``None`` standing for the last one.

    Examples
    --------
    >>> _epoch_numbers("0,2-3,last")
    [0, 2, 3, None]
    """
    out: list[int | None] = []
    for part in (p.strip() for p in spec.split(",")):
        try:
            if part.lower() == "last" or part == "-1":
                out.append(None)
            elif "-" in part.lstrip("-"):
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise _Invalid(f"cannot read {spec!r} ({_EPOCH_HINT})") from None
    return out


def _epochs(value: Any) -> str | int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "all"):
            return None
        _epoch_numbers(text)
        return text
    if _is_int(value):
        return int(value)
    if isinstance(value, list | tuple | np.ndarray):
        if not len(value):
            raise _Invalid("name at least one epoch")
        if not all(_is_int(e) and e >= 0 for e in value):
            raise _Invalid(f"a list must hold non-negative integers, got {value!r}")
        return tuple(int(e) for e in value)
    raise _Invalid(
        f"must be 'all', 'last', a spec like '0,2,5-7', an integer or a list of integers, got {value!r}"
    )


def _layers(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else _items(value, "a string or a list of strings")
    if not all(isinstance(v, str) for v in items):
        raise _Invalid(f"must be a string or a list of strings, got {value!r}")
    return _no_duplicates(items, "layer patterns") or None


def _compat(value: Any) -> str | None:
    if value is None or value == DEFAULT_SEMANTICS:
        return None
    return _choice(SEMANTICS)(value)


def _device(value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise _Invalid(f"must be 'cpu', 'cuda' or 'cuda:i', got {value!r}")
    return value


def _scheduler(value: Any) -> str:
    if not isinstance(value, str) or (value not in SCHEDULERS and "://" not in value):
        raise _Invalid(
            f"{value!r} is neither one of {_listed(SCHEDULERS)} nor a scheduler address (tcp://host:port)"
        )
    return value


def _calls(value: Any) -> tuple[int | None, int | None] | None:
    if value is None:
        return None
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(v is None or _is_int(v) for v in value)
    ):
        raise _Invalid(f"must be a (start, stop) window of integers or None, got {value!r}")
    return tuple(None if v is None else int(v) for v in value)  # type: ignore[return-value]


def _measures(value: Any) -> tuple[str, ...]:
    if not isinstance(value, str) and not isinstance(value, Iterable):
        raise _Invalid(f"must be a measure name or a list of them, got {value!r}")
    try:
        return check_measures(value, argument="measure")
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _number(text: str) -> Any:
    """``text`` as an int or a float when it is one, else ``text``.

    Examples
    --------
    >>> _number("3"), _number("0.5"), _number("abc")
    (3, 0.5, 'abc')
    """
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _measure_option(name: str) -> Callable[[Any], Any]:
    """A check by :func:`analyze.similarity_measures.check_measure_options` (the measures' registry)."""

    def check(value: Any) -> Any:
        if isinstance(value, str):  # a number typed on the command line is refused as the number
            value = _number(value)
        try:
            return check_measure_options(**{name: value})[name]
        except ValueError as exc:
            raise _Invalid(str(exc)) from None

    return check


#: Field -> its check (returns the normalised value or raises :class:`_Invalid`).
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "thresholds": _thresholds,
    "conv_methods": _names("conv method", CONV_METHODS, "conv methods"),
    "timeseries_methods": _names("time-series method", TIMESERIES_METHODS, "time-series methods"),
    "stats": _names("statistic", STATS, "statistics"),
    "phases": _names("phase", PHASES, "phases"),
    "epochs": _epochs,
    "layers": _layers,
    "compat": _compat,
    "device": _device,
    "scheduler": _scheduler,
    "interpolation": _choice(INTERPOLATION_MODES, optional=True),
    "downsample": _positive_int(optional=True),
    "log_interval": _positive_int(optional=True),
    "max_samples": _positive_int(optional=True),
    "calls": _calls,
    "source": _choice(SOURCES),
    "on_error": _choice(ON_ERROR),
    "task_bytes": _positive_int(optional=False),
    "measures": _measures,
    "svcca_threshold": _measure_option("svcca_threshold"),
    "minibatch_size": _measure_option("minibatch_size"),
    "pairs": _choice(PAIRS),
}


# --------------------------------------------------------------------------- the options


@dataclass(frozen=True)
class AnalysisOptions:
    """Everything that chooses what an analysis computes, validated and normalised on creation.

    Parameters
    ----------
    thresholds : float or sequence of float, default (0.99,)
        Variance thresholds in (0, 1] for ``lsat`` / ``idim``; all come from one eigen-decomposition.
    conv_methods, timeseries_methods : str or sequence of str
        Reductions of conv maps and sequences (:data:`capture.reshape.CONV_METHODS`,
        :data:`capture.reshape.TIMESERIES_METHODS`); default ``channelwise`` and ``last_timestep``.
    stats : str or sequence of str, default ("lsat", "idim")
        Names from :data:`analyze.stats.STATS`.
    phases : str or sequence of {"train", "eval"}, default both
    epochs : spec, optional
        ``None`` / ``"all"``, ``"last"`` / ``-1``, ``"0,2,5-7"``, an int or a list of ints (see
        :func:`parse_epochs`; default: every complete epoch).
    layers : glob pattern(s), optional
        Layers to analyse; each pattern must match a layer (default, or an empty list: every layer).
    compat : {None, "default", "delve-0.1.50"}
        ``"delve-0.1.50"`` reproduces delve 0.1.50's numbers: the covariance of the last recorded
        call of each epoch and phase, its idim rule, its embed, its rank-based reshaping.
    device : {"cpu", "cuda", "cuda:i"}
        Where the per-chunk Gram products run; eigen-decompositions are float64 on the CPU.
    scheduler : {"synchronous", "threads", "processes"} or address
        A dask scheduler, or a ``dask.distributed`` scheduler address (``tcp://host:port``).
    interpolation, downsample : optional
        Resize raw conv maps at analysis time (delve's rule: only maps larger than ``downsample``);
        they go together.
    log_interval, max_samples, calls : optional
        Sample selection with delve's rules (see :mod:`analyze.selection`); needs raw activations.
    source : {"auto", "raw", "gram"}
        Which stored data to reduce (``auto``: gram blocks when they serve the request, else raw).
    on_error : {"raise", "skip"}
        ``skip`` analyses the other layers and lists failures in the result.
    task_bytes : int, default 16 MiB
        Decoded bytes per dask task (does not change the results).
    measures : str or sequence of str, default ("cka",)
        Similarity measures of :func:`analyze.similarity`, from
        :data:`analyze.similarity_measures.MEASURE_NAMES`.
    svcca_threshold : float, default 0.99
        Share of each layer's variance that the directions kept by ``svcca`` explain, in (0, 1].
    minibatch_size : int, default 256
        Consecutive rows per minibatch of ``minibatch_cka`` (at least 4).
    pairs : {"layers", "epochs", "runs"}, default "layers"
        What :func:`analyze.similarity` compares (see :data:`PAIRS`).

    Where a tuple is wanted, a single value is accepted (``thresholds=0.9``, ``stats="lsat"``);
    numeric strings are accepted as thresholds. Where to keep reduced covariances (the cache)
    and whether to show progress are not options of *what* is computed: they are arguments of
    the entry points.

    Raises
    ------
    AnalysisError
        For a bad value; the message is one line, ``<field>: <reason>``.

    Examples
    --------
    >>> options = AnalysisOptions(thresholds=0.9, stats="lsat", compat="default")
    >>> options.thresholds, options.stats, options.compat
    ((0.9,), ('lsat',), None)
    >>> AnalysisOptions.from_dict(options.to_dict()) == options
    True
    >>> AnalysisOptions(conv_methods=["mean", "avg"])
    Traceback (most recent call last):
    ...
    analyze.options.AnalysisError: conv_methods: unknown conv method 'avg'; valid values are: channelwise, mean, max, median, flatten
    """

    thresholds: tuple[float, ...] = (0.99,)
    conv_methods: tuple[str, ...] = ("channelwise",)
    timeseries_methods: tuple[str, ...] = ("last_timestep",)
    stats: tuple[str, ...] = ("lsat", "idim")
    phases: tuple[str, ...] = PHASES
    epochs: str | int | tuple[int, ...] | None = None
    layers: tuple[str, ...] | None = None
    compat: str | None = None
    device: str = "cpu"
    scheduler: str = "threads"
    interpolation: str | None = None
    downsample: int | None = None
    log_interval: int | None = None
    max_samples: int | None = None
    calls: tuple[int | None, int | None] | None = None
    source: str = "auto"
    on_error: str = "raise"
    task_bytes: int = 16 * 2**20
    measures: tuple[str, ...] = ("cka",)
    svcca_threshold: float = PARAMETERS["svcca_threshold"].default
    minibatch_size: int = PARAMETERS["minibatch_size"].default
    pairs: str = "layers"

    def __post_init__(self) -> None:
        for f in fields(self):
            try:
                value = _CHECKS[f.name](getattr(self, f.name))
            except _Invalid as exc:
                raise AnalysisError.invalid(f.name, str(exc)) from None
            object.__setattr__(self, f.name, value)
        if self.interpolation is not None and self.downsample is None:
            raise AnalysisError.invalid(
                "downsample", f"interpolation {self.interpolation!r} needs a target size (a positive integer)"
            )
        if self.downsample is not None and self.interpolation is None:
            raise AnalysisError.invalid(
                "interpolation",
                f"downsample {self.downsample} needs an interpolation mode; valid values are: "
                f"{_listed(INTERPOLATION_MODES)}",
            )

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The option names, in order (the first ten are :data:`POSITIONAL`)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalysisOptions:
        """Options from a mapping such as :meth:`to_dict`'s (missing keys take their defaults).

        Raises
        ------
        AnalysisError
            An unknown key, or a bad value.
        """
        valid = cls.keys()
        for key in data:
            if key not in valid:
                raise AnalysisError.invalid(str(key), f"unknown option; valid options are: {_listed(valid)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Every option as JSON- and TOML-ready values (tuples as lists, unset ones as ``None``)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> AnalysisOptions:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def semantics(self) -> str:
        """The statistics' semantics: :data:`analyze.stats.DEFAULT_SEMANTICS` unless ``compat`` is set."""
        return self.compat or DEFAULT_SEMANTICS

    @property
    def delve_compat(self) -> bool:
        """Whether delve 0.1.50's numbers are reproduced."""
        return self.compat == DELVE_SEMANTICS

    @property
    def needs_covariance(self) -> bool:
        """Whether a statistic needs the covariance matrix itself (``cov``, ``embed``)."""
        return "cov" in self.stats or "embed" in self.stats

    @property
    def selection(self) -> Selection:
        """The sample selection these options ask for."""
        return Selection(
            log_interval=self.log_interval,
            max_samples=self.max_samples,
            calls=self.calls,
            last_call=self.delve_compat,
        )


def resolve_options(
    options: AnalysisOptions | Mapping[str, Any] | None = None, *positional: Any, **keywords: Any
) -> AnalysisOptions:
    """:class:`AnalysisOptions` from an entry point's arguments.

    ``positional`` are options in :data:`POSITIONAL` order; ``keywords`` are option names. Both
    override ``options`` (an :class:`AnalysisOptions`, a mapping of options, or ``None``: the
    defaults).

    Raises
    ------
    TypeError
        An unknown keyword, too many positional values, or an option given twice.
    AnalysisError
        A bad value.

    Examples
    --------
    >>> resolve_options(None, 0.9, "mean", stats="lsat").conv_methods
    ('mean',)
    >>> resolve_options(AnalysisOptions(stats="trc"), thresholds=(0.5,)).stats
    ('trc',)
    """
    if len(positional) > len(POSITIONAL):
        raise TypeError(f"at most {len(POSITIONAL)} options are positional ({', '.join(POSITIONAL)})")
    given = dict(zip(POSITIONAL, positional, strict=False))
    valid = AnalysisOptions.keys()
    for key in keywords:
        if key not in valid:
            raise TypeError(f"unexpected keyword argument {key!r}; analysis options are: {_listed(valid)}")
        if key in given:
            raise TypeError(f"got multiple values for the option {key!r}")
    if options is None:
        base = AnalysisOptions()
    elif isinstance(options, AnalysisOptions):
        base = options
    else:
        base = AnalysisOptions.from_dict(options)
    changes = {**given, **keywords}
    return base.replace(**changes) if changes else base


def parse_epochs(spec: str | int | Iterable[int] | None, available: Sequence[int]) -> list[int]:
    """Epochs from a spec: ``None`` / ``"all"``, ``"-1"`` / ``"last"``, ``"0,2,5-7"``, an int or a list.

    Raises
    ------
    AnalysisError
        For a malformed spec or an epoch that is not among ``available``.

    Examples
    --------
    >>> parse_epochs("0,2-3", [0, 1, 2, 3]), parse_epochs("-1", [0, 1, 2]), parse_epochs(None, [4, 5])
    ([0, 2, 3], [2], [4, 5])
    """
    available = sorted(int(e) for e in available)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return available
    if isinstance(spec, str):
        try:
            numbers = _epoch_numbers(spec)
        except _Invalid as exc:
            raise AnalysisError.invalid("epochs", str(exc)) from None
    elif _is_int(spec):
        numbers = [None if spec == -1 else int(spec)]
    else:
        numbers = [int(e) for e in spec]
    if None in numbers and not available:
        raise AnalysisError.invalid("epochs", "the run has no complete epoch")
    wanted = [available[-1] if e is None else e for e in numbers]
    missing = [e for e in wanted if e not in available]
    if missing:
        shown = f"{available[0]}-{available[-1]}" if available else "none"
        raise AnalysisError.invalid("epochs", f"epoch(s) {missing} out of range; complete epochs are {shown}")
    return sorted(set(wanted))
