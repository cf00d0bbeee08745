"""delve's file formats, shared by the writers, the plots and the npy tools.

- Value names: the tracker names a value ``'<phase>-<statname>_<layer>'``
  (``'train-saturation_conv'``), ``statname`` the long name of a statistic
  (:data:`STATMAP`); :func:`split_column` takes such a name apart.
- The CSV: separator ``;``, the first column the unnamed row index, one column per value
  (:func:`write_csv`, :func:`read_csv_columns`, :func:`pad_front`).
- The npy folder's ``epoch_counter.pkl``: ``{value name: last epoch written}``
  (:func:`load_epoch_counter`).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from analyze.outputs import atomic_write_bytes

__all__ = [
    "COVARIANCE_NAME",
    "STATMAP",
    "load_epoch_counter",
    "pad_front",
    "read_csv_columns",
    "split_column",
    "write_csv",
]

#: Short statistic names (tracker ``stats=``) -> the names used in value names and columns.
STATMAP: dict[str, str] = {
    "idim": "intrinsic-dimensionality",
    "lsat": "saturation",
    "cov": "covariance-matrix",
    "det": "covariance-determinant",
    "trc": "covariance-trace",
    "dtrc": "diagonal-trace",
    "embed": "embedded-sample",
}

#: The long name of the covariance matrix: only the npy writer keeps values with it in their name.
COVARIANCE_NAME = STATMAP["cov"]

# pandas 3 reads floats back exactly by default and deprecates the argument; pandas 2 needs it.
_ROUND_TRIP: dict[str, Any] = (
    {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
)


def split_column(name: str) -> tuple[str, str, str] | None:
    """A value name as ``(phase, statname, layer)``; None if it is not a statistic's name.

    A leading ``_`` (delve's npy names for an empty prefix) is ignored.

    Examples
    --------
    >>> split_column("train-saturation_conv_1")
    ('train', 'saturation', 'conv_1')
    >>> split_column("_eval-covariance-matrix_fc")
    ('eval', 'covariance-matrix', 'fc')
    >>> split_column("epoch") is None
    True
    """
    head, sep, layer = name.lstrip("_").partition("_")
    mode, dash, statname = head.partition("-")
    if not sep or not dash or not mode or not statname:
        return None
    return mode, statname, layer


def pad_front(columns: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    """Pad shorter columns with NaN at the front so all have the longest column's length.

    Examples
    --------
    >>> pad_front({"a": [1.0, 2.0], "b": [3.0]})
    {'a': [1.0, 2.0], 'b': [nan, 3.0]}
    """
    longest = max((len(values) for values in columns.values()), default=0)
    return {name: [np.nan] * (longest - len(values)) + list(values) for name, values in columns.items()}


def write_csv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """``frame.to_csv(path, sep=';')``, written atomically (a temporary file, then a rename)."""
    buffer = io.StringIO()
    frame.to_csv(buffer, sep=";")
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def read_csv_columns(path: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """The columns of a delve CSV (index column dropped), values as read back exactly.

    Examples
    --------
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "run.csv")
    >>> write_csv(pd.DataFrame({"epoch": [0, 1], "train-saturation_fc": [0.1, 1 / 3]}), path)
    >>> read_csv_columns(path)
    {'epoch': [0, 1], 'train-saturation_fc': [0.1, 0.3333333333333333]}
    """
    frame = pd.read_csv(path, sep=";", index_col=0, **_ROUND_TRIP)
    return frame.to_dict("list")


class _CounterUnpickler(pickle.Unpickler):
    """Unpickle ``epoch_counter.pkl`` (a dict of str -> int) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"epoch_counter.pkl may not reference {module}.{name}")


def load_epoch_counter(path: str | os.PathLike[str]) -> dict[str, int]:
    """The ``{value name: last epoch written}`` dict that the npy writer saves.

    Only a plain dict is unpickled: a file referencing any class or function is refused.

    Raises
    ------
    pickle.UnpicklingError
        If the file references a class or function.
    ValueError
        If it holds something other than a dict.
    """
    with open(path, "rb") as handle:
        counter = _CounterUnpickler(handle).load()
    if not isinstance(counter, dict):
        raise ValueError(f"{path}: expected a dict of counters, got {type(counter).__name__}")
    return {str(k): int(v) for k, v in counter.items()}
