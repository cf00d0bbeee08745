"""The delve drop-in: delve 0.1.50's tracker, writers, metrics, PCA layers and npy tools.

For delve users, ``from pipelines import SaturationTracker`` replaces
``from delve import SaturationTracker`` (see ``docs/migrating-from-delve.md``): the same
arguments, writers, metrics, PCA layers and npy tools, on this project's capture hook
(:class:`capture.Recorder`) and statistics (:mod:`analyze.stats`). Everything here is
re-exported by :mod:`pipelines`.
"""

from __future__ import annotations

from pipelines.dropin.formats import STATMAP
from pipelines.dropin.metrics import (
    TorchCovarianceMatrix,
    compute_cov_determinant,
    compute_cov_trace,
    compute_diag_trace,
    compute_intrinsic_dimensionality,
    compute_saturation,
)
from pipelines.dropin.npy_tools import read_npy_folder, reconstruct_csv_from_npy_data
from pipelines.dropin.pca_layers import (
    Conv2DPCALayer,
    LinearPCALayer,
    change_all_pca_layer_thresholds,
    change_all_pca_layer_thresholds_and_inject_random_directions,
)
from pipelines.dropin.plotting import (
    extract_layer_stat,
    plot_scatter_from_results,
    plot_stat,
    plot_stat_level_from_results,
)
from pipelines.dropin.tracker import DELVE_LAYER_TYPES, TRACKER_STATS, CheckLayerSat, SaturationTracker
from pipelines.dropin.writers import (
    WRITERS,
    AbstractWriter,
    CompositWriter,
    CSVandPlottingWriter,
    CSVWriter,
    NPYWriter,
    PrintWriter,
    TensorBoardWriter,
    get_writer,
)

__all__ = [
    "DELVE_LAYER_TYPES",
    "STATMAP",
    "TRACKER_STATS",
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
    "compute_cov_determinant",
    "compute_cov_trace",
    "compute_diag_trace",
    "compute_intrinsic_dimensionality",
    "compute_saturation",
    "extract_layer_stat",
    "get_writer",
    "plot_scatter_from_results",
    "plot_stat",
    "plot_stat_level_from_results",
    "read_npy_folder",
    "reconstruct_csv_from_npy_data",
]
