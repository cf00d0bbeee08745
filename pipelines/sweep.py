"""Sweeps: re-analyse many runs over several thresholds and conv methods in one go.

:func:`sweep` takes a configuration (a TOML file or a dict), analyses every run with every
threshold, conv method and time-series method in one :func:`analyze.analyze_runs` call (all
thresholds come from one eigen-decomposition per covariance), keeps the reduced covariances in
a cache folder, and writes one combined tidy table plus comparison plots. Re-running a sweep
with other thresholds or statistics reads no activation: the covariances come from the cache.

Configuration (TOML)
--------------------
::

    runs = ["runs/cnn.zarr", "runs/mlp.zarr"]   # required: run stores
    output = "sweep-out"                         # output folder
    thresholds = [0.9, 0.95, 0.99]               # variance thresholds in (0, 1]
    conv_methods = ["channelwise", "mean"]       # conv reductions
    stats = ["lsat"]                             # scalar statistics
    # optional:
    timeseries_methods = ["last_timestep"]
    epochs = "all"             # "all", "last" / "-1", "0,2,5-7", an integer or a list of integers
    layers = ["conv*", "fc1"]  # glob pattern(s) on layer names
    phases = ["train", "eval"]
    compat = "delve-0.1.50"    # reproduce delve 0.1.50's numbers ("default": documented definitions)
    scheduler = "threads"      # "synchronous", "threads", "processes" or "tcp://host:port"
    device = "cpu"             # where Gram products run: "cpu", "cuda", "cuda:i"
    source = "auto"            # "auto", "raw" or "gram"
    cache_dir = "sweep-cache"  # reduced covariances; default: "<output>/cache"
    on_error = "raise"         # "skip": analyse the other layers and record the failures
    plots = true

=====================  ===========================  =======================================
key                    type                         default
=====================  ===========================  =======================================
``runs``               string or list of strings    (required)
``output``             string                       ``"sweep-out"``
``thresholds``         number or list of numbers    ``[0.99]``
``conv_methods``       string or list of strings    ``["channelwise"]``
``timeseries_methods`` string or list of strings    ``["last_timestep"]``
``stats``              string or list of strings    ``["lsat"]`` (scalar statistics only)
``epochs``             string, integer or list      every complete epoch
``layers``             string or list of strings    every layer
``phases``             string or list of strings    ``["train", "eval"]``
``compat``             string                       ``"default"``
``scheduler``          string                       ``"threads"``
``device``             string                       ``"cpu"``
``source``             string                       ``"auto"``
``cache_dir``          string                       ``"<output>/cache"``
``on_error``           string                       ``"raise"``
``plots``              boolean                      ``true``
=====================  ===========================  =======================================

Relative paths (``runs``, ``output``, ``cache_dir``) are relative to the TOML file's folder
(to the current folder for a dict). An unknown key or a bad value raises
:class:`SweepConfigError` naming the key. Reading TOML needs Python 3.11's ``tomllib``, or the
``tomli`` package on Python 3.10.

Output folder
-------------
``sweep.csv``
    The combined tidy table (:data:`analyze.result.TABLE_COLUMNS`: ``run, epoch, phase, layer,
    conv_method, timeseries_method, threshold, stat, value``), sorted and formatted as
    ``stats.csv`` (see :mod:`analyze.outputs`), so the same sweep writes the same bytes.
``plots/sweep_{stat}_{phase}.png``
    The statistic per layer at each run's last analysed epoch, one panel per run, one line per
    conv method / time-series method / threshold combination.
``cache/``
    Reduced covariances (unless ``cache_dir`` points elsewhere).
``provenance.json``
    Written last: the configuration, inputs with their content hashes, every analysis option,
    package versions, skipped layers and the SHA-256 of every file written.

The output folder must be absent, empty, or an earlier output folder (it holds a
``provenance.json``); earlier ``sweep_*.png`` plots are replaced.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from analyze import AnalysisResult, analyze_runs
from analyze.outputs import (
    PLOTS_DIR,
    PROVENANCE_NAME,
    atomic_write_bytes,
    check_output_dir,
    sorted_table,
    to_jsonable,
)
from analyze.stats import DEFAULT_SEMANTICS, REGISTRY, SCALAR_STATS, SEMANTICS, check_stats, check_thresholds
from capture.format import PHASES
from capture.reshape import CONV_METHODS, TIMESERIES_METHODS
from pipelines._plots import Line, Panel, panels_png

__all__ = [
    "SWEEP_NAME",
    "SweepConfig",
    "SweepConfigError",
    "load_config",
    "sweep",
    "sweep_plots",
]

SWEEP_NAME = "sweep.csv"
SCHEDULERS = ("synchronous", "threads", "processes")
_SOURCES = ("auto", "raw", "gram")
_ON_ERROR = ("raise", "skip")
_PLOT_PREFIX = "sweep_"


class SweepConfigError(ValueError):
    """A sweep configuration that cannot be used; the message is one line naming the key."""


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise SweepConfigError(
                f"{path}: reading TOML on Python 3.10 needs the 'tomli' package (pip install tomli)"
            ) from None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SweepConfigError(f"{path}: not valid TOML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError as exc:
        raise SweepConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None


def _strings(value: Any, key: str, allow_empty: bool = False) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise SweepConfigError(f"sweep config: {key!r} must be a string or a list of strings, got {value!r}")
    if not items and not allow_empty:
        raise SweepConfigError(f"sweep config: {key!r} must not be empty")
    if len(set(items)) != len(items):
        raise SweepConfigError(f"sweep config: {key!r} has duplicates: {list(items)}")
    return tuple(items)


def _string(value: Any, key: str, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str) or (choices is not None and value not in choices):
        valid = f"; valid values are: {', '.join(choices)}" if choices is not None else ""
        raise SweepConfigError(f"sweep config: {key!r} must be a string{valid}, got {value!r}")
    return value


def _names(value: Any, key: str, registry: Mapping[str, Any]) -> tuple[str, ...]:
    names = _strings(value, key)
    for name in names:
        if name not in registry:
            raise SweepConfigError(
                f"sweep config: {key!r}: unknown value {name!r}; valid values are: {', '.join(registry)}"
            )
    return names


def _checked(key: str, check: Any, *args: Any) -> Any:
    try:
        return check(*args)
    except ValueError as exc:
        raise SweepConfigError(f"sweep config: {key!r}: {' '.join(str(exc).split())}") from None


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return os.fspath(p if p.is_absolute() else base / p)


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep configuration (see the module docstring for the keys).

    Paths are resolved against the configuration's folder. Build one with :meth:`from_dict`
    or :func:`load_config`; :meth:`to_dict` gives the TOML keys back.

    Examples
    --------
    >>> cfg = SweepConfig.from_dict({"runs": ["a.zarr"], "thresholds": [0.9, 0.99]}, base_dir="/data")
    >>> cfg.runs, cfg.thresholds, cfg.output, cfg.cache_dir
    (('/data/a.zarr',), (0.9, 0.99), '/data/sweep-out', '/data/sweep-out/cache')
    >>> SweepConfig.from_dict({"runs": "a.zarr", "treshold": 0.9})
    Traceback (most recent call last):
    ...
    pipelines.sweep.SweepConfigError: sweep config: unknown key 'treshold'; valid keys are: runs, output, thresholds, conv_methods, timeseries_methods, stats, epochs, layers, phases, compat, scheduler, device, source, cache_dir, on_error, plots
    """

    runs: tuple[str, ...]
    output: str = "sweep-out"
    thresholds: tuple[float, ...] = (0.99,)
    conv_methods: tuple[str, ...] = ("channelwise",)
    timeseries_methods: tuple[str, ...] = ("last_timestep",)
    stats: tuple[str, ...] = ("lsat",)
    epochs: str | int | tuple[int, ...] | None = None
    layers: tuple[str, ...] | None = None
    phases: tuple[str, ...] = tuple(PHASES)
    compat: str | None = None
    scheduler: str = "threads"
    device: str = "cpu"
    source: str = "auto"
    cache_dir: str | None = None
    on_error: str = "raise"
    plots: bool = True

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The configuration keys, in documentation order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(
        cls, config: Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None
    ) -> SweepConfig:
        """Validate a configuration mapping; relative paths are taken from ``base_dir`` (default: cwd).

        Raises
        ------
        SweepConfigError
            An unknown key, a missing ``runs`` or a bad value; the message names the key.
        """
        if not isinstance(config, Mapping):
            raise SweepConfigError(f"sweep config: must be a table of keys, got {type(config).__name__}")
        valid = cls.keys()
        for key in config:
            if key not in valid:
                raise SweepConfigError(
                    f"sweep config: unknown key {key!r}; valid keys are: {', '.join(valid)}"
                )
        if "runs" not in config:
            raise SweepConfigError("sweep config: 'runs' is required (a list of run stores)")
        base = Path.cwd() if base_dir is None else Path(base_dir)
        c = dict(config)
        out: dict[str, Any] = {}
        out["runs"] = tuple(_resolve(r, base) for r in _strings(c["runs"], "runs"))
        out["output"] = _resolve(_string(c.get("output", cls.output), "output"), base)
        if not Path(out["output"]).name:
            raise SweepConfigError(f"sweep config: 'output' must name a folder, got {c.get('output')!r}")
        thresholds = c.get("thresholds", list(cls.thresholds))
        if isinstance(thresholds, bool) or not isinstance(thresholds, int | float | list | tuple):
            raise SweepConfigError(
                f"sweep config: 'thresholds' must be a number or a list of numbers in (0, 1], got {thresholds!r}"
            )
        out["thresholds"] = _checked("thresholds", check_thresholds, thresholds, "threshold")
        out["conv_methods"] = _names(
            c.get("conv_methods", list(cls.conv_methods)), "conv_methods", CONV_METHODS
        )
        out["timeseries_methods"] = _names(
            c.get("timeseries_methods", list(cls.timeseries_methods)),
            "timeseries_methods",
            TIMESERIES_METHODS,
        )
        stats = _checked(
            "stats", check_stats, _strings(c.get("stats", list(cls.stats)), "stats"), "statistic"
        )
        for s in stats:
            if s not in SCALAR_STATS:
                raise SweepConfigError(
                    f"sweep config: 'stats': {s!r} is not a scalar statistic; a sweep tabulates "
                    f"{', '.join(SCALAR_STATS)}"
                )
        out["stats"] = stats
        epochs = c.get("epochs")
        if isinstance(epochs, list):
            if not epochs or not all(
                isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in epochs
            ):
                raise SweepConfigError(
                    f"sweep config: 'epochs' list must hold non-negative integers, got {epochs!r}"
                )
            epochs = tuple(epochs)
        elif epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, str | int)):
            raise SweepConfigError(
                f"sweep config: 'epochs' must be 'all', 'last', a spec like '0,2,5-7', an integer or a list, "
                f"got {epochs!r}"
            )
        out["epochs"] = epochs
        out["layers"] = _strings(c["layers"], "layers") if "layers" in c else None
        phases = _strings(c.get("phases", list(cls.phases)), "phases")
        for p in phases:
            if p not in PHASES:
                raise SweepConfigError(
                    f"sweep config: 'phases': unknown phase {p!r}; valid values are: {', '.join(PHASES)}"
                )
        out["phases"] = phases
        compat = c.get("compat")
        if compat is not None:
            compat = _string(compat, "compat", SEMANTICS)
            compat = None if compat == DEFAULT_SEMANTICS else compat
        out["compat"] = compat
        scheduler = _string(c.get("scheduler", cls.scheduler), "scheduler")
        if scheduler not in SCHEDULERS and "://" not in scheduler:
            raise SweepConfigError(
                f"sweep config: 'scheduler' must be one of {', '.join(SCHEDULERS)} or a scheduler address "
                f"(tcp://host:port), got {scheduler!r}"
            )
        out["scheduler"] = scheduler
        device = _string(c.get("device", cls.device), "device")
        if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
            raise SweepConfigError(
                f"sweep config: 'device' must be 'cpu', 'cuda' or 'cuda:i', got {device!r}"
            )
        out["device"] = device
        out["source"] = _string(c.get("source", cls.source), "source", _SOURCES)
        cache = c.get("cache_dir")
        out["cache_dir"] = (
            os.fspath(Path(out["output"]) / "cache")
            if cache is None
            else _resolve(_string(cache, "cache_dir"), base)
        )
        out["on_error"] = _string(c.get("on_error", cls.on_error), "on_error", _ON_ERROR)
        plots = c.get("plots", cls.plots)
        if not isinstance(plots, bool):
            raise SweepConfigError(f"sweep config: 'plots' must be true or false, got {plots!r}")
        out["plots"] = plots
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as TOML-ready values (tuples as lists, unset optional keys left out)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


def load_config(config: str | os.PathLike[str] | Mapping[str, Any] | SweepConfig) -> SweepConfig:
    """A :class:`SweepConfig` from a TOML file (paths relative to its folder) or a mapping (cwd).

    Raises
    ------
    FileNotFoundError
        The TOML file does not exist.
    SweepConfigError
        Invalid TOML, an unknown key or a bad value.
    """
    if isinstance(config, SweepConfig):
        return config
    if isinstance(config, Mapping):
        return SweepConfig.from_dict(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such sweep configuration file")
    return SweepConfig.from_dict(_read_toml(path), base_dir=path.parent.absolute())


def _label(parts: list[tuple[bool, str]], fallback: str) -> str:
    shown = [text for varies, text in parts if varies]
    return ", ".join(shown) or fallback


def sweep_plots(
    table: pd.DataFrame,
    layer_order: Mapping[str, Sequence[str]],
    stats: Sequence[str],
    thresholds: Sequence[float],
    conv_methods: Sequence[str],
    timeseries_methods: Sequence[str],
) -> dict[str, bytes]:
    """Comparison figures of a sweep's table: file name -> PNG bytes.

    One figure per statistic and phase (``sweep_{stat}_{phase}.png``): the statistic per layer
    at each run's last epoch in ``table``, one panel per run, one line per combination of conv
    method, time-series method (one colour each) and, for thresholded statistics, threshold (one
    line style each). Layers without a conv or time-series reduction have the same value on the
    lines of every method.
    """
    out: dict[str, bytes] = {}
    runs = [r for r in layer_order if (table["run"] == r).any()]
    for stat in stats:
        spec = REGISTRY[stat]
        ts_list = list(thresholds) if spec.thresholded else [None]
        methods = [(cm, tm) for cm in conv_methods for tm in timeseries_methods]
        combos = [(cm, tm, t) for t in ts_list for cm, tm in methods]
        rows_stat = table[table["stat"] == stat]
        for phase in [p for p in PHASES if (rows_stat["phase"] == p).any()]:
            rows = rows_stat[rows_stat["phase"] == phase]
            panels = []
            for run in runs:
                sub = rows[rows["run"] == run]
                if sub.empty:
                    continue
                last = int(sub["epoch"].max())
                sub = sub[sub["epoch"] == last]
                layers = [lay for lay in layer_order[run] if (sub["layer"] == lay).any()]
                value = {
                    (
                        r.layer,
                        r.conv_method,
                        r.timeseries_method,
                        None if math.isnan(r.threshold) else r.threshold,
                    ): r.value
                    for r in sub.itertuples(index=False)
                }
                lines = []
                for cm, tm, t in combos:
                    label = _label(
                        [
                            (len(conv_methods) > 1, cm),
                            (len(timeseries_methods) > 1, tm),
                            (t is not None and len(ts_list) > 1, f"t={t!r}"),
                        ],
                        f"t={t!r}" if t is not None else cm,
                    )
                    values = [float(value.get((lay, cm, tm, t), math.nan)) for lay in layers]
                    style = ("-", "--", ":", "-.")[ts_list.index(t) % 4] if t is not None else "-"
                    lines.append(Line(label, values, style=style, color_index=methods.index((cm, tm))))
                panels.append(Panel(f"{run} (epoch {last})", layers, lines))
            if not panels:
                continue
            title = f"{stat}: {spec.description} ({phase}), last epoch of each run"
            ylim = (0.0, 1.05) if stat == "lsat" else None
            out[f"{_PLOT_PREFIX}{stat}_{phase}.png"] = panels_png(
                panels, stat, title, ylim=ylim, n_colors=len(methods)
            )
    return out


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("delve-pipeline", "numpy", "pandas", "torch", "zarr", "dask", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _table_csv(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False, lineterminator="\n").encode("utf-8")


def write_sweep(cfg: SweepConfig, result: AnalysisResult, table: pd.DataFrame) -> dict[str, list[Path]]:
    """Write ``sweep.csv``, the plots and ``provenance.json`` (last) into ``cfg.output``."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"table": [], "plots": [], "provenance": []}
    hashes: dict[str, str] = {}

    def put(relative: str, data: bytes, kind: str) -> None:
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        written[kind].append(atomic_write_bytes(path, data))
        hashes[relative] = hashlib.sha256(data).hexdigest()

    put(SWEEP_NAME, _table_csv(table), "table")
    plots_dir = out / PLOTS_DIR
    if plots_dir.is_dir():  # plots of an earlier sweep with other statistics or phases
        for stale in plots_dir.glob(f"{_PLOT_PREFIX}*.png"):
            stale.unlink()
    if cfg.plots:
        figures = sweep_plots(
            table, result.layer_order, cfg.stats, cfg.thresholds, cfg.conv_methods, cfg.timeseries_methods
        )
        for name, png in figures.items():
            put(f"{PLOTS_DIR}/{name}", png, "plots")
    provenance = {
        "format": "delve-pipeline.sweep",
        "format_version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "inputs": result.inputs,
        "options": result.options,
        "versions": _versions(),
        "rows": len(table),
        "failures": [asdict(f) for f in result.failures],
        "files": hashes,
    }
    text = json.dumps(to_jsonable(provenance), indent=2, sort_keys=True, allow_nan=False) + "\n"
    written["provenance"].append(atomic_write_bytes(out / PROVENANCE_NAME, text.encode("utf-8")))
    return written


def sweep(
    config: str | os.PathLike[str] | Mapping[str, Any] | SweepConfig, *, progress: bool = True
) -> pd.DataFrame:
    """Analyse every run with every threshold and method of ``config``; write the sweep's files.

    Parameters
    ----------
    config : path to a TOML file, mapping or SweepConfig
        See the module docstring for the keys. Relative paths in a TOML file are relative to
        its folder; in a mapping, to the current folder.
    progress : bool
        Show the reduction's progress bar on stderr.

    Returns
    -------
    pandas.DataFrame
        The combined tidy table (:data:`analyze.result.TABLE_COLUMNS`) as written to
        ``sweep.csv``, sorted as :func:`analyze.outputs.sorted_table` sorts.

    Raises
    ------
    SweepConfigError
        A bad configuration (the message names the key).
    FileExistsError
        The output folder is a file or a non-empty folder that is not an earlier output.
    analyze.AnalysisError, FileNotFoundError, capture.StoreFormatError
        From :func:`analyze.analyze_runs`.

    Examples
    --------
    >>> table = sweep({"runs": ["a.zarr", "b.zarr"], "thresholds": [0.9, 0.99],
    ...                "conv_methods": ["channelwise", "mean"]})  # doctest: +SKIP
    """
    cfg = load_config(config)
    check_output_dir(cfg.output)
    result = analyze_runs(
        list(cfg.runs),
        thresholds=cfg.thresholds,
        conv_methods=cfg.conv_methods,
        timeseries_methods=cfg.timeseries_methods,
        stats=cfg.stats,
        phases=cfg.phases,
        epochs=list(cfg.epochs) if isinstance(cfg.epochs, tuple) else cfg.epochs,
        layers=list(cfg.layers) if cfg.layers is not None else None,
        compat=cfg.compat,
        device=cfg.device,
        scheduler=cfg.scheduler,
        source=cfg.source,
        cache_dir=cfg.cache_dir,
        on_error=cfg.on_error,
        progress=progress,
    )
    table = sorted_table(result)
    write_sweep(cfg, result, table)
    return table
