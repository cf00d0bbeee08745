"""Executing a plan: the dask graph that reduces stored data to covariances, and the cache around it.

:func:`reduce_covariances` serves each planned covariance from the cache when it can, builds one
delayed object per (run, layer) for the rest (raw rows through :func:`analyze.reduce.raw_reduction_graph`,
or stored gram moments), computes them with the chosen scheduler, finalises each merged partial
into a covariance and its eigen-decomposition, and stores the new entries in the cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
from tqdm.auto import tqdm

from analyze.cache import CovarianceCache
from analyze.options import SCHEDULERS
from analyze.plan import AnalysisPlan, CovarianceKey, LayerPlan
from analyze.reduce import (
    ChunkReadError,
    Partial,
    RawSource,
    gram_partial,
    merge_partials,
    raw_reduction_graph,
)
from analyze.result import LayerFailure
from analyze.selection import select_rows
from analyze.stats import PART_FIELDS, SCALAR_STATS, spectrum_needs, spectrum_of
from capture.format import PHASES
from capture.moments import one_blas_thread
from capture.store import RankPart, open_run

__all__ = ["Entry", "Reduction", "compute_with_progress", "raw_source", "reduce_covariances"]

#: A reduced covariance: its spectrum fields (``raw``, ``trace`` and the parts the statistics asked
#: for need: ``vectors``, ``det``, ``cov``, ...) plus ``count``, ``nonfinite`` and ``mean``, as numpy
#: arrays (what the cache stores).
Entry = dict[str, np.ndarray]


@dataclass
class Reduction:
    """What :func:`reduce_covariances` produced.

    ``entries`` maps each covariance it could reduce (or read from the cache) to its entry;
    ``unopened`` are layers whose stored arrays could not be opened and ``failed`` layers whose
    reduction failed (both only with ``on_error="skip"``).
    """

    entries: dict[CovarianceKey, Entry] = field(default_factory=dict)
    unopened: list[LayerFailure] = field(default_factory=list)
    failed: list[LayerFailure] = field(default_factory=list)


def reduce_covariances(plan: AnalysisPlan, cache: CovarianceCache, progress: bool) -> Reduction:
    """Every planned covariance, from the cache or reduced from the stores (see the module docstring).

    Raises
    ------
    ChunkReadError
        A stored array that cannot be opened or read (with ``on_error="raise"``).
    """
    options = plan.options
    need = _analysis_needs(options.stats, options.semantics, options.needs_covariance)
    fields = tuple(field for part in sorted(need) for field in PART_FIELDS[part])
    out = Reduction()
    pending: dict[tuple[str, str], tuple[LayerPlan, Any]] = {}
    for layer_plan in plan.layers:
        hits: dict[CovarianceKey, Entry] = {}
        misses: list[CovarianceKey] = []
        for target in layer_plan.targets:
            hit = cache.get(target.cache_key, need=fields)
            if hit is None:
                misses.append(target.key)
            else:
                hits[target.key] = hit
        if misses:
            try:
                graph = _layer_graph(layer_plan, misses, need, options.task_bytes)
            except (KeyError, OSError, ValueError) as exc:  # a missing or damaged array
                error = ChunkReadError(
                    f"{layer_plan.run.path}: layer {layer_plan.layer!r}: epoch(s) "
                    f"{sorted({k.epoch for k in misses})}: its stored arrays cannot be opened "
                    f"({type(exc).__name__}: {exc})"
                )
                if options.on_error != "skip":
                    raise error from exc
                out.unopened.append(
                    LayerFailure(layer_plan.name, layer_plan.layer, None, f"ChunkReadError: {error}")
                )
                continue
            pending[(layer_plan.name, layer_plan.layer)] = (layer_plan, graph)
        out.entries.update(hits)
    _compute_pending(pending, cache, options.scheduler, options.on_error, progress, out)
    return out


def _analysis_needs(stats: Iterable[str], semantics: str, covariance: bool) -> frozenset[str]:
    """The spectrum parts an analysis computes for each covariance (``need`` of :func:`spectrum_of`).

    What the statistics asked for need (``covariance``: keep the matrix, which the embeddings
    read), and always what every scalar statistic needs (the determinant: one LU, about a
    quarter of the eigenvalues' time), so that a cached covariance serves any later scalar
    statistic without reading the activations again. The eigenvectors (``eigh``, about 2.3x
    the time of the eigenvalues alone) are computed for the default ``embed`` only.

    Examples
    --------
    >>> sorted(_analysis_needs(["lsat"], "default", False))
    ['det']
    >>> sorted(_analysis_needs(["lsat", "embed"], "default", True))
    ['cov', 'det', 'vectors']
    """
    need = spectrum_needs(SCALAR_STATS) | spectrum_needs(stats, semantics)
    return (need | {"cov"}) if covariance else need


def _compute_pending(
    pending: dict[tuple[str, str], tuple[LayerPlan, Any]],
    cache: CovarianceCache,
    scheduler: str,
    on_error: str,
    progress: bool,
    out: Reduction,
) -> None:
    """Compute the layers' graphs (all at once, or one by one with ``on_error="skip"``); cache them."""
    keys = list(pending)
    if on_error == "raise":
        computed = compute_with_progress([pending[k][1] for k in keys], scheduler, progress, "reducing")
    else:
        computed = []
        for k in keys:
            try:
                (value,) = compute_with_progress([pending[k][1]], scheduler, progress, f"reducing {k[1]}")
            except Exception as exc:  # noqa: BLE001 - reported per layer
                out.failed.append(LayerFailure(k[0], k[1], None, f"{type(exc).__name__}: {exc}"))
                value = None
            computed.append(value)
    for k, value in zip(keys, computed, strict=True):
        if value is None:
            continue
        layer_plan = pending[k][0]
        cache_keys = {t.key: t.cache_key for t in layer_plan.targets}
        for cov_key, entry in value.items():
            if entry is not None:
                out.entries[cov_key] = entry
                cache.put(cache_keys[cov_key], entry)


def compute_with_progress(objs: list[Any], scheduler: str, progress: bool, desc: str) -> list[Any]:
    """Compute dask objects with a scheduler, with a progress bar (tqdm) named ``desc`` when ``progress``.

    ``scheduler`` is a local scheduler name (:data:`analyze.options.SCHEDULERS`: the bar counts
    tasks) or the address of a ``dask.distributed`` scheduler (the bar counts the objects).
    Returns the computed values, in the order of ``objs``.

    Examples
    --------
    >>> from dask import delayed
    >>> compute_with_progress([delayed(sum)([1, 2]), delayed(max)(3, 4)], "synchronous", False, "adding")
    [3, 4]
    """
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


# --------------------------------------------------------------------------- the graph of one layer


def _layer_graph(plan: LayerPlan, misses: list[CovarianceKey], need: frozenset[str], task_bytes: int) -> Any:
    """A delayed giving ``{CovarianceKey: entry}`` for the missing covariances of one (run, layer)."""
    from dask import delayed

    run, layer = plan.run, plan.layer
    groups_wanted = sorted({(k.epoch, k.phase) for k in misses})
    methods = tuple(sorted({k.method for k in misses}, key=plan.methods.index))
    per_rank = []
    for part in run.ranks:
        if layer not in part.layers:
            continue
        rec = part.layers[layer]
        if plan.source == "raw":
            calls = part.calls
            groups = {}
            for e, p in groups_wanted:
                mask = (calls[:, 0] == e) & (calls[:, 1] == PHASES.index(p)) & (calls[:, 2] == rec.index)
                sel = calls[mask]
                ranges = select_rows(sel[:, 3], sel[:, 4], sel[:, 5], plan.selection)
                if ranges:
                    groups[(e, p)] = ranges
            src, row_bytes = raw_source(
                run.path,
                part,
                layer,
                plan.layout,
                plan.interpolation,
                plan.downsample,
                plan.device,
                masks=plan.masks,
            )
            per_rank.append(
                raw_reduction_graph(src, groups, methods, task_bytes=task_bytes, row_bytes=row_bytes)
            )
        else:
            per_rank.append(
                delayed(_gram_partials, pure=True)(
                    run.path, part.rank, layer, groups_wanted, methods, plan.selection.last_call,
                    run.storage_options,
                )
            )
    return delayed(_finish_layer, pure=True)(per_rank, sorted(misses), need)


def raw_source(
    store: str,
    part: RankPart,
    layer: str,
    layout: str,
    interpolation: str | None = None,
    downsample: int | None = None,
    device: str = "cpu",
    *,
    masks: bool = False,
) -> tuple[RawSource, int]:
    """The raw array of ``layer`` in one rank group of a run store, and the bytes of one stored row.

    ``layout``, ``interpolation``, ``downsample`` and ``device`` say how its rows become matrices
    (:func:`capture.reshape.to_matrix`); ``store`` is the run's path or URL, named with the layer in
    errors. The source carries the part's storage options: the task that reads opens the store.
    ``masks``: apply the layer's stored token masks (if it has any).
    """
    rec, raw = part.layers[layer], part.raw(layer)
    mask_path = f"{part.group.path}/{rec.mask_array}" if masks and rec.mask_array else None
    src = RawSource(
        store=store,
        array_path=f"{part.group.path}/{rec.raw_array}",
        stored_dtype=rec.stored_dtype or "float32",
        layout=layout,
        chunk_rows=raw.chunk_rows,
        rows=raw.rows,
        interpolation=interpolation,
        downsample=downsample,
        device=device,
        label=f"{store}: layer {layer!r}",
        storage_options=dict(part.storage_options),
        mask_path=mask_path,
    )
    return src, int(np.prod(rec.sample_shape, dtype=np.int64)) * raw.dtype.itemsize


def _gram_partials(
    path: str,
    rank: int,
    layer: str,
    groups: list[tuple[int, str]],
    methods: tuple[str, ...],
    last_call: bool,
    storage_options: dict[str, Any] | None = None,
) -> dict[Any, Partial]:
    run = open_run(path, storage_options or None)  # opened here, in the worker: no client crosses
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
    per_rank: list[dict[Any, Partial]], wanted: list[CovarianceKey], need: frozenset[str]
) -> dict[CovarianceKey, Entry | None]:
    out = {}
    # One BLAS thread, as in the reduction tasks (layers finish in parallel): on a busy machine a
    # 2-thread OpenBLAS eigh of a 1024-wide covariance took 2.4-3.3 s, against 0.3 s on one thread.
    with one_blas_thread():
        for key in wanted:
            merged = None
            for d in per_rank:
                merged = merge_partials(merged, d.get(((key.epoch, key.phase), key.method)))
            out[key] = _finalize(merged, need)
    return out


def _finalize(partial: Partial | None, need: frozenset[str]) -> Entry | None:
    """Covariance and spectrum (with the parts in ``need``) of a merged partial (runs inside the dask graph)."""
    if partial is None:
        return None
    n, mean, m2, nonfinite = partial
    with np.errstate(all="ignore"):
        cov = m2 / n
    spec = spectrum_of(cov, need=need)
    entry = {k: np.asarray(v) for k, v in spec.to_dict().items()}
    entry.update(count=np.asarray(n), nonfinite=np.asarray(nonfinite), mean=np.asarray(mean))
    return entry
