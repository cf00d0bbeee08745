"""Sweeps: re-analyse many runs over several thresholds and conv methods in one go.

:func:`sweep` takes a configuration (a TOML file or a dict), analyses every run with every
threshold, conv method and time-series method in one :func:`analyze.analyze_runs` call (all
thresholds come from one eigen-decomposition per covariance), keeps the reduced covariances in
a cache folder, and writes one combined tidy table plus comparison plots. Re-running a sweep
with other thresholds or statistics reads no activation: the covariances come from the cache.

Configuration (TOML)
--------------------
A configuration is ``runs``, ``output``, ``cache_dir`` and ``plots`` plus any field of
:class:`analyze.AnalysisOptions`, validated by it (same names, same defaults except ``stats``)::

    runs = ["runs/cnn.zarr", "runs/mlp.zarr"]   # required: run stores (folders or URLs)
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
    cache_dir = "sweep-cache"  # reduced covariances; default "<output>.cache"; false: no cache
    on_error = "raise"         # "skip": analyse the other layers and record the failures
    plots = true
    [storage_options]          # for runs at URLs (s3://...): options of their filesystem
    endpoint_url = "http://127.0.0.1:9000"

======================  ===========================  =======================================
key                     type                         default
======================  ===========================  =======================================
``runs``                string or list of strings    (required)
``output``              string                       ``"sweep-out"``
``thresholds``          number or list of numbers    ``[0.99]``
``conv_methods``        string or list of strings    ``["channelwise"]``
``timeseries_methods``  string or list of strings    ``["last_timestep"]``
``stats``               string or list of strings    ``["lsat"]`` (scalar statistics only)
``phases``              string or list of strings    ``["train", "eval"]``
``epochs``              string, integer or list      every complete epoch
``layers``              string or list of strings    every layer
``compat``              string                       ``"default"``
``device``              string                       ``"cpu"``
``scheduler``           string                       ``"threads"``
``interpolation``       string                       none
``downsample``          integer                      none
``log_interval``        integer                      none
``max_samples``         integer                      none
``calls``               list of two integers         none
``source``              string                       ``"auto"``
``on_error``            string                       ``"raise"``
``task_bytes``          integer                      16 MiB
``cache_dir``           string or ``false``          ``"<output>.cache"``
``storage_options``     table                        none
``plots``               boolean                      ``true``
======================  ===========================  =======================================

Relative paths (``runs``, ``output``, ``cache_dir``) are relative to the TOML file's folder
(to the current folder for a dict); a run may be a URL (``s3://bucket/runs/cnn.zarr``), read
with ``storage_options`` (as :func:`analyze.analyze_runs` takes them; ``provenance.json``
records them with credentials redacted). The output folder and the cache are local. An unknown key or a bad value raises
:class:`SweepConfigError` naming the key, with the reason :class:`analyze.AnalysisOptions`
gives (the command line and the Python API give the same reasons). Reading TOML needs
Python 3.11's ``tomllib``, or the ``tomli`` package on Python 3.10.

Output folder
-------------
``sweep.csv``
    The combined tidy table (:data:`analyze.result.TABLE_COLUMNS`: ``run, epoch, phase, layer,
    conv_method, timeseries_method, threshold, stat, value``), sorted and formatted as
    ``stats.csv`` (see :mod:`analyze.outputs`), so the same sweep writes the same bytes.
``plots/sweep_{stat}_{phase}.png``
    The statistic per layer at each run's last analysed epoch, one panel per run, one line per
    conv method / time-series method / threshold combination.
``provenance.json``
    Written last: the configuration, inputs with their content hashes, every analysis option,
    package versions, skipped layers and the SHA-256 of every file written.

The output folder must be absent, empty, or an earlier output folder (it holds a
``provenance.json``); it appears, or replaces the earlier one as a whole, only once every file
is written (:class:`analyze.OutputFolder`). The reduced covariances are kept next to it, in
``<output>.cache``, unless ``cache_dir`` says otherwise.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analyze import (
    AnalysisError,
    AnalysisOptions,
    AnalysisResult,
    OutputFolder,
    analyze_runs,
    resolve_cache_dir,
)
from analyze.outputs import PLOTS_DIR, check_output_dir, sorted_table, table_csv
from analyze.stats import REGISTRY, SCALAR_STATS
from capture.format import PHASES
from capture.storage import is_url, redact_options
from pipelines._plots import Line, Panel, panels_png

__all__ = [
    "SWEEP_NAME",
    "SWEEP_OPTIONS",
    "SweepConfig",
    "SweepConfigError",
    "load_config",
    "sweep",
    "sweep_plots",
]

SWEEP_NAME = "sweep.csv"
#: A sweep's analysis defaults: :class:`analyze.AnalysisOptions`' own, but ``lsat`` alone.
SWEEP_OPTIONS = AnalysisOptions(stats=("lsat",))
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


def _resolve(path: str, base: Path) -> str:
    if is_url(path):
        return path
    p = Path(path).expanduser()
    return os.fspath(p if p.is_absolute() else base / p)


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep configuration (see the module docstring for the keys).

    ``options`` holds the analysis options; paths are resolved against the configuration's
    folder, and ``cache_dir`` is ``None`` when caching is off. Build one with :meth:`from_dict`
    or :func:`load_config`; :meth:`to_dict` gives the TOML keys back.

    Examples
    --------
    >>> cfg = SweepConfig.from_dict({"runs": ["a.zarr"], "thresholds": [0.9, 0.99]}, base_dir="/data")
    >>> cfg.runs, cfg.options.thresholds, cfg.output, cfg.cache_dir
    (('/data/a.zarr',), (0.9, 0.99), '/data/sweep-out', '/data/sweep-out.cache')
    >>> SweepConfig.from_dict({"runs": "a.zarr", "thresholds": [0.9, 1.5]})
    Traceback (most recent call last):
    ...
    pipelines.sweep.SweepConfigError: sweep config: 'thresholds': '1.5' is not a number in (0, 1]
    """

    runs: tuple[str, ...]
    output: str = "sweep-out"
    options: AnalysisOptions = SWEEP_OPTIONS
    cache_dir: str | None = None
    plots: bool = True
    storage_options: Mapping[str, Any] | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The configuration keys, in documentation order."""
        return ("runs", "output", *AnalysisOptions.keys(), "cache_dir", "storage_options", "plots")

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
        runs = tuple(_resolve(r, base) for r in _strings(config["runs"], "runs"))
        output = _resolve(_string(config.get("output", cls.output), "output"), base)
        if not Path(output).name:
            raise SweepConfigError(f"sweep config: 'output' must name a folder, got {config.get('output')!r}")
        return cls(
            runs=runs,
            output=output,
            options=_analysis_options(config),
            cache_dir=_cache_dir(config.get("cache_dir", True), output, base),
            plots=_boolean(config.get("plots", cls.plots), "plots"),
            storage_options=_storage_options(config.get("storage_options")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The configuration as TOML-ready values (tuples as lists, unset options left out)."""
        options = {k: v for k, v in self.options.to_dict().items() if v is not None}
        cache = False if self.cache_dir is None else self.cache_dir
        storage = {"storage_options": dict(self.storage_options)} if self.storage_options else {}
        return {
            "runs": list(self.runs),
            "output": self.output,
            **options,
            "cache_dir": cache,
            **storage,
            "plots": self.plots,
        }


def _analysis_options(config: Mapping[str, Any]) -> AnalysisOptions:
    """The configuration's analysis options (validated by :class:`analyze.AnalysisOptions`)."""
    try:
        options = SWEEP_OPTIONS.replace(**{k: config[k] for k in AnalysisOptions.keys() if k in config})
    except AnalysisError as exc:
        raise SweepConfigError(f"sweep config: {exc.argument!r}: {' '.join(exc.reason.split())}") from None
    for s in options.stats:
        if s not in SCALAR_STATS:
            raise SweepConfigError(
                f"sweep config: 'stats': {s!r} is not a scalar statistic; a sweep tabulates {', '.join(SCALAR_STATS)}"
            )
    return options


def _cache_dir(value: Any, output: str, base: Path) -> str | None:
    """``true``: ``<output>.cache``; ``false``: no cache; a string: that folder."""
    if not isinstance(value, bool | str):
        raise SweepConfigError(
            f"sweep config: 'cache_dir' must be a folder (a string) or false, got {value!r}"
        )
    try:
        cache = resolve_cache_dir(output, _resolve(value, base) if isinstance(value, str) else value)
    except ValueError as exc:
        raise SweepConfigError(f"sweep config: 'cache_dir': {str(exc).split(': ', 1)[1]}") from None
    return None if cache is None else os.fspath(cache)


def _storage_options(value: Any) -> dict[str, Any] | None:
    """``storage_options``: a table of option names (or absent)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise SweepConfigError(
            f"sweep config: 'storage_options' must be a table of option names to values, got {value!r}"
        )
    return dict(value)


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise SweepConfigError(f"sweep config: {key!r} must be true or false, got {value!r}")
    return value


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


def write_sweep(cfg: SweepConfig, result: AnalysisResult, table: pd.DataFrame) -> dict[str, list[Path]]:
    """Publish ``sweep.csv``, the plots and ``provenance.json`` (last) as the folder ``cfg.output``.

    The folder appears, or replaces an earlier output as a whole, only once every file is written
    (:class:`analyze.OutputFolder`); on a failure it is as it was. Returns kind -> final paths.
    """
    options = cfg.options
    written: dict[str, list[Path]] = {"table": [], "plots": [], "provenance": []}
    with OutputFolder(cfg.output, format="delve-pipeline.sweep") as folder:
        written["table"].append(folder.final_path(folder.write(SWEEP_NAME, table_csv(table))))
        if cfg.plots:
            figures = sweep_plots(
                table,
                result.layer_order,
                options.stats,
                options.thresholds,
                options.conv_methods,
                options.timeseries_methods,
            )
            for name, png in figures.items():
                written["plots"].append(folder.final_path(folder.write(f"{PLOTS_DIR}/{name}", png)))
        config = cfg.to_dict()
        if "storage_options" in config:
            config["storage_options"] = redact_options(config["storage_options"])
        provenance = {
            "config": config,
            "inputs": result.inputs,
            "options": result.options,
            "rows": len(table),
            "failures": [asdict(f) for f in result.failures],
        }
        written["provenance"].append(folder.publish(provenance))
    return written


def sweep(
    config: str | os.PathLike[str] | Mapping[str, Any] | SweepConfig,
    *,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Analyse every run with every threshold and method of ``config``; write the sweep's files.

    Parameters
    ----------
    config : path to a TOML file, mapping or SweepConfig
        See the module docstring for the keys. Relative paths in a TOML file are relative to
        its folder; in a mapping, to the current folder.
    progress : bool
        Show the reduction's progress bar on stderr.
    storage_options : mapping, optional
        Options of the filesystem of runs at URLs, added to (and overriding) the configuration's
        ``storage_options``.

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
        The output folder is a file or a non-empty folder that is not an earlier output, or
        another sweep published to it meanwhile.
    analyze.AnalysisError, FileNotFoundError, capture.StoreFormatError
        From :func:`analyze.analyze_runs`.

    Examples
    --------
    >>> table = sweep({"runs": ["a.zarr", "b.zarr"], "thresholds": [0.9, 0.99],
    ...                "conv_methods": ["channelwise", "mean"]})  # doctest: +SKIP
    """
    cfg = load_config(config)
    check_output_dir(cfg.output)  # refuse a foreign folder before any work
    storage = {**(cfg.storage_options or {}), **(storage_options or {})} or None
    result = analyze_runs(
        list(cfg.runs), cfg.options, cache_dir=cfg.cache_dir, progress=progress, storage_options=storage
    )
    table = sorted_table(result)
    write_sweep(cfg, result, table)
    return table
