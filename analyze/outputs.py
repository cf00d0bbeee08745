"""Files an analysis leaves behind: the tidy table, delve-format CSVs, provenance and plots.

:func:`analysis_files` makes the files; :func:`publish_outputs` writes them through an
:class:`analyze.output_folder.OutputFolder` (a staging folder, so that the output folder appears,
or is replaced, only once every file is written; provenance last) and :func:`write_outputs`
writes them in place. Every file is written atomically (a temporary file in the same folder,
then :func:`os.replace`), so a concurrent or killed analysis never leaves a torn file behind.

Layout of an output folder
--------------------------
``stats.csv``
    The tidy table (:data:`analyze.result.TABLE_COLUMNS`), rows sorted by run, epoch,
    phase (scalars first, then ``train``, ``eval``), layer (first-seen order), conv method,
    time-series method, statistic (order asked) and threshold. Separator ``,``, no index,
    ``\\n`` line ends, floats in their shortest round-trip form (Python's ``repr``: a
    correctly rounding reader such as pandas >= 3 or ``float()`` gets the exact values
    back), NaN as an empty field. No timestamps: re-running the same analysis writes the same bytes.
``{run}_{conv}_{ts}_t{threshold}.csv``
    One delve-format CSV per run, conv method, time-series method and threshold, e.g.
    ``mnist_channelwise_last_timestep_t0.99.csv``. ``threshold`` is written as Python's
    ``repr`` of the float (``0.99``, ``1.0``), so distinct thresholds never share a name;
    the ``_t{threshold}`` part is left out when no statistic of the analysis takes a
    threshold. Characters other than letters, digits and ``._+=-`` in a run name become
    ``-``. See :func:`delve_frame` for the contents.
``plots/`` (unless ``plots=False``)
    For each run, conv method, time-series method, scalar statistic and phase:
    ``{stem}_{stat}_{phase}_profile.png`` (the statistic against layer position, one line
    per epoch, as delve's plot writer draws one epoch) and ``{stem}_{stat}_{phase}_heatmap.png``
    (epoch x layer), where ``stem`` is the delve CSV's stem for a thresholded statistic and
    ``{run}_{conv}_{ts}`` otherwise; and ``{run}_{conv}_{ts}_{phase}_spectrum_epoch{E}.png``,
    the eigenvalues of every layer in the last epoch ``E`` on a log scale.
``provenance.json``
    Written last: inputs with their content hashes, every option, package versions, the
    creation time, skipped layers, non-finite sample counts and the SHA-256 of every
    other file written.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyze.output_folder import (
    PROVENANCE_NAME,
    OutputFolder,
    atomic_write_bytes,
    check_output_dir,
    to_jsonable,
)
from analyze.result import TABLE_COLUMNS, AnalysisResult
from analyze.stats import REGISTRY

__all__ = [
    "DELVE_STATNAMES",
    "PROVENANCE_NAME",
    "PROVENANCE_FORMAT",
    "STATS_NAME",
    "PLOTS_DIR",
    "analysis_files",
    "analysis_provenance",
    "atomic_write_bytes",
    "check_output_dir",
    "delve_csv_name",
    "delve_frame",
    "delve_tables",
    "publish_outputs",
    "sorted_table",
    "table_csv",
    "to_jsonable",
    "write_analysis",
    "write_outputs",
]

#: Statistic -> the name delve 0.1.50 gives it in CSV columns (the last three are this project's).
DELVE_STATNAMES: dict[str, str] = {
    "lsat": "saturation",
    "idim": "intrinsic-dimensionality",
    "trc": "covariance-trace",
    "dtrc": "diagonal-trace",
    "det": "covariance-determinant",
    "logdet": "covariance-logdeterminant",
    "pr": "participation-ratio",
    "erank": "effective-rank",
}

STATS_NAME = "stats.csv"
PLOTS_DIR = "plots"
PROVENANCE_FORMAT = "delve-pipeline.analysis"

#: Method names that mean "this layer has no conv / time-series reduction".
_NEUTRAL_METHODS = frozenset({"", "none"})
_PHASE_ORDER = ("", "train", "eval")


# --------------------------------------------------------------------------- tidy table


def _rank(values: Iterable[Any], order: Sequence[Any]) -> list[tuple[int, Any]]:
    """Sort keys: known values by their position in ``order``, then the others by value."""
    position = {v: i for i, v in enumerate(order)}
    return [(position[v], "") if v in position else (len(position), str(v)) for v in values]


def _stat_order(result: AnalysisResult) -> list[str]:
    asked = [s for s in result.options.get("stats", ()) if isinstance(s, str)]
    return list(dict.fromkeys([*asked, *REGISTRY]))


def sorted_table(result: AnalysisResult) -> pd.DataFrame:
    """The tidy table in :data:`TABLE_COLUMNS` order, sorted deterministically.

    Rows are sorted by run, epoch, phase (scalars, ``train``, ``eval``), layer (in the run's
    first-seen order), conv method, time-series method, statistic (in the order asked) and
    threshold (none first); the index is reset.

    Examples
    --------
    >>> t = pd.DataFrame({"run": ["r", "r"], "epoch": [1, 0], "phase": ["train"] * 2,
    ...                   "layer": ["a"] * 2, "conv_method": ["none"] * 2,
    ...                   "timeseries_method": ["none"] * 2, "threshold": [0.99] * 2,
    ...                   "stat": ["lsat"] * 2, "value": [0.5, 0.25]})
    >>> sorted_table(AnalysisResult(t))["epoch"].tolist()
    [0, 1]
    """
    table = result.table
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"result.table lacks the column(s) {missing}; expected {list(TABLE_COLUMNS)}")
    table = table.loc[:, list(TABLE_COLUMNS)]
    if table.empty:
        return table.reset_index(drop=True)
    stat_rank = _rank(table["stat"], _stat_order(result))
    phase_rank = _rank(table["phase"], _PHASE_ORDER)
    layer_rank = [
        _rank([layer], result.layer_order.get(run, []))[0]
        for run, layer in zip(table["run"], table["layer"], strict=True)
    ]
    threshold = pd.to_numeric(table["threshold"], errors="coerce")
    keys = pd.DataFrame(
        {
            "run": table["run"].astype(str).to_numpy(),
            "epoch": pd.to_numeric(table["epoch"]).to_numpy(),
            "phase": [r[0] for r in phase_rank],
            "phase_name": [r[1] for r in phase_rank],
            "layer": [r[0] for r in layer_rank],
            "layer_name": [r[1] for r in layer_rank],
            "conv": table["conv_method"].astype(str).to_numpy(),
            "ts": table["timeseries_method"].astype(str).to_numpy(),
            "stat": [r[0] for r in stat_rank],
            "stat_name": [r[1] for r in stat_rank],
            "has_t": threshold.notna().to_numpy(),
            "t": threshold.fillna(0.0).to_numpy(),
        }
    )
    order = keys.sort_values(list(keys.columns), kind="mergesort").index
    return table.iloc[order].reset_index(drop=True)


def table_csv(table: pd.DataFrame) -> bytes:
    """A tidy table as the bytes of ``stats.csv`` (also ``sweep.csv``): ``,``, no index, ``\\n``.

    Examples
    --------
    >>> table_csv(pd.DataFrame({"a": [0.1 + 0.2], "b": [math.nan]}))
    b'a,b\\n0.30000000000000004,\\n'
    """
    return table.to_csv(index=False, lineterminator="\n").encode("utf-8")


# --------------------------------------------------------------------------- delve format


def _is_scalar_row(table: pd.DataFrame) -> pd.Series:
    return table["phase"].astype(str) == ""


def _methods(result: AnalysisResult, column: str, option: str) -> list[str]:
    asked = result.options.get(option)
    if asked:
        return [asked] if isinstance(asked, str) else [str(m) for m in asked]
    seen = [m for m in dict.fromkeys(result.table[column].astype(str)) if m not in _NEUTRAL_METHODS]
    return sorted(seen) or ["none"]


def _thresholds(result: AnalysisResult) -> list[float | None]:
    present = set(pd.to_numeric(result.table["threshold"], errors="coerce").dropna().astype(float))
    if not present:
        return [None]
    asked = result.options.get("thresholds") or ()
    asked = [asked] if isinstance(asked, int | float | str) else list(asked)
    ordered = [float(t) for t in asked if float(t) in present]
    return list(dict.fromkeys([*ordered, *sorted(present)]))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", str(name)) or "-"


def delve_csv_name(run: str, conv_method: str, timeseries_method: str, threshold: float | None) -> str:
    """File name of a delve-format CSV: ``{run}_{conv}_{ts}_t{threshold}.csv``.

    Examples
    --------
    >>> delve_csv_name("mnist", "channelwise", "last_timestep", 0.99)
    'mnist_channelwise_last_timestep_t0.99.csv'
    >>> delve_csv_name("runs/a b", "mean", "timestepwise", None)
    'runs-a-b_mean_timestepwise.csv'
    """
    stem = f"{_safe(run)}_{_safe(conv_method)}_{_safe(timeseries_method)}"
    if threshold is not None:
        stem += f"_t{float(threshold)!r}"
    return stem + ".csv"


@dataclass
class _Block:
    """The values of one delve CSV before they become a frame."""

    epochs: list[int]
    scalars: dict[str, list[Any]]
    stats: dict[tuple[str, str, str], list[Any]]  # (phase, layer, stat) -> values per epoch

    def column(self, phase: str, layer: str, stat: str) -> str:
        return f"{phase}-{DELVE_STATNAMES.get(stat, stat)}_{layer}"


def _first_seen(values: Iterable[Any], known: Sequence[Any] = ()) -> list[Any]:
    return list(dict.fromkeys([*known, *values]))


def _block(
    result: AnalysisResult, run: str, conv_method: str, timeseries_method: str, threshold: float | None
) -> _Block:
    table = result.table
    sub = table[table["run"] == run]
    epochs = sorted({int(e) for e in sub["epoch"]})
    row_of = {e: i for i, e in enumerate(epochs)}

    scalar_rows = sub[_is_scalar_row(sub)]
    names = _first_seen(scalar_rows["stat"], result.scalar_names.get(run, []))
    # The values as recorded (an int stays an int, as in delve's CSV), when the result has them.
    recorded = (getattr(result, "scalars", None) or {}).get(run, {})
    scalars: dict[str, list[Any]] = {}
    for name in names:
        rows = scalar_rows[scalar_rows["stat"] == name]
        if rows.empty:
            continue
        values: list[Any] = [np.nan] * len(epochs)
        for e, v in zip(rows["epoch"], rows["value"], strict=True):
            values[row_of[int(e)]] = recorded.get(int(e), {}).get(name, v)
        scalars[name] = values

    rows = sub[~_is_scalar_row(sub)]
    rows = rows[rows["stat"].map(lambda s: s in REGISTRY and REGISTRY[s].kind == "scalar")]
    conv = rows["conv_method"].astype(str)
    ts = rows["timeseries_method"].astype(str)
    t = pd.to_numeric(rows["threshold"], errors="coerce")
    keep = (conv.eq(conv_method) | conv.isin(_NEUTRAL_METHODS)) & (
        ts.eq(timeseries_method) | ts.isin(_NEUTRAL_METHODS)
    )
    keep &= t.isna() if threshold is None else (t.isna() | t.eq(threshold))
    rows = rows[keep].assign(
        _exact=(conv[keep].eq(conv_method).astype(int) + ts[keep].eq(timeseries_method).astype(int))
    )
    rows = rows.sort_values("_exact", ascending=False, kind="mergesort").drop_duplicates(
        ["epoch", "phase", "layer", "stat"], keep="first"
    )

    phases = sorted(set(rows["phase"]), key=lambda p: _rank([p], _PHASE_ORDER)[0])
    layers = _first_seen(rows["layer"], result.layer_order.get(run, []))
    stat_names = [s for s in _first_seen(rows["stat"], _stat_order(result)) if s in set(rows["stat"])]
    grouped = {key: g for key, g in rows.groupby(["phase", "layer", "stat"], sort=False)}
    stats: dict[tuple[str, str, str], list[Any]] = {}
    for phase in phases:
        for layer in layers:
            for stat in stat_names:
                g = grouped.get((phase, layer, stat))
                if g is None:
                    continue
                values = [np.nan] * len(epochs)
                for e, v in zip(g["epoch"], g["value"], strict=True):
                    values[row_of[int(e)]] = v
                if stat == "idim":
                    values = _as_ints(values)
                stats[(phase, layer, stat)] = values
    return _Block(epochs, scalars, stats)


def _as_ints(values: list[Any]) -> list[Any]:
    """delve writes ``idim`` as Python ints; keep floats when some value is NaN or fractional."""
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        return values
    if all(math.isfinite(v) and v.is_integer() for v in floats):
        return [int(v) for v in floats]
    return values


def delve_frame(
    result: AnalysisResult,
    run: str,
    conv_method: str,
    timeseries_method: str,
    threshold: float | None,
) -> pd.DataFrame:
    """One run's values laid out as delve 0.1.50's CSVWriter lays them out.

    One row per epoch of the run (index ``0..N-1``, as delve counts ``add_saturations``
    calls). Columns: the run's scalars (names as recorded, in recording order), then the
    ``train`` block, then the ``eval`` block; in each block layer by layer (first-seen
    order), and per layer the statistics in the order asked, named
    ``{phase}-{statname}_{layer}`` with :data:`DELVE_STATNAMES`. Only scalar statistics
    appear; a (phase, layer) without values has no column. A layer without a conv or
    time-series reduction (``conv_method`` / ``timeseries_method`` of ``""`` or ``"none"``)
    appears in the CSV of every method. ``idim`` is written as integers (as delve does)
    unless a value is NaN. Scalar columns take the table's values, or, when the result
    has an attribute ``scalars`` (``run -> epoch -> name -> value``, as recorded), those:
    a scalar recorded as an int is then written as delve writes it (``0``, not ``0.0``).

    ``frame.to_csv(path, sep=";")`` then gives delve's text for the same values.

    Examples
    --------
    >>> t = pd.DataFrame({"run": ["r"] * 3, "epoch": [0] * 3, "phase": ["", "train", "train"],
    ...                   "layer": ["", "fc", "fc"], "conv_method": ["", "none", "none"],
    ...                   "timeseries_method": ["", "none", "none"], "threshold": [np.nan, 0.99, 0.99],
    ...                   "stat": ["acc", "lsat", "idim"], "value": [0.5, 0.25, 1.0]})
    >>> r = AnalysisResult(t, options={"stats": ["lsat", "idim"]})
    >>> print(delve_frame(r, "r", "channelwise", "last_timestep", 0.99).to_csv(sep=";"), end="")
    ;acc;train-saturation_fc;train-intrinsic-dimensionality_fc
    0;0.5;0.25;1
    """
    block = _block(result, run, conv_method, timeseries_method, threshold)
    data: dict[str, list[Any]] = dict(block.scalars)
    for (phase, layer, stat), values in block.stats.items():
        data[block.column(phase, layer, stat)] = values
    return pd.DataFrame.from_dict(data)


def _runs(result: AnalysisResult) -> list[str]:
    return sorted({str(r) for r in result.table["run"]})


def delve_tables(result: AnalysisResult) -> dict[str, pd.DataFrame]:
    """Every delve-format CSV of a result: file name (:func:`delve_csv_name`) -> frame.

    One per run, conv method, time-series method and threshold (see :func:`delve_frame`).
    """
    out: dict[str, pd.DataFrame] = {}
    owner: dict[str, tuple[str, ...]] = {}
    for run in _runs(result):
        for conv in _methods(result, "conv_method", "conv_methods"):
            for ts in _methods(result, "timeseries_method", "timeseries_methods"):
                for t in _thresholds(result):
                    name = delve_csv_name(run, conv, ts, t)
                    key = (run, conv, ts, repr(t))
                    if name in owner and owner[name] != key:
                        raise ValueError(f"runs {owner[name][0]!r} and {run!r} would both write {name}")
                    owner[name] = key
                    out[name] = delve_frame(result, run, conv, ts, t)
    return out


def _delve_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(sep=";").encode("utf-8")


# --------------------------------------------------------------------------- provenance


def analysis_provenance(result: AnalysisResult) -> dict[str, Any]:
    """The fields of an analysis's ``provenance.json`` beyond those every output folder has.

    ``inputs`` (run name -> path and content hash), ``options`` (every analysis option),
    ``rows``, ``failures`` (skipped layers) and ``nonfinite_samples``; the output folder adds
    ``format``, ``created``, ``versions`` and ``files`` (see :class:`analyze.output_folder.OutputFolder`).
    """
    return {
        "inputs": result.inputs,
        "options": result.options,
        "rows": len(result.table),
        "failures": [asdict(f) for f in result.failures],
        "nonfinite_samples": [
            {
                **dict(
                    zip(
                        ("run", "epoch", "phase", "layer", "conv_method", "timeseries_method"), k, strict=True
                    )
                ),
                "count": n,
            }
            for k, n in sorted(result.nonfinite.items(), key=lambda kv: repr(kv[0]))
        ],
    }


# --------------------------------------------------------------------------- writing


def analysis_files(result: AnalysisResult, plots: bool = True) -> Iterator[tuple[str, str, bytes]]:
    """``(kind, relative path, bytes)`` of every file of an analysis but its provenance.

    ``kind`` is ``"stats"``, ``"delve_csv"`` or ``"plots"`` (see the module docstring for the names).
    """
    yield "stats", STATS_NAME, table_csv(sorted_table(result))
    for name, frame in delve_tables(result).items():
        yield "delve_csv", name, _delve_csv(frame)
    if plots:
        for relative, png in _plot_files(result):
            yield "plots", f"{PLOTS_DIR}/{relative}", png


def write_analysis(result: AnalysisResult, folder: OutputFolder, plots: bool = True) -> dict[str, list[Path]]:
    """Write an analysis's files and its provenance (last) into ``folder``; kind -> paths written."""
    written: dict[str, list[Path]] = {"stats": [], "delve_csv": [], "plots": [], "provenance": []}
    for kind, relative, data in analysis_files(result, plots):
        written[kind].append(folder.final_path(folder.write(relative, data)))
    written["provenance"].append(folder.publish(analysis_provenance(result)))
    return written


def write_outputs(
    result: AnalysisResult, out_dir: str | os.PathLike[str], plots: bool = True
) -> dict[str, list[Path]]:
    """Write an analysis's files under ``out_dir`` (created if needed), each atomically, in place.

    See the module docstring for the layout and the file names; :func:`publish_outputs` does
    the same through a staging folder.

    Parameters
    ----------
    result : AnalysisResult
        What :func:`analyze.analyze_runs` returned (or one built by hand).
    out_dir : str or PathLike
        The output folder. Files already there with other names are left alone.
    plots : bool, default True
        Also draw the plots (matplotlib, Agg canvas).

    Returns
    -------
    dict
        ``"stats"``, ``"delve_csv"``, ``"plots"`` and ``"provenance"`` -> the paths written.

    Examples
    --------
    >>> import tempfile
    >>> t = pd.DataFrame({"run": ["r"], "epoch": [0], "phase": ["train"], "layer": ["fc"],
    ...                   "conv_method": ["none"], "timeseries_method": ["none"],
    ...                   "threshold": [0.99], "stat": ["lsat"], "value": [0.5]})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     paths = write_outputs(AnalysisResult(t), tmp, plots=False)
    ...     [p.name for p in paths["delve_csv"]], (Path(tmp) / "stats.csv").read_text().splitlines()[1]
    (['r_none_none_t0.99.csv'], 'r,0,train,fc,none,none,0.99,lsat,0.5')
    """
    folder = OutputFolder(out_dir, format=PROVENANCE_FORMAT, staged=False)
    written = write_analysis(result, folder, plots)
    return {kind: [Path(out_dir) / p.relative_to(folder.target) for p in paths] for kind, paths in written.items()}


def publish_outputs(
    result: AnalysisResult, out_dir: str | os.PathLike[str], plots: bool = True
) -> dict[str, list[Path]]:
    """Like :func:`write_outputs`, but ``out_dir`` appears or is replaced only when complete.

    The files are written into a staging folder next to ``out_dir`` that is then renamed to
    ``out_dir`` (:class:`analyze.output_folder.OutputFolder`); an earlier output folder at
    ``out_dir`` (see :func:`check_output_dir`) is replaced as a whole, so no stale file of an
    earlier analysis survives. On any failure the staging folder is removed and ``out_dir`` is
    as it was.

    Returns
    -------
    dict
        As :func:`write_outputs`, with the final (absolute) paths.

    Raises
    ------
    FileExistsError
        ``out_dir`` is a file or a foreign folder, or another analysis published to it meanwhile.
    """
    with OutputFolder(out_dir, format=PROVENANCE_FORMAT) as folder:
        return write_analysis(result, folder, plots)


def _plot_files(result: AnalysisResult) -> Iterable[tuple[str, bytes]]:
    """``(file name, PNG bytes)`` of every plot (see the module docstring)."""
    from analyze import plots as _plots  # matplotlib only when plots are asked for

    thresholds = _thresholds(result)
    for run in _runs(result):
        for conv in _methods(result, "conv_method", "conv_methods"):
            for ts in _methods(result, "timeseries_method", "timeseries_methods"):
                base = delve_csv_name(run, conv, ts, None)[: -len(".csv")]
                blocks = {t: _block(result, run, conv, ts, t) for t in thresholds}
                done: set[tuple[str, str, str]] = set()
                for t, block in blocks.items():
                    stem = delve_csv_name(run, conv, ts, t)[: -len(".csv")]
                    phases = list(dict.fromkeys(p for p, _, _ in block.stats))
                    stat_names = list(dict.fromkeys(s for _, _, s in block.stats))
                    for stat in stat_names:
                        thresholded = REGISTRY[stat].thresholded
                        prefix = stem if thresholded else base
                        for phase in phases:
                            if (prefix, stat, phase) in done:
                                continue
                            done.add((prefix, stat, phase))
                            layers = [lay for p, lay, s in block.stats if p == phase and s == stat]
                            if not layers:
                                continue
                            values = np.array(
                                [[_float(v) for v in block.stats[(phase, lay, stat)]] for lay in layers]
                            ).T  # epochs x layers
                            label = DELVE_STATNAMES.get(stat, stat)
                            where = f"{run} | {conv} | {ts}" + (
                                f" | t={t!r}" if thresholded and t is not None else ""
                            )
                            title = f"{label} ({phase})\n{where}"
                            ylim = (0.0, 1.0) if stat == "lsat" else None
                            yield (
                                f"{prefix}_{stat}_{phase}_profile.png",
                                _plots.layer_profile_png(values, block.epochs, layers, label, title, ylim),
                            )
                            yield (
                                f"{prefix}_{stat}_{phase}_heatmap.png",
                                _plots.heatmap_png(values, block.epochs, layers, label, title),
                            )
                yield from _spectrum_plots(result, run, conv, ts, base, _plots)


def _spectrum_plots(
    result: AnalysisResult, run: str, conv: str, ts: str, base: str, plots_module: Any
) -> Iterable[tuple[str, bytes]]:
    keys = [
        k
        for k in result.spectra
        if k[0] == run
        and (k[4] == conv or k[4] in _NEUTRAL_METHODS)
        and (k[5] == ts or k[5] in _NEUTRAL_METHODS)
    ]
    order = result.layer_order.get(run, [])
    for phase in sorted({k[2] for k in keys}, key=lambda p: _rank([p], _PHASE_ORDER)[0]):
        in_phase = [k for k in keys if k[2] == phase]
        last = max(k[1] for k in in_phase)
        chosen: dict[str, tuple[Any, ...]] = {}
        for k in sorted(in_phase, key=lambda k: (k[4] != conv) + (k[5] != ts)):
            if k[1] == last:
                chosen.setdefault(k[3], k)
        layers = sorted(chosen, key=lambda lay: _rank([lay], order)[0])
        spectra = [np.asarray(result.spectra[chosen[lay]], dtype=np.float64) for lay in layers]
        title = f"eigenvalues ({phase}), epoch {last}\n{run} | {conv} | {ts}"
        yield (
            f"{base}_{phase}_spectrum_epoch{last}.png",
            plots_module.spectrum_png(spectra, layers, title),
        )


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
