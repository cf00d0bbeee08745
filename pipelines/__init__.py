"""Pipelines stage: tools built on top of capture and analysis.

Two audiences, two parts:

- the native tools (:func:`run_demo`, :func:`sweep` / :class:`SweepConfig`, :func:`compare_runs`
  and the ``delve-analyze`` commands ``demo``, ``sweep`` and ``compare``);
- the delve drop-in, :mod:`pipelines.dropin` (tracker, writers, metrics, PCA layers, npy
  tools), re-exported here: for delve users, ``from pipelines import SaturationTracker``
  replaces ``from delve import SaturationTracker`` (see ``docs/migrating-from-delve.md``).
"""

from __future__ import annotations

from pipelines.compare import compare_runs
from pipelines.demo import run_demo
from pipelines.dropin import (
    DELVE_LAYER_TYPES,
    STATMAP,
    TRACKER_STATS,
    WRITERS,
    AbstractWriter,
    CheckLayerSat,
    CompositWriter,
    Conv2DPCALayer,
    CSVandPlottingWriter,
    CSVWriter,
    LinearPCALayer,
    NPYWriter,
    PrintWriter,
    SaturationTracker,
    TensorBoardWriter,
    TorchCovarianceMatrix,
    change_all_pca_layer_thresholds,
    change_all_pca_layer_thresholds_and_inject_random_directions,
    compute_cov_determinant,
    compute_cov_trace,
    compute_diag_trace,
    compute_intrinsic_dimensionality,
    compute_saturation,
    extract_layer_stat,
    get_writer,
    plot_stat,
    read_npy_folder,
    reconstruct_csv_from_npy_data,
)
from pipelines.sweep import SweepConfig, sweep

__all__ = [
    "DELVE_LAYER_TYPES",
    "STATMAP",
    "TRACKER_STATS",
    "SweepConfig",
    "WRITERS",
    "AbstractWriter",
    "CSVWriter",
    "CSVandPlottingWriter",
    "CheckLayerSat",
    "CompositWriter",
    "Conv2DPCALayer",
    "LinearPCALayer",
    "NPYWriter",
    "PrintWriter",
    "SaturationTracker",
    "TensorBoardWriter",
    "TorchCovarianceMatrix",
    "change_all_pca_layer_thresholds",
    "change_all_pca_layer_thresholds_and_inject_random_directions",
    "compare_runs",
    "compute_cov_determinant",
    "compute_cov_trace",
    "compute_diag_trace",
    "compute_intrinsic_dimensionality",
    "compute_saturation",
    "extract_layer_stat",
    "get_writer",
    "plot_stat",
    "read_npy_folder",
    "reconstruct_csv_from_npy_data",
    "run_demo",
    "sweep",
]
