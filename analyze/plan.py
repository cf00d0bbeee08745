"""Planning an analysis: which runs, layers, sources, methods, epochs and cache keys.

:func:`plan_analysis` opens the run stores' metadata (no activation is read) and decides, per
(run, layer), where its covariances come from (raw rows or gram moments), which reductions it
needs and under which cache key each covariance is kept. Everything the request gets wrong is
found here, before any work: a glob that matches nothing, an epoch out of range, a reduction a
gram-only store did not capture, a matrix too wide to analyse.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from analyze.cache import CovarianceCache, run_fingerprint
from analyze.options import AnalysisError, AnalysisOptions, parse_epochs
from analyze.result import LayerFailure, SpectrumKey
from analyze.selection import Selection
from capture.reshape import check_delve_methods, layout_of, masks_apply, matrix_width, methods_for_layout
from capture.storage import is_url, options_for, recorded_location, redact_options
from capture.store import RunInfo, open_run

__all__ = [
    "MAX_WIDTH",
    "AnalysisPlan",
    "check_storage_options",
    "CovarianceKey",
    "CovarianceTarget",
    "LayerPlan",
    "RunPlan",
    "plan_analysis",
    "run_names",
]

#: Widest covariance analysed: a 8192 x 8192 float64 matrix is 512 MiB, and several are in flight.
MAX_WIDTH = 8192


class CovarianceKey(NamedTuple):
    """One covariance to reduce: a layer's rows of one epoch and phase, reshaped by one method."""

    run: str
    layer: str
    epoch: int
    phase: str
    method: str


@dataclass(frozen=True)
class CovarianceTarget:
    """A covariance, the (conv method, time-series method) combinations it serves, its cache key."""

    key: CovarianceKey
    combos: tuple[tuple[str, str], ...]
    cache_key: str

    def spectrum_keys(self) -> list[SpectrumKey]:
        """The keys of the spectra (and statistics) this covariance gives."""
        k = self.key
        return [SpectrumKey(k.run, k.epoch, k.phase, k.layer, cm, tm) for cm, tm in self.combos]


@dataclass(frozen=True, eq=False)
class RunPlan:
    """A run store to analyse: its name in the results, epochs, content hash and layers."""

    run: RunInfo
    name: str
    epochs: tuple[int, ...]
    fingerprint: str
    layers: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        """The run's entry in a result's ``inputs`` (``provenance.json``): where, what, how opened.

        ``path`` is the absolute path or the URL (:func:`capture.storage.recorded_location`),
        ``content_hash`` the fingerprint; a run at a URL opened with storage options also lists
        them, credentials redacted (:func:`capture.storage.redact_options`).
        """
        entry: dict[str, Any] = {"path": recorded_location(self.run.path), "content_hash": self.fingerprint}
        if self.run.storage_options:
            entry["storage_options"] = redact_options(self.run.storage_options)
        return entry


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """How one (run, layer) is analysed.

    ``source`` is ``"raw"`` (reduce the stored rows) or ``"gram"`` (merge stored moments);
    ``methods`` are the reductions its layout needs; ``targets`` the covariances to compute;
    ``masks``: the raw rows' stored token masks apply (see :func:`capture.reshape.matrix_source`).
    """

    run: RunInfo
    name: str
    layer: str
    layout: str
    methods: tuple[str, ...]
    source: str
    selection: Selection
    interpolation: str | None
    downsample: int | None
    device: str
    targets: tuple[CovarianceTarget, ...]
    masks: bool = False


@dataclass(frozen=True, eq=False)
class AnalysisPlan:
    """Everything an analysis will compute; ``failures`` are layers skipped with ``on_error="skip"``."""

    options: AnalysisOptions
    runs: tuple[RunPlan, ...]
    layers: tuple[LayerPlan, ...]
    failures: tuple[LayerFailure, ...]

    def order(self, failure: LayerFailure) -> int:
        """Position of a failure's (run, layer) in the plan (for a stable report order)."""
        pairs = [(r.name, layer) for r in self.runs for layer in r.layers]
        pair = (failure.run, failure.layer)
        return pairs.index(pair) if pair in pairs else len(pairs)


def run_names(paths: Sequence[str]) -> list[str]:
    """Names of run stores in results: the folder name without ``.zarr``, made unique.

    Examples
    --------
    >>> run_names(["a/cnn.zarr", "b/cnn.zarr", "mlp"])
    ['cnn', 'cnn-2', 'mlp']
    """
    names: list[str] = []
    for p in paths:
        base = Path(p.rstrip("/")).name
        name = base[: -len(".zarr")] if base.endswith(".zarr") else base
        candidate, i = name, 1
        while candidate in names:
            i += 1
            candidate = f"{name}-{i}"
        names.append(candidate)
    return names


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise AnalysisError.invalid("device", f"{device!r} asked for but torch sees no CUDA device")


def check_storage_options(paths: Sequence[str], storage_options: Any) -> dict[str, Any] | None:
    """``storage_options`` checked against the runs: a mapping of names, and some run is a URL.

    Raises
    ------
    AnalysisError
        Not a mapping with string keys, or given when every run is a local path.
    """
    if storage_options is None:
        return None
    if not isinstance(storage_options, Mapping) or not all(isinstance(k, str) for k in storage_options):
        raise AnalysisError.invalid(
            "storage_options", f"must be a mapping of option names to values, got {storage_options!r}"
        )
    if storage_options and not any(is_url(p) for p in paths):
        raise AnalysisError.invalid(
            "storage_options",
            "storage options apply to stores at URLs (s3://, gs://, memory://, ...), and every run here "
            "is a local path",
        )
    return dict(storage_options)


def _open_runs(paths: list[str], options: AnalysisOptions, storage_options: Any = None) -> list[RunPlan]:
    storage_options = check_storage_options(paths, storage_options)
    opened = [open_run(p, options_for(p, storage_options)) for p in paths]
    patterns = options.layers or ()
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for run in opened for n in run.layers):
            all_layers = sorted({n for run in opened for n in run.layers})
            raise AnalysisError.invalid(
                "layers", f"{pattern!r} matches no layer; layers are: {', '.join(all_layers)}"
            )
    plans = []
    for run, name in zip(opened, run_names(paths), strict=True):
        epochs = parse_epochs(options.epochs, run.epochs)
        if not epochs:
            msg = f"{run.path}: no complete epoch to analyse"
            if run.incomplete_epoch is not None:
                msg += f" (epoch {run.incomplete_epoch} is incomplete)"
            raise AnalysisError(msg)
        layers = [n for n in run.layers if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        plans.append(RunPlan(run, name, tuple(epochs), run_fingerprint(run), tuple(layers)))
    return plans


def plan_analysis(
    runs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    options: AnalysisOptions,
    storage_options: Mapping[str, Any] | None = None,
) -> AnalysisPlan:
    """Plan the analysis of ``runs`` with ``options`` (reads the stores' metadata only).

    ``runs`` are paths or URLs; ``storage_options`` apply to every URL among them (see
    :func:`capture.storage.options_for`) and travel with the opened runs, not with ``options``.

    Raises
    ------
    AnalysisError
        No run, a glob that matches nothing, an epoch out of range, no complete epoch, a CUDA
        device torch does not see, or (with ``on_error="raise"``) a layer that cannot be analysed.
    FileNotFoundError, capture.StoreFormatError
        A missing or foreign store.
    """
    _check_device(options.device)
    if options.delve_compat:
        try:
            check_delve_methods(options.timeseries_methods)
        except ValueError as exc:
            raise AnalysisError.invalid("timeseries_methods", str(exc).split(": ", 1)[1]) from None
    paths = [os.fspath(runs)] if isinstance(runs, str | os.PathLike) else [os.fspath(r) for r in runs]
    if not paths:
        raise AnalysisError.invalid("runs", "name at least one run store")
    run_plans = _open_runs(paths, options, storage_options)
    layers, failures = [], []
    for run_plan in run_plans:
        for layer in run_plan.layers:
            try:
                layers.append(_plan_layer(run_plan, layer, options))
            except AnalysisError as exc:
                if options.on_error != "skip":
                    raise
                failures.append(LayerFailure(run_plan.name, layer, None, str(exc)))
    return AnalysisPlan(options, tuple(run_plans), tuple(layers), tuple(failures))


def _source(run: RunInfo, layer: str, layout: str, methods: tuple[str, ...], options: AnalysisOptions) -> str:
    """``"raw"`` or ``"gram"``: the stored data that serves the request, or an :class:`AnalysisError`."""
    rec = run.layer(layer)
    has_raw = any(layer in p.layers and p.layers[layer].raw_array for p in run.ranks)
    has_gram = all(m in rec.gram for m in methods) and rec.layout == layout
    wants_rows = options.selection.needs_rows or (options.interpolation is not None and layout == "conv")
    captured = ", ".join(sorted(rec.gram)) or "none"
    rows_only = (
        "log_interval / max_samples / calls / interpolation need raw activations, and this store holds gram "
        "moments only"
    )
    if options.source == "gram" or (options.source == "auto" and has_gram and not wants_rows):
        if not has_gram:
            raise AnalysisError(
                f"{run.path}: layer {layer!r}: the store holds no gram moments for {', '.join(methods)} "
                f"(captured: {captured}); re-capture with these methods or in raw mode"
            )
        if wants_rows:
            raise AnalysisError(f"{run.path}: layer {layer!r}: {rows_only}")
        return "gram"
    if has_raw:
        return "raw"
    if options.source == "raw":
        reason = "source='raw' needs raw activations, and this store holds gram moments only"
    elif has_gram:  # the moments are there; the selection or interpolation is what needs rows
        reason = rows_only
    else:
        missing = [m for m in methods if m not in rec.gram] or list(methods)
        reason = (
            f"this gram-only store did not capture the {', '.join(missing)} reduction "
            f"(captured: {captured}); analyse a captured method or re-capture in raw mode"
        )
    raise AnalysisError(f"{run.path}: layer {layer!r}: {reason}")


def _check_width(
    run: RunInfo,
    layer: str,
    layout: str,
    methods: tuple[str, ...],
    interp: str | None,
    downsample: int | None,
) -> None:
    rec = run.layer(layer)
    for method in methods:
        width = matrix_width(rec.sample_shape, layout, method, interpolation=interp, downsample=downsample)
        if width <= MAX_WIDTH:
            continue
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


def _plan_layer(run_plan: RunPlan, layer: str, options: AnalysisOptions) -> LayerPlan:
    run = run_plan.run
    rec = run.layer(layer)
    layout = layout_of(rec.kind, len(rec.sample_shape) + 1, compat=options.delve_compat)
    methods = methods_for_layout(layout, options.conv_methods, options.timeseries_methods)
    source = _source(run, layer, layout, methods, options)
    interp = options.interpolation if layout == "conv" else None
    downsample = options.downsample if interp else None
    _check_width(run, layer, layout, methods, interp, downsample)
    selection = options.selection
    # Stored token masks apply to raw rows (gram moments were masked in the hook); delve 0.1.50 has none.
    masks = (
        source == "raw"
        and not options.delve_compat
        and masks_apply(layout, methods)
        and any(layer in p.layers and p.layers[layer].mask_array for p in run.ranks)
    )
    targets = []
    for epoch in run_plan.epochs:
        for phase in options.phases:
            for method in methods:
                combos = tuple(
                    (cm, tm)
                    for cm in options.conv_methods
                    for tm in options.timeseries_methods
                    if (layout != "conv" or cm == method) and (layout != "sequence" or tm == method)
                )
                cache_key = CovarianceCache.key(
                    run=run_plan.fingerprint,
                    layer=layer,
                    epoch=epoch,
                    phase=phase,
                    method=method,
                    layout=layout,
                    source=source,
                    selection=selection.key(),
                    interpolation=interp,
                    downsample=downsample,
                    # the cache keys of what no mask changes are those of format 1.1
                    **({"masks": True} if masks and masks_apply(layout, [method]) else {}),
                )
                key = CovarianceKey(run_plan.name, layer, epoch, phase, method)
                targets.append(CovarianceTarget(key, combos, cache_key))
    return LayerPlan(
        run=run,
        name=run_plan.name,
        layer=layer,
        layout=layout,
        methods=methods,
        source=source,
        selection=selection,
        interpolation=interp,
        downsample=downsample,
        device=options.device,
        targets=tuple(targets),
        masks=masks,
    )
