"""Analysis stage: reduce stored runs to covariances and compute every statistic, after the fact.

Public entry points: :func:`run_stats` (a tidy table), :func:`analyze_runs` (the table plus
spectra, covariances, embeddings and diagnostics), :func:`similarity` (representational similarity
of layers, :data:`MEASURE_NAMES`), :func:`inspect_run`, the options of an
analysis (:class:`AnalysisOptions`), the output folders every command writes
(:func:`publish_outputs`, :class:`OutputFolder`), the HTML report of an analysis
(:func:`report_html`, :func:`publish_report`, :func:`write_report`) and the statistics registry in
:mod:`analyze.stats`.
"""

from __future__ import annotations

from analyze.api import analyze_runs, inspect_run, run_stats
from analyze.options import AnalysisError, AnalysisOptions, parse_epochs
from analyze.output_folder import OutputFolder, atomic_write_bytes, resolve_cache_dir
from analyze.outputs import publish_outputs, write_outputs
from analyze.report import publish_report, report_html, write_report
from analyze.result import TABLE_COLUMNS, AnalysisResult, LayerFailure, SpectrumKey
from analyze.selection import Selection
from analyze.similarity_api import (
    SIMILARITY_COLUMNS,
    SimilarityMatrix,
    SimilarityResult,
    analyze_similarity,
    similarity,
    similarity_matrices,
)
from analyze.similarity_measures import MEASURE_NAMES, MEASURES
from analyze.similarity_outputs import publish_similarity
from analyze.stats import SEMANTICS, STATS, Spectrum, compute_stat, compute_stats, spectrum_of

__all__ = [
    "MEASURES",
    "MEASURE_NAMES",
    "SEMANTICS",
    "SIMILARITY_COLUMNS",
    "STATS",
    "TABLE_COLUMNS",
    "AnalysisError",
    "AnalysisOptions",
    "AnalysisResult",
    "LayerFailure",
    "OutputFolder",
    "Selection",
    "SimilarityMatrix",
    "SimilarityResult",
    "Spectrum",
    "SpectrumKey",
    "analyze_runs",
    "analyze_similarity",
    "atomic_write_bytes",
    "compute_stat",
    "compute_stats",
    "inspect_run",
    "parse_epochs",
    "publish_outputs",
    "publish_report",
    "report_html",
    "publish_similarity",
    "resolve_cache_dir",
    "run_stats",
    "similarity",
    "similarity_matrices",
    "spectrum_of",
    "write_outputs",
    "write_report",
]
