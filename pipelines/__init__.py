"""Pipelines stage: tools built on top of capture and analysis (trackers, demos, sweeps, PCA layers).

For delve users, ``from pipelines import SaturationTracker`` replaces
``from delve import SaturationTracker`` (see ``docs/migrating-from-delve.md``): the same
arguments, writers, metrics, PCA layers and npy tools, on this package's capture hook and
statistics.
"""

from __future__ import annotations

from pipelines.compare import compare_runs
from pipelines.demo import run_demo
from pipelines.metrics import (
    TorchCovarianceMatrix,
    compute_cov_determinant,
    compute_cov_trace,
    compute_diag_trace,
    compute_intrinsic_dimensionality,
    compute_saturation,
)
from pipelines.npy_tools import read_npy_folder, reconstruct_csv_from_npy_data
from pipelines.pca_layers import (
    Conv2DPCALayer,
    LinearPCALayer,
    change_all_pca_layer_thresholds,
    change_all_pca_layer_thresholds_and_inject_random_directions,
)
from pipelines.sweep import SweepConfig, sweep
from pipelines.tracker import DELVE_LAYER_TYPES, TRACKER_STATS, CheckLayerSat, SaturationTracker
from pipelines.writers import (
    STATMAP,
    WRITERS,
    AbstractWriter,
    CompositWriter,
    CSVandPlottingWriter,
    CSVWriter,
    NPYWriter,
    PrintWriter,
    TensorBoardWriter,
    extract_layer_stat,
    get_writer,
    plot_stat,
)

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
