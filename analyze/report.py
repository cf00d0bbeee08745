"""One self-contained HTML report of an analysis, for people: ``report.html``.

:func:`report_html` lays an :class:`analyze.AnalysisResult` out as one page: what each run store
holds (as ``delve-analyze inspect`` shows it), the saturation profile of every run (``lsat``
against layer, one line per epoch), the epoch x layer heatmap of every statistic and phase, the
eigen-spectra of the last epoch, the representational similarity matrices when a similarity
table is given, and the options and package versions of the analysis. The figures are drawn by
:mod:`analyze.plots` from the result's own values (nothing is computed again) and embedded as PNG
data URIs; the page has an inline style sheet, no script and no remote resource, so it opens from
disk anywhere and can be mailed as one file. The PNG files of ``delve-analyze stats`` stay for papers.

:func:`write_report` adds the report to an :class:`analyze.OutputFolder` (``stats --report``);
:func:`publish_report` writes a folder of its own (``delve-analyze report``): ``report.html`` and
``provenance.json``, staged like every output folder.

The same result, similarity table, descriptions, versions and creation time give the same bytes.

Examples
--------
>>> import pandas as pd
>>> from analyze.result import AnalysisResult
>>> t = pd.DataFrame({"run": ["r"] * 2, "epoch": [0, 1], "phase": ["train"] * 2, "layer": ["fc"] * 2,
...                   "conv_method": ["none"] * 2, "timeseries_method": ["none"] * 2,
...                   "threshold": [0.99] * 2, "stat": ["lsat"] * 2, "value": [0.5, 0.25]})
>>> page = report_html(AnalysisResult(t, options={"stats": ["lsat"]}), versions={"numpy": "2.0"})
>>> page.startswith("<!DOCTYPE html>"), page.count("<img "), "<caption>Values at epoch 1" in page
(True, 2, True)
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from analyze.inspection import epoch_ranges, layer_table, samples_table, store_summary
from analyze.output_folder import PROVENANCE_DISTRIBUTIONS, OutputFolder
from analyze.outputs import DELVE_STATNAMES, analysis_provenance, sorted_table
from analyze.report_html import (
    Anchors,
    Figure,
    Grid,
    Section,
    esc,
    ordered,
    page,
    paragraph,
    plot_label,
    side_by_side,
    table,
)
from analyze.report_similarity import similarity_section
from analyze.result import AnalysisResult
from analyze.similarity_api import check_similarity
from analyze.stats import REGISTRY
from capture.format import package_versions

__all__ = ["REPORT_FORMAT", "REPORT_NAME", "describe_runs", "publish_report", "report_html", "write_report"]

REPORT_NAME = "report.html"
REPORT_FORMAT = "delve-pipeline.report"
#: Alt texts list the values of at most this many layers.
_ALT_LAYERS = 12
_NEUTRAL = frozenset({"", "none"})
_NO_STATISTIC = "No statistic of this run was computed."
_PHASE_ORDER = {"train": 0, "eval": 1}


# --------------------------------------------------------------------------- the result's values


def _plots() -> ModuleType:
    from analyze import plots  # matplotlib is imported when a figure is drawn, not with the package

    return plots


def _runs(result: AnalysisResult) -> list[str]:
    """Runs in the order they were given, then any others of the table."""
    seen = [str(r) for r in result.inputs]
    return seen + sorted({str(r) for r in result.table["run"]} - set(seen))


def _phases(values: Iterable[str]) -> list[str]:
    return sorted(set(values), key=lambda p: (_PHASE_ORDER.get(p, 2), p))


def _stats(result: AnalysisResult, rows: pd.DataFrame) -> list[str]:
    """The scalar statistics of ``rows``, in the order asked."""
    asked = [str(s) for s in result.options.get("stats", ())]
    names = ordered(rows["stat"], [*asked, *REGISTRY])
    return [s for s in names if s in REGISTRY and REGISTRY[s].kind == "scalar"]


def _thresholds(rows: pd.DataFrame) -> list[float | None]:
    values = pd.to_numeric(rows["threshold"], errors="coerce")
    present = sorted({float(t) for t in values.dropna()})
    return [*present, *([None] if values.isna().any() else [])]


def _methods(rows: pd.DataFrame, column: str) -> list[str]:
    named = [m for m in dict.fromkeys(rows[column].astype(str)) if m not in _NEUTRAL]
    return named or ["none"]


def _view(rows: pd.DataFrame, conv: str, ts: str) -> pd.DataFrame:
    """The rows of one conv and time-series method (layers without such a reduction in every view)."""
    c, t = rows["conv_method"].astype(str), rows["timeseries_method"].astype(str)
    keep = (c.eq(conv) | c.isin(_NEUTRAL)) & (t.eq(ts) | t.isin(_NEUTRAL))
    exact = c[keep].eq(conv).astype(int) + t[keep].eq(ts).astype(int)
    view = rows[keep].assign(_exact=exact).sort_values("_exact", ascending=False, kind="mergesort")
    view = view.drop_duplicates(["epoch", "phase", "layer", "stat", "threshold"], keep="first")
    return view.drop(columns="_exact")


def _grid(rows: pd.DataFrame, epochs: list[int], layers: list[str]) -> np.ndarray:
    """Values of one statistic, phase and threshold as an ``epochs x layers`` array (NaN where none)."""
    values = rows.groupby(["epoch", "layer"], sort=False)["value"].first().unstack("layer")
    return values.reindex(index=epochs, columns=layers).to_numpy(dtype=np.float64)


def _where(run: str, conv: str, ts: str, views: int) -> str:
    """What a figure or table shows: the run, and its reduction where the run has several."""
    return run if views == 1 else f"{run}, {conv}, {ts}"


def _at(rows: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """The rows of one threshold (``None``: the statistics that take none)."""
    t = pd.to_numeric(rows["threshold"], errors="coerce")
    return rows[t.isna() if threshold is None else t.eq(threshold)]


def _range(stat: str) -> tuple[float, float] | None:
    """A fixed colour range where a statistic has one (saturation: 0 to 1), so that runs compare."""
    return (0.0, 1.0) if stat == "lsat" else None


def _stat_label(stat: str, threshold: float | None) -> str:
    name = DELVE_STATNAMES.get(stat, stat)
    return f"{name} (t={threshold!r})" if threshold is not None else name


def _listing(layers: Sequence[str], values: Sequence[float]) -> str:
    shown = [f"{layer} {v:.3g}" for layer, v in zip(layers, values, strict=True) if np.isfinite(v)]
    more = len(shown) - _ALT_LAYERS
    return ", ".join(shown[:_ALT_LAYERS]) + (f" and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------- sections


class _Report:
    """Builds the sections of one report."""

    def __init__(self, result: AnalysisResult) -> None:
        self.result = result
        self.table = sorted_table(result)
        self.anchors = Anchors()
        self.stat_rows = self.table[self.table["phase"].astype(str) != ""]

    def run_rows(self, run: str) -> pd.DataFrame:
        return self.stat_rows[self.stat_rows["run"].astype(str) == run]

    def views(self, run: str) -> list[tuple[str, str, pd.DataFrame]]:
        """``(conv method, time-series method, rows)`` of each reduction of a run (none: no statistic)."""
        rows = self.run_rows(run)
        if rows.empty:
            return []
        return [
            (conv, ts, _view(rows, conv, ts))
            for conv in _methods(rows, "conv_method")
            for ts in _methods(rows, "timeseries_method")
        ]

    # ------------------------------------------------------------------ summary and runs

    def summary(self, descriptions: Mapping[str, Mapping[str, Any]]) -> Section:
        rows = []
        for run in _runs(self.result):
            sub = self.run_rows(run)
            info = descriptions.get(run, {})
            digest = str(self.result.inputs.get(run, {}).get("content_hash", ""))[:12]
            rows.append(
                [
                    run,
                    str(self.result.inputs.get(run, {}).get("path", info.get("path", ""))),
                    epoch_ranges(sorted({int(e) for e in sub["epoch"]})),
                    len(set(sub["layer"])),
                    ", ".join(_phases(sub["phase"])),
                    digest or "–",
                ]
            )
        header = ["run", "store", "epochs analysed", "layers analysed", "phases", "content hash"]
        body: list[str | Grid] = [table("Runs analysed", header, rows)]
        if self.result.failures or self.result.nonfinite:
            body.append(paragraph("Some layers were skipped or held non-finite samples: see Notes.", "warn"))
        return Section(self.anchors.new("summary"), "Summary", body)

    def runs(self, descriptions: Mapping[str, Mapping[str, Any]]) -> Section:
        section = Section(self.anchors.new("runs"), "Runs")
        for run in _runs(self.result):
            body: list[str | Grid] = []
            info = descriptions.get(run)
            if info is None:
                body.append(
                    paragraph("No description of this run's store (it was not read from disk).", "note")
                )
            else:
                body.append(table(f"Store of run {run}", ["property", "value"], store_summary(info)))
                layers = layer_table(info)
                body.append(table(f"Recorded {layers.caption} of run {run}", layers.header, layers.rows))
                samples = samples_table(info)
                if samples is not None:
                    body.append(
                        table(f"{samples.caption.capitalize()} of run {run}", samples.header, samples.rows)
                    )
            body += self.scalars(run)
            section.children.append(Section(self.anchors.new("run", run), f"Run {run}", body))
        return section

    def scalars(self, run: str) -> list[str | Grid]:
        rows = self.table[(self.table["run"].astype(str) == run) & (self.table["phase"].astype(str) == "")]
        if rows.empty:
            return []
        names = ordered(rows["stat"], self.result.scalar_names.get(run, []))
        recorded = self.result.scalars.get(run, {})
        epochs = sorted({int(e) for e in rows["epoch"]})
        values = rows.groupby(["epoch", "stat"], sort=False)["value"].first()
        body = [[e, *[recorded.get(e, {}).get(n, values.get((e, n), np.nan)) for n in names]] for e in epochs]
        return [table(f"Scalars recorded by run {run}, per epoch", ["epoch", *names], body)]

    # ------------------------------------------------------------------ statistics

    def profiles(self) -> Section:
        section = Section(self.anchors.new("profiles"), "Saturation profiles")
        section.body.append(
            paragraph(
                "Saturation (lsat): the share of a layer's eigendirections that explain the threshold's share "
                "of its variance (99% at t=0.99), against layer position; one line per epoch, the last one "
                "thickest."
            )
        )
        for run in _runs(self.result):
            views = self.views(run)
            body: list[str | Grid] = []
            if not views:
                body.append(paragraph(_NO_STATISTIC, "note"))
            for conv, ts, rows in views:
                where = _where(run, conv, ts, len(views))
                figures = [
                    self.profile_figure(rows, where, phase, t)
                    for t in _thresholds(rows[rows["stat"] == "lsat"])
                    for phase in _phases(rows.loc[rows["stat"] == "lsat", "phase"])
                ]
                if figures:
                    body.append(Grid(figures))
                elif conv == views[0][0] and ts == views[0][1]:
                    body.append(paragraph("No saturation was computed (add lsat to the statistics).", "note"))
                body += self.last_epoch_tables(rows, where, run)
            section.children.append(Section(self.anchors.new("profiles", run), f"Run {run}", body))
        return section

    def profile_figure(self, rows: pd.DataFrame, where: str, phase: str, t: float | None) -> Figure:
        rows = _at(rows[(rows["stat"] == "lsat") & (rows["phase"] == phase)], t)
        epochs = sorted({int(e) for e in rows["epoch"]})
        layers = ordered(rows["layer"], self.result.layer_order.get(rows["run"].iloc[0], []))
        values = _grid(rows, epochs, layers)
        label = _stat_label("lsat", t)
        title = f"{label} ({phase})\n{where}"
        alt = (
            f"Line chart of {label} against layer for {where}, {phase} phase, one line per epoch "
            f"({epoch_ranges(epochs)}); at epoch {epochs[-1]}: {_listing(layers, values[-1])}."
        )
        return Figure(
            lambda: _plots().layer_profile_png(
                values, epochs, [plot_label(x) for x in layers], label, plot_label(title), (0.0, 1.0)
            ),
            alt,
            f"{phase}, threshold {t!r}",
        )

    def last_epoch_tables(self, rows: pd.DataFrame, where: str, run: str) -> list[str | Grid]:
        """Per phase, every statistic of every layer at the last epoch."""
        last = int(rows["epoch"].max())
        rows = rows[rows["epoch"] == last]
        layers = ordered(rows["layer"], self.result.layer_order.get(run, []))
        thresholds = pd.to_numeric(rows["threshold"], errors="coerce")
        values = {
            (layer, phase, stat, None if np.isnan(t) else float(t)): value
            for layer, phase, stat, t, value in zip(
                rows["layer"], rows["phase"], rows["stat"], thresholds, rows["value"], strict=True
            )
        }
        out: list[str | Grid] = []
        for phase in _phases(rows["phase"]):
            in_phase = rows[rows["phase"] == phase]
            columns = [
                (stat, t)
                for stat in _stats(self.result, in_phase)
                for t in _thresholds(in_phase[in_phase["stat"] == stat])
            ]
            header = ["layer", *[s + (f" (t={t!r})" if t is not None else "") for s, t in columns]]
            body = [
                [layer, *[values.get((layer, phase, s, t), np.nan) for s, t in columns]] for layer in layers
            ]
            out.append(table(f"Values at epoch {last} of {where}, {phase} phase", header, body))
        return [side_by_side(out)]

    def heatmaps(self) -> Section:
        section = Section(self.anchors.new("heatmaps"), "Heatmaps")
        section.body.append(paragraph("Each statistic by epoch (rows) and layer (columns), per phase."))
        for run in _runs(self.result):
            views = self.views(run)
            run_section = Section(self.anchors.new("heatmaps", run), f"Run {run}")
            if not views:
                run_section.body.append(paragraph(_NO_STATISTIC, "note"))
            for conv, ts, rows in views:
                where = _where(run, conv, ts, len(views))
                for stat in _stats(self.result, rows):
                    of_stat = rows[rows["stat"] == stat]
                    for t in _thresholds(of_stat):
                        chosen = _at(of_stat, t)
                        figures = [
                            self.heatmap_figure(chosen, run, where, stat, t, p)
                            for p in _phases(chosen["phase"])
                        ]
                        title = f"{stat}" + (f", t={t!r}" if t is not None else "")
                        title += f" – {REGISTRY[stat].description}"
                        if len(views) > 1:
                            title += f" ({conv}, {ts})"
                        anchor = self.anchors.new("heatmap", run, stat, t if t is not None else "")
                        run_section.children.append(Section(anchor, title, [Grid(figures)]))
            section.children.append(run_section)
        return section

    def heatmap_figure(
        self, rows: pd.DataFrame, run: str, where: str, stat: str, t: float | None, phase: str
    ) -> Figure:
        rows = rows[rows["phase"] == phase]
        epochs = sorted({int(e) for e in rows["epoch"]})
        layers = ordered(rows["layer"], self.result.layer_order.get(run, []))
        values = _grid(rows, epochs, layers)
        label = _stat_label(stat, t)
        finite = values[np.isfinite(values)]
        span = f"values from {finite.min():.4g} to {finite.max():.4g}" if finite.size else "no finite value"
        alt = (
            f"Heatmap of {label} for {where}, {phase} phase: {len(epochs)} epoch(s) "
            f"({epoch_ranges(epochs)}) by {len(layers)} layer(s) ({', '.join(layers[:_ALT_LAYERS])}"
            f"{', ...' if len(layers) > _ALT_LAYERS else ''}); {span}."
        )
        title = f"{label} ({phase})\n{where}"
        return Figure(
            lambda: _plots().heatmap_png(
                values, epochs, [plot_label(x) for x in layers], label, plot_label(title), vlim=_range(stat)
            ),
            alt,
            phase,
        )

    def spectra(self) -> Section:
        section = Section(self.anchors.new("spectra"), "Spectra")
        section.body.append(
            paragraph("Eigenvalues of each layer's covariance at the last epoch, largest first.")
        )
        keys = list(self.result.spectra)
        if not keys:
            section.body.append(paragraph("The analysis kept no spectrum.", "note"))
        for run in _runs(self.result):
            of_run = [k for k in keys if str(k[0]) == run]
            if not of_run:
                continue
            views = self.views(run)
            figures = []
            for conv, ts, _ in views:
                chosen = [
                    k
                    for k in of_run
                    if (k[4] == conv or k[4] in _NEUTRAL) and (k[5] == ts or k[5] in _NEUTRAL)
                ]
                for phase in _phases(k[2] for k in chosen):
                    figures.append(
                        self.spectrum_figure(chosen, run, _where(run, conv, ts, len(views)), phase)
                    )
            section.children.append(Section(self.anchors.new("spectra", run), f"Run {run}", [Grid(figures)]))
        return section

    def spectrum_figure(self, keys: list[Any], run: str, where: str, phase: str) -> Figure:
        in_phase = [k for k in keys if k[2] == phase]
        last = max(int(k[1]) for k in in_phase)
        by_layer: dict[str, Any] = {}
        for k in in_phase:
            if int(k[1]) == last:
                by_layer.setdefault(str(k[3]), k)
        layers = ordered(by_layer, self.result.layer_order.get(run, []))
        spectra = [np.asarray(self.result.spectra[by_layer[layer]], dtype=np.float64) for layer in layers]
        largest = [float(s[0]) if s.size else np.nan for s in spectra]
        alt = (
            f"Line chart, logarithmic, of the eigenvalues of each layer against their rank for {where}, "
            f"{phase} phase, epoch {last}; largest eigenvalues: {_listing(layers, largest)}."
        )
        title = f"eigenvalues ({phase}), epoch {last}\n{where}"
        return Figure(
            lambda: _plots().spectrum_png(spectra, [plot_label(x) for x in layers], plot_label(title)),
            alt,
            f"{phase}, epoch {last}",
        )

    # ------------------------------------------------------------------ notes and provenance

    def notes(self) -> Section | None:
        result = self.result
        if not result.failures and not result.nonfinite:
            return None
        body: list[str | Grid] = []
        if result.failures:
            rows = [[f.run, f.layer, "–" if f.epoch is None else f.epoch, f.error] for f in result.failures]
            body.append(table("Layers skipped (on_error=skip)", ["run", "layer", "epoch", "error"], rows))
        if result.nonfinite:
            rows = [
                [*map(str, k[:1]), int(k[1]), *map(str, k[2:]), int(n)]
                for k, n in sorted(result.nonfinite.items(), key=lambda kv: repr(kv[0]))
            ]
            header = ["run", "epoch", "phase", "layer", "conv method", "time-series method", "samples"]
            body.append(table("Samples with NaN or Inf values (left out of the statistics)", header, rows))
        return Section(self.anchors.new("notes"), "Notes", body)

    def provenance(self, versions: Mapping[str, Any], similarity: pd.DataFrame | None) -> Section:
        options = [[name, _option(value)] for name, value in self.result.options.items()]
        inputs = [
            [run, str(i.get("path", "")), str(i.get("content_hash", ""))]
            for run, i in self.result.inputs.items()
        ]
        body: list[str | Grid] = [table("Inputs", ["run", "store", "content hash (SHA-256)"], inputs)]
        tables = [table("Analysis options", ["option", "value"], options)]
        if similarity is not None:
            measures = ", ".join(dict.fromkeys(similarity["measure"].astype(str))) or "–"
            tables.append(
                table(
                    "Similarity", ["property", "value"], [["measures", measures], ["values", len(similarity)]]
                )
            )
        tables.append(
            table("Package versions", ["package", "version"], [[k, str(v)] for k, v in versions.items()])
        )
        body.append(side_by_side(tables))
        return Section(self.anchors.new("provenance"), "Options and versions", body)


def _option(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------- the report


def describe_runs(result: AnalysisResult) -> dict[str, dict[str, Any]]:
    """:func:`analyze.inspect_run` of each analysed store that can be read now (run name -> description)."""
    from analyze.api import inspect_run
    from capture.format import StoreFormatError

    out = {}
    for run, source in result.inputs.items():
        try:
            out[str(run)] = inspect_run(source["path"], result.storage_options.get(str(run)))
        except (KeyError, OSError, StoreFormatError):
            continue
    return out


def report_html(
    result: AnalysisResult,
    *,
    similarity: pd.DataFrame | None = None,
    descriptions: Mapping[str, Mapping[str, Any]] | None = None,
    created: str | None = None,
    versions: Mapping[str, Any] | None = None,
    title: str = "Layer saturation report",
    progress: bool = False,
) -> str:
    """The report of an analysis as one self-contained HTML page.

    Parameters
    ----------
    result : AnalysisResult
        What :func:`analyze.analyze_runs` returned (or one built by hand).
    similarity : pandas.DataFrame, optional
        A tidy similarity table with :data:`SIMILARITY_COLUMNS` (what ``analyze.similarity``
        returns, several measures and kinds of pairs concatenated): its matrices get a section.
    descriptions : mapping, optional
        Run name -> :func:`analyze.inspect_run` dictionary (default: read from each store of
        ``result.inputs`` that can be read; a run without one says so).
    created : str, optional
        A creation time to show (default: none, so that the page depends on its inputs alone).
    versions : mapping, optional
        Package versions to list (default: those every ``provenance.json`` records).
    title : str
    progress : bool
        Show a progress bar while the figures are drawn.

    Returns
    -------
    str
        The page; write it UTF-8 encoded.

    Raises
    ------
    ValueError
        ``result.table`` or ``similarity`` lacks columns, or a row of ``similarity`` compares
        items that differ in more than one of run, epoch and layer
        (:func:`analyze.similarity_api.split_pairs`).
    """
    from tqdm.auto import tqdm

    frame = None if similarity is None else check_similarity(similarity)
    descriptions = describe_runs(result) if descriptions is None else descriptions
    versions = package_versions(PROVENANCE_DISTRIBUTIONS) if versions is None else versions
    report = _Report(result)
    sections = [report.summary(descriptions), report.runs(descriptions), report.profiles(), report.heatmaps()]
    sections.append(report.spectra())
    if frame is not None:
        sections.append(similarity_section(frame, report.anchors, result.layer_order))
    notes = report.notes()
    sections += [notes] if notes is not None else []
    sections.append(report.provenance(versions, frame))
    figures = [f for s in sections for f in s.figures()]
    for figure in tqdm(figures, desc="report figures", unit="figure", disable=not progress):
        figure.png = figure.draw()
    generator = f"delve-pipeline {versions.get('delve-pipeline', '')}".strip()
    header = [f"<p>Runs: {esc(', '.join(_runs(result)))}</p>"]
    if created is not None:
        header.append(
            f'<p>Created <time datetime="{esc(created)}">{esc(created)}</time> by {esc(generator)}</p>'
        )
    return page(title, header, sections, generator)


def write_report(
    result: AnalysisResult,
    folder: OutputFolder,
    *,
    similarity: pd.DataFrame | None = None,
    progress: bool = False,
) -> Path:
    """Write :data:`REPORT_NAME` into an output folder (before its provenance); its final path.

    The page shows the time it was made (UTC, seconds, as ``provenance.json``'s ``created``).
    """
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    text = report_html(result, similarity=similarity, created=created, progress=progress)
    return folder.final_path(folder.write(REPORT_NAME, text.encode("utf-8")))


def publish_report(
    result: AnalysisResult,
    out_dir: str | os.PathLike[str],
    *,
    similarity: pd.DataFrame | None = None,
    progress: bool = False,
) -> Path:
    """Write ``out_dir`` with :data:`REPORT_NAME` and ``provenance.json``, staged; the report's path.

    ``out_dir`` appears, or an earlier output folder there is replaced as a whole, only once both
    files are written (:class:`analyze.OutputFolder`); on any failure it is left as it was.

    Raises
    ------
    FileExistsError
        ``out_dir`` is a file or a folder that is not an output of this package.

    Examples
    --------
    >>> import tempfile
    >>> t = pd.DataFrame({"run": "r", "epoch": [0, 0], "phase": "eval", "layer": ["a", "b"],
    ...                   "conv_method": "none", "timeseries_method": "none", "threshold": 0.9,
    ...                   "stat": "lsat", "value": [0.5, 0.75]})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = publish_report(AnalysisResult(t), Path(tmp) / "out")
    ...     sorted(p.name for p in path.parent.iterdir())
    ['provenance.json', 'report.html']
    """
    frame = None if similarity is None else check_similarity(similarity)
    fields = {**analysis_provenance(result), "similarity": None}
    if frame is not None:
        fields["similarity"] = {
            "measures": list(dict.fromkeys(frame["measure"].astype(str))),
            "rows": len(frame),
        }
    with OutputFolder(out_dir, format=REPORT_FORMAT) as folder:
        path = write_report(result, folder, similarity=frame, progress=progress)
        folder.publish(fields)
    return path
