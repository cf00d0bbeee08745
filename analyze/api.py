"""The analysis entry points: :func:`analyze_runs`, :func:`run_stats`, :func:`inspect_run`.

An analysis runs in three steps, each a module of its own: planning (:mod:`analyze.plan`: which
runs, layers, sources, methods, epochs and cache keys), execution (:mod:`analyze.execute`: the
dask graph and the covariance cache) and tabulation (:mod:`analyze.tabulate`: the tidy table,
spectra and embeddings). What is computed is one :class:`analyze.AnalysisOptions`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from analyze.cache import CovarianceCache
from analyze.execute import reduce_covariances
from analyze.options import AnalysisError, AnalysisOptions, parse_epochs, resolve_options
from analyze.plan import MAX_WIDTH, plan_analysis
from analyze.result import AnalysisResult
from analyze.tabulate import tabulate
from capture.storage import options_for
from capture.store import open_run

__all__ = ["AnalysisError", "analyze_runs", "run_stats", "inspect_run", "parse_epochs", "MAX_WIDTH"]

Runs = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
OptionsLike = AnalysisOptions | Mapping[str, Any] | None


def _split(options: Any, positional: tuple[Any, ...]) -> tuple[OptionsLike, tuple[Any, ...]]:
    """``options`` when it is options, else the first of the historical positional values (thresholds)."""
    if options is None or isinstance(options, AnalysisOptions | Mapping):
        return options, positional
    return None, (options, *positional)


def analyze_runs(
    runs: Runs,
    options: OptionsLike = None,
    *positional: Any,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> AnalysisResult:
    """Reduce stored runs to covariances and compute statistics.

    Parameters
    ----------
    runs : path or URL, or a list of them
        Run stores written by :class:`capture.Recorder` (all ranks of each are merged): local
        folders or URLs (``s3://bucket/runs/a.zarr``, ``gs://...``, any fsspec URL).
    options : AnalysisOptions or mapping, optional
        What to compute (default: :class:`AnalysisOptions`' defaults).
    *positional
        Options by position, in the historical order ``thresholds, conv_methods,
        timeseries_methods, stats, phases, epochs, layers, compat, device, scheduler``
        (:data:`analyze.options.POSITIONAL`); when the second argument is not options, it is
        ``thresholds``.
    cache_dir : path, optional
        Results store of reduced covariances; re-runs with other thresholds or statistics read no
        activation. ``None``: no cache (the commands default to ``OUT.cache``, see
        :func:`analyze.output_folder.resolve_cache_dir`).
    progress : bool
        Show a progress bar.
    storage_options : mapping, optional
        Options of the fsspec filesystem of every run at a URL (for ``s3://``, s3fs's
        ``endpoint_url``, ``key``, ``secret``, ``anon``, ``client_kwargs``, ...); without them the
        storage library's own configuration applies (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
        ...). They say where the data is, not what is computed: they are not analysis options,
        enter no cache key, and ``result.inputs`` (``provenance.json``) records them with every
        credential redacted (:func:`capture.storage.redact_options`). Each task of the analysis
        opens the store itself, on whichever worker it runs.
    **kwargs
        Any :class:`AnalysisOptions` field (``thresholds``, ``stats``, ``compat``, ``source``,
        ``on_error``, ...), overriding ``options``.

    Returns
    -------
    AnalysisResult
        ``.table`` is the tidy table (:data:`analyze.result.TABLE_COLUMNS`).

    Raises
    ------
    AnalysisError
        Bad options, a glob that matches nothing, a reduction a gram-only store did not capture, ...
    TypeError
        An unknown keyword argument.
    FileNotFoundError, capture.StoreFormatError
        A missing or foreign store.

    See Also
    --------
    docs/analysing.md : worked examples (run by the test suite).
    """
    options, positional = _split(options, positional)
    resolved = resolve_options(options, *positional, **kwargs)
    plan = plan_analysis(runs, resolved, storage_options)
    reduction = reduce_covariances(plan, CovarianceCache(cache_dir), progress)
    return tabulate(plan, reduction)


def run_stats(runs: Runs, options: OptionsLike = None, *positional: Any, **kwargs: Any) -> pd.DataFrame:
    """The tidy statistics table of :func:`analyze_runs` (same arguments).

    Returns
    -------
    pandas.DataFrame
        Columns ``run, epoch, phase, layer, conv_method, timeseries_method, threshold, stat, value``.
    """
    return analyze_runs(runs, options, *positional, **kwargs).table


def inspect_run(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a run store holds: layers, shapes, epochs, phases, samples, modes and bytes.

    ``path`` is a folder or a URL; ``storage_options`` apply to a URL (as for :func:`analyze_runs`).

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from capture import Recorder
    >>> net = nn.Sequential(nn.Linear(4, 3))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with Recorder(net, f"{tmp}/r.zarr") as rec:
    ...         _ = net(torch.randn(5, 4)); _ = rec.end_epoch()
    ...     info = inspect_run(f"{tmp}/r.zarr")
    >>> info["epochs"], info["layers"][0]["name"], info["samples"][0]["samples"]
    ([0], '0', 5)
    """
    run = open_run(path, options_for(path, storage_options))
    layers = []
    for name in run.layers:
        rec = run.layer(name)
        layers.append(
            {
                "name": name,
                "type": rec.type,
                "kind": rec.kind,
                "layout": rec.layout,
                "sample_shape": list(rec.sample_shape),
                "stored_dtype": rec.stored_dtype,
                "raw": bool(rec.raw_array),
                "gram_methods": sorted(rec.gram),
            }
        )
    samples = [
        {"epoch": e, "phase": p, "layer": layer, "samples": n}
        for (e, p, layer), n in sorted(run.samples().items())
    ]
    return {
        "path": run.path,
        "format_version": run.meta.get("format_version"),
        "created": run.meta.get("created"),
        "modes": list(run.modes),
        "ranks": [p.rank for p in run.ranks],
        "layers": layers,
        "epochs": run.epochs,
        "incomplete_epoch": run.incomplete_epoch,
        "phases": run.phases(),
        "samples": samples,
        "scalars": {str(k): v for k, v in run.scalars.items()},
        "bytes": run.nbytes(),
        "options": run.options.to_dict(),
    }
