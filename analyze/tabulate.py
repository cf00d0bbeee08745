"""Tabulating a reduction: the tidy statistics table, spectra, covariances and embeddings.

:func:`tabulate` turns the reduced covariances of a plan into an :class:`analyze.AnalysisResult`:
one row per statistic, threshold and (conv method, time-series method) combination a covariance
serves, the recorded scalars of each epoch, and (when asked) the covariances and 2-D embeddings.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from analyze.execute import Entry, Reduction
from analyze.plan import AnalysisPlan, CovarianceTarget, LayerPlan
from analyze.result import TABLE_COLUMNS, AnalysisResult
from analyze.selection import select_rows
from analyze.stats import REGISTRY, Spectrum, compute_stat, delve_embed, pca_embed
from capture.format import PHASES
from capture.reshape import to_matrix
from capture.store import decode_stored

__all__ = ["EMBED_MAX_SAMPLES", "tabulate"]

#: Largest number of samples embedded per (epoch, phase, layer).
EMBED_MAX_SAMPLES = 10_000
_SPECTRUM_FIELDS = ("raw", "trace", "det", "logdet_sign", "logabsdet", "vectors", "cov")


def tabulate(plan: AnalysisPlan, reduction: Reduction) -> AnalysisResult:
    """The result of an analysis from its plan and its reduced covariances.

    Warns
    -----
    RuntimeWarning
        For each covariance whose rows held NaN / Inf values (its statistics are NaN).
    """
    options = plan.options
    result = AnalysisResult(table=pd.DataFrame(columns=list(TABLE_COLUMNS)), options=options.to_dict())
    for run_plan in plan.runs:
        run = run_plan.run
        result.inputs[run_plan.name] = run_plan.record()
        if run.storage_options:
            result.storage_options[run_plan.name] = dict(run.storage_options)
        result.layer_order[run_plan.name] = list(run_plan.layers)
        result.scalar_names[run_plan.name] = list(
            dict.fromkeys(k for e in run_plan.epochs for k in run.scalars.get(e, {}))
        )
        result.scalars[run_plan.name] = {e: dict(run.scalars[e]) for e in run_plan.epochs if e in run.scalars}
    result.failures = sorted([*plan.failures, *reduction.unopened], key=plan.order) + reduction.failed

    rows: list[tuple[Any, ...]] = []
    for layer_plan in plan.layers:
        for target in layer_plan.targets:
            entry = reduction.entries.get(target.key)
            if entry is not None:
                rows.extend(_statistics(result, target, entry, plan))
    if "embed" in options.stats:
        for layer_plan in plan.layers:
            if layer_plan.source == "raw":
                _embed_layer(result, layer_plan, reduction.entries, options.delve_compat)
    for run_plan in plan.runs:
        for epoch in run_plan.epochs:
            for stat, value in run_plan.run.scalars.get(epoch, {}).items():
                rows.append((run_plan.name, epoch, "", "", "", "", math.nan, stat, value))
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table["epoch"] = table["epoch"].astype("int64")
    table["threshold"] = table["threshold"].astype("float64")
    result.table = table
    return result


def _statistics(
    result: AnalysisResult, target: CovarianceTarget, entry: Entry, plan: AnalysisPlan
) -> list[tuple[Any, ...]]:
    """The table rows of one covariance; records its spectra, covariances and non-finite count."""
    options = plan.options
    spec = Spectrum.from_dict({k: entry[k] for k in _SPECTRUM_FIELDS if k in entry})
    nonfinite = int(entry["nonfinite"])
    scalar_stats = [s for s in options.stats if REGISTRY[s].kind == "scalar"]
    rows = []
    for key in target.spectrum_keys():
        result.spectra[key] = spec.eigenvalues.copy()
        if nonfinite:
            result.nonfinite[key] = nonfinite
        if "cov" in options.stats and "cov" in entry:
            result.covariances[key] = np.asarray(entry["cov"])
        for stat in scalar_stats:
            for t in options.thresholds if REGISTRY[stat].thresholded else (None,):
                value = compute_stat(stat, spec, t, options.semantics)
                rows.append((*key, math.nan if t is None else t, stat, value))
    if nonfinite:
        k = target.key
        warnings.warn(
            f"{k.run}: layer {k.layer!r}, epoch {k.epoch}, {k.phase}: {nonfinite} sample(s) with NaN/Inf "
            "values; its statistics are NaN",
            RuntimeWarning,
            stacklevel=4,
        )
    return rows


def _embed_layer(result: AnalysisResult, plan: LayerPlan, entries: dict[Any, Entry], compat: bool) -> None:
    """2-D embeddings of the selected samples of one raw (run, layer)."""
    for target in plan.targets:
        entry = entries.get(target.key)
        if entry is None or "cov" not in entry:
            continue
        samples = _samples(plan, target.key.epoch, target.key.phase, target.key.method)
        if samples is None:
            continue
        if compat:
            points = delve_embed(entry["cov"], samples)
        else:
            points = pca_embed(samples, entry["vectors"], mean=entry["mean"])
        for key in target.spectrum_keys():
            result.embeddings[key] = points


def _samples(plan: LayerPlan, epoch: int, phase: str, method: str) -> np.ndarray | None:
    """Up to :data:`EMBED_MAX_SAMPLES` selected rows of one epoch and phase as a float64 matrix."""
    mats = []
    budget = EMBED_MAX_SAMPLES
    for part in plan.run.ranks:
        if plan.layer not in part.layers or budget <= 0:
            continue
        rec = part.layers[plan.layer]
        calls = part.calls
        mask = (calls[:, 0] == epoch) & (calls[:, 1] == PHASES.index(phase)) & (calls[:, 2] == rec.index)
        sel = calls[mask]
        raw = part.raw(plan.layer)
        masks = part.mask(plan.layer) if plan.masks else None
        for a, b in select_rows(sel[:, 3], sel[:, 4], sel[:, 5], plan.selection):
            x = decode_stored(np.asarray(raw.array[a:b]), raw.stored_dtype)
            if x.dtype == np.float16:  # reduce as the covariance did (analyze.reduce)
                x = x.astype(np.float32)
            mat = to_matrix(
                x,
                plan.layout,
                method,
                interpolation=plan.interpolation,
                downsample=plan.downsample,
                mask=None if masks is None else masks.read(a, b),
            )
            mats.append(np.asarray(mat, dtype=np.float64)[:budget])
            budget -= len(mats[-1])
            if budget <= 0:
                break
    return np.concatenate(mats) if mats else None
