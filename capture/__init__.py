"""Capture stage: stream layer outputs or their moments to a Zarr v3 run store during training.

This package stays lean (torch, numpy, zarr): it never imports the analysis stage, pandas,
matplotlib or dask, so a training process pays for nothing it does not use.
"""

from __future__ import annotations

from capture.format import (
    CALL_COLUMNS,
    FORMAT_NAME,
    FORMAT_VERSION,
    PHASES,
    CaptureOptions,
    StoreFormatError,
)
from capture.layers import DEFAULT_LAYER_TYPE_NAMES, DEFAULT_LAYER_TYPES, discover_layers
from capture.moments import Moments, batch_moments, merge_moments, tree_merge
from capture.recorder import CaptureError, GramBlock, Recorder
from capture.reshape import CONV_METHODS, TIMESERIES_METHODS, to_matrix
from capture.store import RunInfo, open_run

__all__ = [
    "CALL_COLUMNS",
    "CONV_METHODS",
    "DEFAULT_LAYER_TYPES",
    "DEFAULT_LAYER_TYPE_NAMES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PHASES",
    "TIMESERIES_METHODS",
    "CaptureError",
    "CaptureOptions",
    "GramBlock",
    "Moments",
    "Recorder",
    "RunInfo",
    "StoreFormatError",
    "batch_moments",
    "discover_layers",
    "merge_moments",
    "open_run",
    "to_matrix",
    "tree_merge",
]
