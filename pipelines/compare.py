"""Compare two runs: the same statistics side by side, their difference, and a plot per statistic.

:func:`compare_runs` analyses two run stores with one :func:`analyze.analyze_runs` call (the
same options for both) and lines their values up by epoch, phase, layer, method, threshold and
statistic.

Output folder
-------------
``compare.csv``
    Columns :data:`COMPARE_COLUMNS`: ``epoch, phase, layer, conv_method, timeseries_method,
    threshold, stat, value_a, value_b, difference`` with ``difference = value_b - value_a``
    (NaN where either side is missing or not a number). Rows present in one run only (another
    layer, a later epoch) keep NaN on the other side. Scalars recorded with ``add_scalar``
    (accuracies, losses) have empty ``phase``, ``layer`` and method fields, as in ``stats.csv``.
    Run names are in ``provenance.json`` and the frame's ``attrs``.
``plots/compare_{stat}.png``
    For each scalar statistic: one panel per phase, the statistic per layer at each run's last
    epoch, run A solid and run B dashed, one colour per method / threshold combination.
``provenance.json``
    Written last: both inputs with their content hashes, every option, the SHA-256 of the files.

The folder appears, or replaces an earlier output as a whole, only once every file is written
(:class:`analyze.OutputFolder`). Reduced covariances are kept next to it, in ``OUT.cache``
(:func:`analyze.resolve_cache_dir`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from analyze import AnalysisOptions, AnalysisResult, OutputFolder, analyze_runs, resolve_cache_dir
from analyze.outputs import PLOTS_DIR, check_output_dir, sorted_table
from analyze.stats import REGISTRY
from capture.format import PHASES
from pipelines._plots import Line, Panel, panels_png

__all__ = ["COMPARE_COLUMNS", "COMPARE_NAME", "compare_runs", "compare_plots"]

COMPARE_NAME = "compare.csv"
#: Columns of the comparison table, in order.
COMPARE_COLUMNS = (
    "epoch",
    "phase",
    "layer",
    "conv_method",
    "timeseries_method",
    "threshold",
    "stat",
    "value_a",
    "value_b",
    "difference",
)
_KEY = COMPARE_COLUMNS[:7]


def _number(value: Any) -> float:
    if isinstance(value, bool | np.bool_):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _key(row: Any) -> tuple:
    t = row.threshold
    return (
        int(row.epoch),
        row.phase,
        row.layer,
        row.conv_method,
        row.timeseries_method,
        None if t is None or (isinstance(t, float) and math.isnan(t)) else float(t),
        row.stat,
    )


def side_by_side(table: pd.DataFrame, run_a: str, run_b: str) -> pd.DataFrame:
    """Two runs of a sorted tidy table as :data:`COMPARE_COLUMNS`: run A's rows in order, then B's extras.

    Examples
    --------
    >>> t = pd.DataFrame({"run": ["a", "b", "b"], "epoch": [0, 0, 0], "phase": ["train"] * 3,
    ...                   "layer": ["fc", "fc", "out"], "conv_method": ["none"] * 3,
    ...                   "timeseries_method": ["none"] * 3, "threshold": [0.99] * 3,
    ...                   "stat": ["lsat"] * 3, "value": [0.5, 0.75, 0.25]})
    >>> side_by_side(t, "a", "b")[["layer", "value_a", "value_b", "difference"]].to_string(index=False)
    'layer  value_a  value_b  difference\\n   fc      0.5     0.75        0.25\\n  out      NaN     0.25         NaN'
    """
    values: dict[str, dict[tuple, Any]] = {}
    order: list[tuple] = []
    for run in (run_a, run_b):
        values[run] = {}
        for row in table[table["run"] == run].itertuples(index=False):
            key = _key(row)
            values[run][key] = row.value
            if key not in values[run_a] or run == run_a:
                order.append(key)
    order = list(dict.fromkeys(order))
    rows = []
    for key in order:
        a = values[run_a].get(key, math.nan)
        b = values[run_b].get(key, math.nan)
        rows.append((*key[:5], math.nan if key[5] is None else key[5], key[6], a, b, _number(b) - _number(a)))
    frame = pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))
    frame["epoch"] = frame["epoch"].astype("int64")
    frame["threshold"] = frame["threshold"].astype("float64")
    frame["difference"] = frame["difference"].astype("float64")
    frame.attrs.update(run_a=run_a, run_b=run_b)
    return frame


def compare_plots(
    table: pd.DataFrame,
    run_a: str,
    run_b: str,
    layer_order: dict[str, Sequence[str]],
) -> dict[str, bytes]:
    """``compare_{stat}.png`` -> PNG bytes for each scalar statistic of a tidy table of two runs."""
    out: dict[str, bytes] = {}
    rows = table[table["phase"] != ""]
    stats = [s for s in dict.fromkeys(rows["stat"]) if s in REGISTRY and REGISTRY[s].kind == "scalar"]
    last = {
        r: int(rows.loc[rows["run"] == r, "epoch"].max()) for r in (run_a, run_b) if (rows["run"] == r).any()
    }
    layers = list(dict.fromkeys([*layer_order.get(run_a, []), *layer_order.get(run_b, [])]))
    for stat in stats:
        sub = rows[rows["stat"] == stat]
        combos = list(
            dict.fromkeys(
                (r.conv_method, r.timeseries_method, None if math.isnan(r.threshold) else r.threshold)
                for r in sub.itertuples(index=False)
            )
        )
        varies = [len({c[i] for c in combos}) > 1 for i in range(3)]
        panels = []
        for phase in [p for p in PHASES if (sub["phase"] == p).any()]:
            in_phase = sub[sub["phase"] == phase]
            shown = [lay for lay in layers if (in_phase["layer"] == lay).any()]
            lines = []
            for i, (cm, tm, t) in enumerate(combos):
                parts = [text for v, text in zip(varies, (cm, tm, f"t={t!r}"), strict=True) if v]
                suffix = f" ({', '.join(parts)})" if parts else ""
                for run, style, marker in ((run_a, "-", "o"), (run_b, "--", "s")):
                    if run not in last:
                        continue
                    sel = in_phase[
                        (in_phase["run"] == run)
                        & (in_phase["epoch"] == last[run])
                        & (in_phase["conv_method"] == cm)
                        & (in_phase["timeseries_method"] == tm)
                        & (in_phase["threshold"].isna() if t is None else in_phase["threshold"] == t)
                    ]
                    by_layer = dict(zip(sel["layer"], sel["value"], strict=True))
                    values = [_number(by_layer.get(lay, math.nan)) for lay in shown]
                    label = f"{run} (epoch {last[run]}){suffix}"
                    lines.append(Line(label, values, style=style, marker=marker, color_index=i))
            panels.append(Panel(phase, shown, lines))
        if panels:
            title = f"{stat}: {REGISTRY[stat].description}\n{run_a} (solid) vs {run_b} (dashed)"
            ylim = (0.0, 1.05) if stat == "lsat" else None
            out[f"compare_{stat}.png"] = panels_png(panels, stat, title, ylim=ylim, n_colors=len(combos))
    return out


def compare_runs(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: AnalysisOptions | Mapping[str, Any] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | bool | None = True,
    plots: bool = True,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """The same statistics of two runs side by side; writes ``compare.csv``, plots and provenance.

    Parameters
    ----------
    run_a, run_b : path or URL
        Run stores (``run_b - run_a`` is the difference).
    out : path
        Local output folder: absent, empty or an earlier output folder (it holds a ``provenance.json``).
    options : AnalysisOptions or mapping, optional
        What to compute, for both runs (default: :class:`analyze.AnalysisOptions`' defaults).
    cache_dir : path, True, False or None
        The covariance cache: ``True`` (default) ``OUT.cache`` next to ``out``, ``False`` / ``None``
        none (see :func:`analyze.resolve_cache_dir`).
    plots : bool
        Draw ``plots/compare_{stat}.png``.
    progress : bool
        Show the reduction's progress bar.
    storage_options : mapping, optional
        Options of the filesystem of a run at a URL (as for :func:`analyze.analyze_runs`).
    **kwargs
        Any :class:`analyze.AnalysisOptions` field (``thresholds``, ``stats``, ``layers``, ...),
        overriding ``options``.

    Returns
    -------
    pandas.DataFrame
        :data:`COMPARE_COLUMNS`; ``attrs["run_a"]`` / ``attrs["run_b"]`` hold the run names.

    Raises
    ------
    FileExistsError
        ``out`` is a file or a non-empty folder that is not an output folder.
    analyze.AnalysisError, FileNotFoundError, capture.StoreFormatError, TypeError
        From :func:`analyze.analyze_runs` (a ``TypeError`` for an unknown option).

    Examples
    --------
    >>> frame = compare_runs("narrow.zarr", "wide.zarr", "cmp", stats=["lsat"])  # doctest: +SKIP
    """
    if "runs" in kwargs:
        raise TypeError("compare_runs: 'runs' is not an option; pass run_a and run_b")
    check_output_dir(out)  # refuse a foreign folder before any work
    cache = resolve_cache_dir(out, cache_dir)
    result = analyze_runs(
        [os.fspath(run_a), os.fspath(run_b)],
        options,
        cache_dir=cache,
        progress=progress,
        storage_options=storage_options,
        **kwargs,
    )
    name_a, name_b = list(result.inputs)
    table = sorted_table(result)
    frame = side_by_side(table, name_a, name_b)
    _publish(out, frame, table, result, plots)
    return frame


def _publish(
    out: str | os.PathLike[str], frame: pd.DataFrame, table: pd.DataFrame, result: AnalysisResult, plots: bool
) -> None:
    """Publish ``compare.csv``, the plots and ``provenance.json`` (last) as the folder ``out``."""
    name_a, name_b = frame.attrs["run_a"], frame.attrs["run_b"]
    with OutputFolder(out, format="delve-pipeline.compare") as folder:
        folder.write(COMPARE_NAME, frame.to_csv(index=False, lineterminator="\n").encode("utf-8"))
        if plots:
            for name, png in compare_plots(table, name_a, name_b, result.layer_order).items():
                folder.write(f"{PLOTS_DIR}/{name}", png)
        folder.publish(
            {
                "run_a": name_a,
                "run_b": name_b,
                "inputs": result.inputs,
                "options": result.options,
                "rows": len(frame),
                "failures": [asdict(f) for f in result.failures],
            }
        )
