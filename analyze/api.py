"""The analysis entry points: :func:`analyze_runs`, :func:`run_stats`, :func:`inspect_run`."""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from analyze.cache import CovarianceCache, run_fingerprint
from analyze.reduce import (
    ChunkReadError,
    Partial,
    RawSource,
    _one_blas_thread,
    gram_partial,
    merge_partials,
    raw_reduction_graph,
)
from analyze.result import TABLE_COLUMNS, AnalysisResult, LayerFailure
from analyze.selection import Selection, select_rows
from analyze.stats import (
    DELVE_SEMANTICS,
    REGISTRY,
    Spectrum,
    check_semantics,
    check_stats,
    check_thresholds,
    compute_stat,
    delve_embed,
    pca_embed,
    spectrum_of,
)
from capture.format import PHASES, LayerRecord
from capture.reshape import (
    check_conv_method,
    check_interpolation,
    check_timeseries_method,
    layout_of,
    matrix_width,
    methods_for_layout,
    to_matrix,
)
from capture.store import RunInfo, decode_stored, open_run

__all__ = ["AnalysisError", "analyze_runs", "run_stats", "inspect_run", "parse_epochs", "MAX_WIDTH"]

#: Widest covariance analysed: a 8192 x 8192 float64 matrix is 512 MiB, and several are in flight.
MAX_WIDTH = 8192
#: Largest number of samples embedded per (epoch, phase, layer).
EMBED_MAX_SAMPLES = 10_000
SCHEDULERS = ("synchronous", "threads", "processes")


class AnalysisError(ValueError):
    """Bad input to an analysis; the message is one line naming the argument, run or layer."""


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
    wanted: list[int] = []
    if isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            try:
                if part.lower() == "last" or part == "-1":
                    if not available:
                        raise AnalysisError("epochs: the run has no complete epoch")
                    wanted.append(available[-1])
                elif "-" in part.lstrip("-"):
                    lo, hi = part.split("-", 1)
                    wanted.extend(range(int(lo), int(hi) + 1))
                else:
                    wanted.append(int(part))
            except ValueError as exc:
                if isinstance(exc, AnalysisError):
                    raise
                raise AnalysisError(
                    f"epochs: cannot read {spec!r} (use e.g. 'all', 'last', '0,2,5-7')"
                ) from None
    elif isinstance(spec, (int, np.integer)):
        wanted = [available[-1]] if spec == -1 and available else [int(spec)]
    else:
        wanted = [int(e) for e in spec]
    missing = [e for e in wanted if e not in available]
    if missing:
        shown = f"{available[0]}-{available[-1]}" if available else "none"
        raise AnalysisError(f"epochs: epoch(s) {missing} out of range; complete epochs are {shown}")
    return sorted(set(wanted))


def _run_names(paths: Sequence[str]) -> list[str]:
    names = []
    for p in paths:
        base = Path(p.rstrip("/")).name
        name = base[: -len(".zarr")] if base.endswith(".zarr") else base
        candidate, i = name, 1
        while candidate in names:
            i += 1
            candidate = f"{name}-{i}"
        names.append(candidate)
    return names


def _layers_of(run: RunInfo, patterns: Sequence[str] | None) -> list[str]:
    if not patterns:
        return list(run.layers)
    return [n for n in run.layers if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _compute(objs: list[Any], scheduler: str, progress: bool, desc: str) -> list[Any]:
    """Compute dask objects with the scheduler, showing a progress bar."""
    if not objs:
        return []
    if scheduler in SCHEDULERS:
        if not progress:
            return list(dask.compute(*objs, scheduler=scheduler))
        from dask.callbacks import Callback

        class _Bar(Callback):
            def _start_state(self, dsk: Any, state: Any) -> None:
                self.bar = tqdm(total=len(state["ready"]) + len(state["waiting"]), desc=desc, unit="task")

            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
                self.bar.update(1)

            def _finish(self, dsk: Any, state: Any, errored: Any) -> None:
                self.bar.close()

        with _Bar():
            return list(dask.compute(*objs, scheduler=scheduler))
    from distributed import Client, as_completed

    with Client(scheduler, set_as_default=False) as client:
        futures = client.compute(objs)
        if progress:
            for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="layer"):
                pass
        return client.gather(futures)


def _finalize(partial: Partial | None, keep_cov: bool) -> dict[str, Any] | None:
    """Covariance and spectrum of a merged partial (runs inside the dask graph)."""
    if partial is None:
        return None
    n, mean, m2, nonfinite = partial
    with np.errstate(all="ignore"):
        cov = m2 / n
    spec = spectrum_of(cov, keep_cov=keep_cov)
    entry = {k: np.asarray(v) for k, v in spec.to_dict().items()}
    entry.update(count=np.asarray(n), nonfinite=np.asarray(nonfinite), mean=np.asarray(mean))
    return entry


def _merge_ranks(parts: list[Partial | None]) -> Partial | None:
    out = None
    for p in parts:
        out = merge_partials(out, p)
    return out


def inspect_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a run store holds: layers, shapes, epochs, phases, samples, modes and bytes.

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
    run = open_run(path)
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


def _validate(
    thresholds: Any,
    conv_methods: Any,
    timeseries_methods: Any,
    stats: Any,
    phases: Any,
    compat: str | None,
    device: str,
    scheduler: str,
    on_error: str,
) -> tuple:
    def as_tuple(v: Any) -> tuple:
        return (v,) if isinstance(v, (str, float, int)) else tuple(v)

    try:
        thresholds = check_thresholds(as_tuple(thresholds), argument="threshold")
        stats = check_stats(as_tuple(stats), argument="stats")
        semantics = check_semantics(compat or "default", argument="compat")
        conv_methods = tuple(check_conv_method(m, "conv_method") for m in as_tuple(conv_methods))
        timeseries_methods = tuple(
            check_timeseries_method(m, "timeseries_method") for m in as_tuple(timeseries_methods)
        )
    except ValueError as exc:
        raise AnalysisError(str(exc)) from None
    if not conv_methods or not timeseries_methods:
        raise AnalysisError("conv_method / timeseries_method: name at least one method")
    phases = as_tuple(phases)
    for p in phases:
        if p not in PHASES:
            raise AnalysisError(f"phase: unknown phase {p!r}; valid values are: {', '.join(PHASES)}")
    if on_error not in ("raise", "skip"):
        raise AnalysisError(f"on_error: must be 'raise' or 'skip', got {on_error!r}")
    if not (device == "cpu" or device.startswith("cuda")):
        raise AnalysisError(f"device: must be 'cpu' or 'cuda[:i]', got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise AnalysisError(f"device: {device!r} asked for but torch sees no CUDA device")
    if scheduler not in SCHEDULERS and "://" not in scheduler:
        raise AnalysisError(
            f"scheduler: {scheduler!r} is neither one of {', '.join(SCHEDULERS)} nor a scheduler address (tcp://host:port)"
        )
    return thresholds, stats, semantics, conv_methods, timeseries_methods, phases


def analyze_runs(
    runs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    thresholds: float | Sequence[float] = (0.99,),
    conv_methods: str | Sequence[str] = ("channelwise",),
    timeseries_methods: str | Sequence[str] = ("last_timestep",),
    stats: str | Sequence[str] = ("lsat", "idim"),
    phases: str | Sequence[str] = ("train", "eval"),
    epochs: str | int | Sequence[int] | None = None,
    layers: str | Sequence[str] | None = None,
    compat: str | None = None,
    device: str = "cpu",
    scheduler: str = "threads",
    *,
    interpolation: str | None = None,
    downsample: int | None = None,
    log_interval: int | None = None,
    max_samples: int | None = None,
    calls: tuple[int | None, int | None] | None = None,
    source: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    on_error: str = "raise",
    progress: bool = True,
    task_bytes: int = 16 * 2**20,
) -> AnalysisResult:
    """Reduce stored runs to covariances and compute statistics.

    Parameters
    ----------
    runs : path or list of paths
        Run stores written by :class:`capture.Recorder` (all ranks of each are merged).
    thresholds : float or sequence of float
        Variance thresholds in (0, 1] for ``lsat`` / ``idim``; all come from one eigen-decomposition.
    conv_methods, timeseries_methods : str or sequence of str
        Reductions of conv maps and sequences (see :mod:`capture.reshape`).
    stats : str or sequence of str
        Names from :data:`analyze.stats.STATS`.
    phases : sequence of {"train", "eval"}
    epochs : spec, optional
        See :func:`parse_epochs` (default: every complete epoch).
    layers : glob pattern(s), optional
        Layers to analyse; each pattern must match a layer.
    compat : {None, "delve-0.1.50"}
        ``"delve-0.1.50"`` reproduces delve 0.1.50's numbers: the covariance of the last recorded call
        of each epoch and phase, its idim rule, its embed, its rank-based reshaping.
    device : {"cpu", "cuda", "cuda:i"}
        Where the per-chunk Gram products run; eigen-decompositions are float64 on the CPU.
    scheduler : {"synchronous", "threads", "processes"} or address
        A dask scheduler, or a ``dask.distributed`` scheduler address (``tcp://host:port``).
    interpolation, downsample : optional
        Resize raw conv maps at analysis time (delve's rule: only maps larger than ``downsample``).
    log_interval, max_samples, calls :
        Sample selection with delve's rules (see :mod:`analyze.selection`); needs raw activations.
    source : {"auto", "raw", "gram"}
        Which stored data to reduce (``auto``: gram blocks when they serve the request, else raw).
    cache_dir : path, optional
        Results store of reduced covariances; re-runs with other thresholds or statistics read no
        activation.
    on_error : {"raise", "skip"}
        ``skip`` analyses the other layers and lists failures in :attr:`AnalysisResult.failures`.
    progress : bool
        Show a progress bar.
    task_bytes : int
        Decoded bytes per dask task (does not change the results).

    Returns
    -------
    AnalysisResult
        ``.table`` is the tidy table (:data:`analyze.result.TABLE_COLUMNS`).

    Raises
    ------
    AnalysisError
        Bad options, a glob that matches nothing, a reduction a gram-only store did not capture, ...
    FileNotFoundError, capture.StoreFormatError
        A missing or foreign store.
    """
    thresholds, stats, semantics, conv_methods, timeseries_methods, phases = _validate(
        thresholds, conv_methods, timeseries_methods, stats, phases, compat, device, scheduler, on_error
    )
    compat_mode = semantics == DELVE_SEMANTICS
    if interpolation is not None or downsample is not None:
        try:
            check_interpolation(interpolation, downsample)
        except ValueError as exc:
            raise AnalysisError(str(exc)) from None
        if interpolation is None:
            raise AnalysisError("downsample: set interpolation (e.g. 'bilinear') too")
    if source not in ("auto", "raw", "gram"):
        raise AnalysisError(f"source: must be 'auto', 'raw' or 'gram', got {source!r}")
    try:
        selection = Selection(
            log_interval=log_interval, max_samples=max_samples, calls=calls, last_call=compat_mode
        )
    except ValueError as exc:
        raise AnalysisError(str(exc)) from None
    paths = [os.fspath(runs)] if isinstance(runs, (str, os.PathLike)) else [os.fspath(r) for r in runs]
    if not paths:
        raise AnalysisError("runs: name at least one run store")
    patterns = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    opened = [open_run(p) for p in paths]
    names = _run_names(paths)
    if patterns:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for run in opened for n in run.layers):
                all_layers = sorted({n for run in opened for n in run.layers})
                raise AnalysisError(
                    f"layers: {pattern!r} matches no layer; layers are: {', '.join(all_layers)}"
                )
    cache = CovarianceCache(cache_dir)
    need_cov = "cov" in stats or "embed" in stats
    options = {
        "thresholds": list(thresholds),
        "conv_methods": list(conv_methods),
        "timeseries_methods": list(timeseries_methods),
        "stats": list(stats),
        "phases": list(phases),
        "epochs": epochs if epochs is None or isinstance(epochs, (str, int)) else list(epochs),
        "layers": patterns,
        "compat": compat,
        "device": device,
        "scheduler": scheduler,
        "interpolation": interpolation,
        "downsample": downsample,
        "log_interval": log_interval,
        "max_samples": max_samples,
        "calls": list(calls) if calls is not None else None,
        "source": source,
        "on_error": on_error,
    }
    result = AnalysisResult(table=pd.DataFrame(columns=list(TABLE_COLUMNS)), options=options)

    # 1. Plan: one "job" per (run, layer) listing the covariances it needs.
    jobs = []
    for run, name in zip(opened, names, strict=True):
        selected_epochs = parse_epochs(epochs, run.epochs)
        if not selected_epochs:
            msg = f"{run.path}: no complete epoch to analyse"
            if run.incomplete_epoch is not None:
                msg += f" (epoch {run.incomplete_epoch} is incomplete)"
            raise AnalysisError(msg)
        fingerprint = run_fingerprint(run)
        result.inputs[name] = {"path": os.path.abspath(run.path), "content_hash": fingerprint}
        layer_names = _layers_of(run, patterns)
        result.layer_order[name] = layer_names
        result.scalar_names[name] = list(
            dict.fromkeys(k for e in selected_epochs for k in run.scalars.get(e, {}))
        )
        result.scalars[name] = {e: dict(run.scalars[e]) for e in selected_epochs if e in run.scalars}
        for layer in layer_names:
            jobs.append((run, name, layer, selected_epochs, fingerprint))

    entries: dict[tuple, dict[str, Any] | None] = {}
    pending: dict[tuple, Any] = {}
    plans: dict[tuple, dict[str, Any]] = {}
    for run, name, layer, sel_epochs, fingerprint in jobs:
        try:
            plan = _plan_layer(
                run,
                name,
                layer,
                sel_epochs,
                phases,
                conv_methods,
                timeseries_methods,
                selection,
                compat_mode,
                interpolation,
                downsample,
                source,
                device,
                fingerprint,
            )
        except AnalysisError as exc:
            if on_error == "skip":
                result.failures.append(LayerFailure(name, layer, None, str(exc)))
                continue
            raise
        plans[(name, layer)] = plan
        misses = []
        for cov_key, cache_key in plan["cache_keys"].items():
            hit = cache.get(cache_key, need=("cov",) if need_cov else ())
            if hit is not None:
                entries[cov_key] = hit
            else:
                misses.append(cov_key)
        if misses:
            try:
                pending[(name, layer)] = _layer_graph(plan, misses, need_cov, task_bytes)
            except (KeyError, OSError, ValueError) as exc:  # a missing or damaged array
                error = ChunkReadError(
                    f"{run.path}: layer {layer!r}: epoch(s) {sel_epochs}: its stored arrays cannot be opened "
                    f"({type(exc).__name__}: {exc})"
                )
                if on_error == "skip":
                    result.failures.append(LayerFailure(name, layer, None, f"ChunkReadError: {error}"))
                    del plans[(name, layer)]
                    continue
                raise error from exc

    # 2. Reduce what the cache does not hold.
    keys = list(pending)
    if on_error == "raise":
        computed = _compute([pending[k] for k in keys], scheduler, progress, "reducing")
        for k, value in zip(keys, computed, strict=True):
            entries.update(value)
            _store(cache, plans[k], value)
    else:
        for k in keys:
            try:
                (value,) = _compute([pending[k]], scheduler, progress, f"reducing {k[1]}")
            except Exception as exc:  # noqa: BLE001 - reported per layer
                result.failures.append(LayerFailure(k[0], k[1], None, f"{type(exc).__name__}: {exc}"))
                continue
            entries.update(value)
            _store(cache, plans[k], value)

    # 3. Statistics.
    rows = []
    scalar_stats = [s for s in stats if REGISTRY[s].kind == "scalar"]
    for (name, layer), plan in plans.items():
        for (epoch, phase, method), layout_methods in plan["targets"].items():
            entry = entries.get((name, layer, epoch, phase, method))
            if entry is None:
                continue
            spec = Spectrum.from_dict(
                {
                    k: entry[k]
                    for k in ("raw", "trace", "det", "logdet_sign", "logabsdet", "vectors", "cov")
                    if k in entry
                }
            )
            nonfinite = int(entry["nonfinite"])
            for cm, tm in layout_methods:
                key = (name, epoch, phase, layer, cm, tm)
                result.spectra[key] = spec.eigenvalues.copy()
                if nonfinite:
                    result.nonfinite[key] = nonfinite
                if "cov" in stats and "cov" in entry:
                    result.covariances[key] = np.asarray(entry["cov"])
                for stat in scalar_stats:
                    ts = thresholds if REGISTRY[stat].thresholded else (None,)
                    for t in ts:
                        value = compute_stat(stat, spec, t, semantics)
                        rows.append(
                            (name, epoch, phase, layer, cm, tm, math.nan if t is None else t, stat, value)
                        )
            if nonfinite:
                warnings.warn(
                    f"{name}: layer {layer!r}, epoch {epoch}, {phase}: {nonfinite} sample(s) with NaN/Inf values; "
                    "its statistics are NaN",
                    RuntimeWarning,
                    stacklevel=2,
                )
    if "embed" in stats:
        _embeddings(result, plans, entries, compat_mode)
    for run, name in zip(opened, names, strict=True):
        for epoch in parse_epochs(epochs, run.epochs):
            for stat, value in run.scalars.get(epoch, {}).items():
                rows.append((name, epoch, "", "", "", "", math.nan, stat, value))
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table["epoch"] = table["epoch"].astype("int64")
    table["threshold"] = table["threshold"].astype("float64")
    result.table = table
    return result


def run_stats(
    runs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    thresholds: float | Sequence[float] = (0.99,),
    conv_methods: str | Sequence[str] = ("channelwise",),
    timeseries_methods: str | Sequence[str] = ("last_timestep",),
    stats: str | Sequence[str] = ("lsat", "idim"),
    phases: str | Sequence[str] = ("train", "eval"),
    epochs: str | int | Sequence[int] | None = None,
    layers: str | Sequence[str] | None = None,
    compat: str | None = None,
    device: str = "cpu",
    scheduler: str = "threads",
    **kwargs: Any,
) -> pd.DataFrame:
    """The tidy statistics table of :func:`analyze_runs` (same arguments).

    Returns
    -------
    pandas.DataFrame
        Columns ``run, epoch, phase, layer, conv_method, timeseries_method, threshold, stat, value``.
    """
    return analyze_runs(
        runs,
        thresholds,
        conv_methods,
        timeseries_methods,
        stats,
        phases,
        epochs,
        layers,
        compat,
        device,
        scheduler,
        **kwargs,
    ).table


# -- planning ------------------------------------------------------------------------------------
def _layout(rec: LayerRecord, compat: bool) -> str:
    return layout_of(rec.kind, len(rec.sample_shape) + 1, compat=compat)


def _plan_layer(
    run: RunInfo,
    name: str,
    layer: str,
    epochs: list[int],
    phases: Sequence[str],
    conv_methods: Sequence[str],
    timeseries_methods: Sequence[str],
    selection: Selection,
    compat: bool,
    interpolation: str | None,
    downsample: int | None,
    source: str,
    device: str,
    fingerprint: str,
) -> dict[str, Any]:
    rec = run.layer(layer)
    layout = _layout(rec, compat)
    methods = methods_for_layout(layout, conv_methods, timeseries_methods)
    has_raw = any(layer in p.layers and p.layers[layer].raw_array for p in run.ranks)
    has_gram = all(m in rec.gram for m in methods) and rec.layout == layout
    interp = interpolation if layout == "conv" else None
    wants_rows = selection.needs_rows or interp is not None
    if source == "gram" or (source == "auto" and has_gram and not wants_rows):
        if not has_gram:
            captured = ", ".join(sorted(rec.gram)) or "none"
            raise AnalysisError(
                f"{run.path}: layer {layer!r}: the store holds no gram moments for {', '.join(methods)} "
                f"(captured: {captured}); re-capture with these methods or in raw mode"
            )
        if wants_rows:
            raise AnalysisError(
                f"{run.path}: layer {layer!r}: log_interval / max_samples / calls / interpolation need raw "
                "activations, and this store holds gram moments only"
            )
        kind = "gram"
    else:
        if not has_raw:
            captured = ", ".join(sorted(rec.gram)) or "none"
            if source == "raw":
                reason = "source='raw' needs raw activations, and this store holds gram moments only"
            elif has_gram:  # the moments are there; the selection or interpolation is what needs rows
                reason = (
                    "log_interval / max_samples / calls / interpolation need raw activations, and this "
                    "store holds gram moments only"
                )
            else:
                missing = [m for m in methods if m not in rec.gram] or list(methods)
                reason = (
                    f"this gram-only store did not capture the {', '.join(missing)} reduction "
                    f"(captured: {captured}); analyse a captured method or re-capture in raw mode"
                )
            raise AnalysisError(f"{run.path}: layer {layer!r}: {reason}")
        kind = "raw"
    for method in methods:
        width = matrix_width(rec.sample_shape, layout, method, interpolation=interp, downsample=downsample)
        if width > MAX_WIDTH:
            hint = (
                "use another method or --interpolation with a smaller --downsample"
                if layout == "conv"
                else "leave the layer out (--layers) or use another --timeseries-method"
                if layout == "sequence"
                else "leave the layer out (--layers): no reduction applies to a flat output"
            )
            raise AnalysisError(
                f"{run.path}: layer {layer!r}: the {method!r} matrix is {width} columns wide; its covariance alone "
                f"needs {width * width * 8 / 2**30:.1f} GiB (limit {MAX_WIDTH} columns); {hint}"
            )
    targets: dict[tuple[int, str, str], list[tuple[str, str]]] = {}
    for epoch in epochs:
        for phase in phases:
            for method in methods:
                combos = [
                    (cm, tm)
                    for cm in conv_methods
                    for tm in timeseries_methods
                    if (layout != "conv" or cm == method) and (layout != "sequence" or tm == method)
                ]
                targets[(epoch, phase, method)] = combos
    cache_keys = {
        (name, layer, e, p, m): CovarianceCache.key(
            run=fingerprint,
            layer=layer,
            epoch=e,
            phase=p,
            method=m,
            layout=layout,
            source=kind,
            selection=selection.key(),
            interpolation=interp,
            downsample=downsample if interp else None,
        )
        for (e, p, m) in targets
    }
    return {
        "run": run,
        "name": name,
        "layer": layer,
        "layout": layout,
        "methods": methods,
        "kind": kind,
        "selection": selection,
        "interpolation": interp,
        "downsample": downsample if interp else None,
        "device": device,
        "targets": targets,
        "cache_keys": cache_keys,
    }


def _layer_graph(plan: dict[str, Any], misses: list[tuple], need_cov: bool, task_bytes: int) -> Any:
    """A delayed giving ``{cov_key: entry}`` for the missing covariances of one (run, layer)."""
    from dask import delayed

    run: RunInfo = plan["run"]
    layer, name = plan["layer"], plan["name"]
    wanted = {(e, p, m) for (_, _, e, p, m) in misses}
    groups_wanted = sorted({(e, p) for e, p, _ in wanted})
    methods = tuple(sorted({m for _, _, m in wanted}, key=plan["methods"].index))
    per_rank = []
    for part in run.ranks:
        if layer not in part.layers:
            continue
        rec = part.layers[layer]
        if plan["kind"] == "raw":
            raw = part.raw(layer)
            calls = part.calls
            groups = {}
            for e, p in groups_wanted:
                mask = (calls[:, 0] == e) & (calls[:, 1] == PHASES.index(p)) & (calls[:, 2] == rec.index)
                sel = calls[mask]
                ranges = select_rows(sel[:, 3], sel[:, 4], sel[:, 5], plan["selection"])
                if ranges:
                    groups[(e, p)] = ranges
            src = RawSource(
                store=run.path,
                array_path=f"{part.group.path}/{rec.raw_array}",
                stored_dtype=rec.stored_dtype or "float32",
                layout=plan["layout"],
                chunk_rows=raw.chunk_rows,
                rows=raw.rows,
                interpolation=plan["interpolation"],
                downsample=plan["downsample"],
                device=plan["device"],
                label=f"{run.path}: layer {layer!r}",
            )
            row_bytes = int(np.prod(rec.sample_shape, dtype=np.int64)) * raw.dtype.itemsize
            per_rank.append(
                raw_reduction_graph(src, groups, methods, task_bytes=task_bytes, row_bytes=row_bytes)
            )
        else:
            per_rank.append(
                delayed(_gram_partials, pure=True)(
                    run.path, part.rank, layer, groups_wanted, methods, plan["selection"].last_call
                )
            )
    return delayed(_finish_layer, pure=True)(per_rank, name, layer, sorted(wanted), need_cov)


def _gram_partials(
    path: str, rank: int, layer: str, groups: list[tuple[int, str]], methods: tuple[str, ...], last_call: bool
) -> dict[Any, Partial]:
    run = open_run(path)
    part = next(p for p in run.ranks if p.rank == rank)
    out: dict[Any, Partial] = {}
    kind = 1 if last_call else 0
    for method in methods:
        try:
            blocks = part.gram(layer, method)
        except Exception as exc:  # noqa: BLE001 - re-raised with its context
            raise ChunkReadError(
                f"{path}: layer {layer!r}: epoch(s) {sorted({e for e, _ in groups})}: the {method!r} gram "
                f"blocks of rank {rank} cannot be read: {type(exc).__name__}: {exc}"
            ) from exc
        for e, p in groups:
            mask = (
                (blocks.info_column("epoch") == e)
                & (blocks.info_column("phase") == PHASES.index(p))
                & (blocks.info_column("kind") == kind)
            )
            idx = np.flatnonzero(mask)
            nonfinite = int(blocks.info_column("nonfinite_rows")[idx].clip(min=0).sum())
            try:
                partial = gram_partial(blocks.read, idx, nonfinite)
            except Exception as exc:  # noqa: BLE001 - re-raised with its context
                raise ChunkReadError(
                    f"{path}: layer {layer!r}: epoch {e}, {p}: reading {method!r} gram blocks {idx.tolist()} "
                    f"of rank {rank} failed: {type(exc).__name__}: {exc}"
                ) from exc
            if partial is not None:
                out[((e, p), method)] = partial
    return out


def _finish_layer(
    per_rank: list[dict[Any, Partial]], name: str, layer: str, wanted: list[tuple], need_cov: bool
) -> dict[tuple, dict[str, Any] | None]:
    out = {}
    # One BLAS thread, as in the reduction tasks (layers finish in parallel): on a busy machine a
    # 2-thread OpenBLAS eigh of a 1024-wide covariance took 2.4-3.3 s, against 0.3 s on one thread.
    with _one_blas_thread():
        for e, p, m in wanted:
            merged = _merge_ranks([d.get(((e, p), m)) for d in per_rank])
            out[(name, layer, e, p, m)] = _finalize(merged, need_cov)
    return out


def _store(cache: CovarianceCache, plan: dict[str, Any], value: dict[tuple, dict[str, Any] | None]) -> None:
    for cov_key, entry in value.items():
        if entry is not None:
            cache.put(plan["cache_keys"][cov_key], entry)


def _embeddings(result: AnalysisResult, plans: dict, entries: dict, compat: bool) -> None:
    """2-D embeddings of the selected samples (raw sources only)."""
    for (name, layer), plan in plans.items():
        if plan["kind"] != "raw":
            continue
        run: RunInfo = plan["run"]
        for (epoch, phase, method), combos in plan["targets"].items():
            entry = entries.get((name, layer, epoch, phase, method))
            if entry is None or "cov" not in entry:
                continue
            mats = []
            budget = EMBED_MAX_SAMPLES
            for part in run.ranks:
                if layer not in part.layers or budget <= 0:
                    continue
                rec = part.layers[layer]
                calls = part.calls
                mask = (
                    (calls[:, 0] == epoch) & (calls[:, 1] == PHASES.index(phase)) & (calls[:, 2] == rec.index)
                )
                sel = calls[mask]
                raw = part.raw(layer)
                for a, b in select_rows(sel[:, 3], sel[:, 4], sel[:, 5], plan["selection"]):
                    x = decode_stored(np.asarray(raw.array[a:b]), raw.stored_dtype)
                    if x.dtype == np.float16:  # reduce as the covariance did (analyze.reduce)
                        x = x.astype(np.float32)
                    mat = to_matrix(
                        x,
                        plan["layout"],
                        method,
                        interpolation=plan["interpolation"],
                        downsample=plan["downsample"],
                    )
                    mats.append(np.asarray(mat, dtype=np.float64)[:budget])
                    budget -= len(mats[-1])
                    if budget <= 0:
                        break
            if not mats:
                continue
            samples = np.concatenate(mats)
            if compat:
                points = delve_embed(entry["cov"], samples)
            else:
                points = pca_embed(samples, entry["vectors"], mean=entry["mean"])
            for cm, tm in combos:
                result.embeddings[(name, epoch, phase, layer, cm, tm)] = points
