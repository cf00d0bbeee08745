"""The result of an analysis: a tidy table plus the spectra and diagnostics behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

__all__ = ["TABLE_COLUMNS", "SpectrumKey", "AnalysisResult", "LayerFailure"]

#: Columns of the tidy statistics table, in order.
TABLE_COLUMNS = (
    "run",
    "epoch",
    "phase",
    "layer",
    "conv_method",
    "timeseries_method",
    "threshold",
    "stat",
    "value",
)

class SpectrumKey(NamedTuple):
    """What one spectrum (and its statistics) belongs to; equal to the plain tuple of its fields.

    Examples
    --------
    >>> key = SpectrumKey("mnist", 2, "train", "conv1", "channelwise", "last_timestep")
    >>> key.layer, key == ("mnist", 2, "train", "conv1", "channelwise", "last_timestep")
    ('conv1', True)
    """

    run: str
    epoch: int
    phase: str
    layer: str
    conv_method: str
    timeseries_method: str


@dataclass(frozen=True)
class LayerFailure:
    """A (run, layer) that could not be analysed with ``on_error="skip"``."""

    run: str
    layer: str
    epoch: int | None
    error: str


@dataclass
class AnalysisResult:
    """Everything an analysis produced.

    Attributes
    ----------
    table : pandas.DataFrame
        Tidy table with :data:`TABLE_COLUMNS`. ``threshold`` is NaN for statistics that take none;
        scalars recorded with ``add_scalar`` come back with ``stat`` set to their name and ``layer``,
        ``phase``, ``conv_method`` and ``timeseries_method`` empty strings.
    spectra : dict
        :data:`SpectrumKey` -> eigenvalues (descending, float64).
    covariances : dict
        :data:`SpectrumKey` -> covariance matrix, only when ``cov`` was asked for.
    embeddings : dict
        :data:`SpectrumKey` -> ``(n, 2)`` points, only when ``embed`` was asked for.
    nonfinite : dict
        :data:`SpectrumKey` -> number of samples with NaN / Inf values (only where non-zero).
    failures : list of LayerFailure
        What was skipped with ``on_error="skip"``.
    options : dict
        Every option of the analysis, as :meth:`analyze.AnalysisOptions.to_dict` gives them
        (what ``provenance.json`` records; ``AnalysisOptions.from_dict(result.options)`` gives the
        options back).
    inputs : dict
        run name -> ``{"path": ..., "content_hash": ...}``.
    layer_order : dict
        run name -> the analysed layers in the run's order.
    scalar_names : dict
        run name -> scalar names in recording order.
    scalars : dict
        run name -> epoch -> scalar name -> value, as recorded (ints stay ints).
    storage_options : dict
        run name -> the storage options its store (at a URL) was opened with, credentials
        included, so that the report can open it again; never written (``inputs`` holds them
        redacted).
    """

    table: pd.DataFrame
    spectra: dict[SpectrumKey, np.ndarray] = field(default_factory=dict)
    covariances: dict[SpectrumKey, np.ndarray] = field(default_factory=dict)
    embeddings: dict[SpectrumKey, np.ndarray] = field(default_factory=dict)
    nonfinite: dict[SpectrumKey, int] = field(default_factory=dict)
    failures: list[LayerFailure] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_order: dict[str, list[str]] = field(default_factory=dict)
    scalar_names: dict[str, list[str]] = field(default_factory=dict)
    scalars: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
