"""Rebuild delve's result CSV from an npy-writer folder, optionally at a new threshold.

:func:`reconstruct_csv_from_npy_data` is delve 0.1.50's ``delve.tools`` function of the
same name: it reads the folder that :class:`~pipelines.dropin.writers.NPYWriter` writes
(``<folder>/<name>/<name>_epoch<k>.npy``) and returns, and optionally saves, the table the
CSV writer would have written. With a threshold it recomputes the thresholded statistics
from the stored covariance matrices (``stats=['cov']`` during training) instead of
reading them, without the activations. delve's plotting helpers of ``delve.tools``
(``extract_layer_stat``, ``plot_stat``) are in :mod:`pipelines.dropin.plotting`.

Differences from delve 0.1.50 (its bugs, fixed)
-----------------------------------------------
- Column names are the CSV writer's: the ``_`` that the npy writer's empty prefix puts
  before the tracker's names is dropped (``_train-saturation_conv`` ->
  ``train-saturation_conv``); delve kept it.
- Columns come in the order the values were first written (the key order of
  ``epoch_counter.pkl``), so for the same writes the CSV is byte for byte the CSV
  writer's; a recomputed statistic takes the place of the stored one, a statistic that
  was not stored follows its layer's other values. delve's order followed the file system.
- Covariance matrices are not put into the table (delve wrote their text into the CSV
  when ``thresh`` was None).
- ``stats`` is not modified (delve removed entries from the caller's list, and its check
  for a missing saturation looked for ``'sat'``, never ``'lsat'``); every scalar statistic
  of :data:`analyze.stats.SCALAR_STATS` can be recomputed (delve returned None for
  anything but lsat and idim), and ``semantics`` picks delve's or the documented ``idim``.
- Nothing is written when ``savefile`` is None; the CSV is written atomically.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyze.stats import (
    DELVE_SEMANTICS,
    REGISTRY,
    SCALAR_STATS,
    check_semantics,
    check_threshold,
    compute_stat,
    spectrum_of,
)
from pipelines.dropin.formats import (
    COVARIANCE_NAME,
    STATMAP,
    load_epoch_counter,
    pad_front,
    split_column,
    write_csv,
)

__all__ = [
    "read_npy_folder",
    "reconstruct_csv_from_npy_data",
]


def _column_name(value_name: str) -> str:
    """The CSV writer's name for an npy value name (drop the empty prefix's ``_``)."""
    return value_name[1:] if value_name.startswith("_") else value_name


def _long_name(stat: str) -> str:
    return STATMAP.get(stat, stat)


def read_npy_folder(npywriter_out_path: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """The npy files of an :class:`~pipelines.dropin.writers.NPYWriter` folder, by value name.

    Parameters
    ----------
    npywriter_out_path : str or path
        The writer's ``savepath``.

    Returns
    -------
    dict
        ``{value name: [file of epoch 0, epoch 1, ...]}`` in the order the names were
        first written (``epoch_counter.pkl``; names it does not list follow, sorted).
        Files are sorted by epoch number.

    Examples
    --------
    >>> import tempfile
    >>> from pipelines import NPYWriter
    >>> run = os.path.join(tempfile.mkdtemp(), "run")
    >>> w = NPYWriter(run)
    >>> for e in range(2):
    ...     w.add_scalar("epoch", e)
    ...     w.add_scalars(prefix="", value_dict={"train-saturation_lin": 0.5})
    >>> w.save()
    >>> {k: [p.name for p in v] for k, v in read_npy_folder(run).items()}  # doctest: +NORMALIZE_WHITESPACE
    {'epoch': ['epoch_epoch0.npy', 'epoch_epoch1.npy'],
     '_train-saturation_lin': ['_train-saturation_lin_epoch0.npy', '_train-saturation_lin_epoch1.npy']}
    """
    root = Path(npywriter_out_path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder written by the npy writer")
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        pattern = re.compile(re.escape(folder.name) + r"_epoch(\d+)\.npy")
        epochs = [(int(m.group(1)), f) for f in folder.iterdir() if (m := pattern.fullmatch(f.name))]
        if epochs:
            found[folder.name] = [f for _, f in sorted(epochs)]
    counter_path = root / "epoch_counter.pkl"
    order = list(load_epoch_counter(counter_path)) if counter_path.exists() else []
    first = [name for name in order if name in found]
    return {name: found[name] for name in first + [n for n in found if n not in first]}


def _load_value(path: Path) -> Any:
    value = np.load(path)
    return value.item() if value.ndim == 0 else value


def _recomputed_value(stat: str, spectrum: Any, thresh: float, semantics: str) -> Any:
    spec = REGISTRY[stat]
    value = compute_stat(stat, spectrum, thresh if spec.thresholded else None, semantics)
    if stat == "idim" and math.isfinite(value):
        return int(value)  # delve's CSV holds idim as an integer
    return value


def reconstruct_csv_from_npy_data(
    npywriter_out_path: str | os.PathLike[str],
    savefile: str | os.PathLike[str] | None = None,
    thresh: float | None = None,
    stats: Iterable[str] = ("lsat", "idim"),
    *,
    semantics: str = DELVE_SEMANTICS,
) -> pd.DataFrame:
    """Rebuild the CSV writer's table from an npy-writer folder.

    Parameters
    ----------
    npywriter_out_path : str or path
        The folder the npy writer wrote (its ``savepath``).
    savefile : str or path, optional
        Write the table there (the full file name, separator ``;``); nothing is written
        when None.
    thresh : float, optional
        None: read every stored scalar value. A number in (0, 1]: recompute ``stats``
        from the stored covariance matrices at this threshold (the other stored values
        are read as they are).
    stats : iterable of str
        Statistics to recompute (any of :data:`analyze.stats.SCALAR_STATS`; ``lsat`` and
        ``idim`` use ``thresh``). With ``thresh=None`` only checked: a warning names each
        one that was not stored.
    semantics : {"delve-0.1.50", "default"}
        Rule for ``idim`` / ``lsat`` (see :mod:`analyze.stats`); delve's by default, so
        that ``thresh`` equal to the training threshold gives the stored values.

    Returns
    -------
    pandas.DataFrame
        One row per epoch, one column per value, as :class:`~pipelines.dropin.writers.CSVWriter`
        names and orders them.

    Raises
    ------
    FileNotFoundError
        If the folder does not exist, or ``thresh`` is set and no covariance matrix was
        stored.
    ValueError
        For an invalid threshold, statistic or semantics.

    Examples
    --------
    >>> import tempfile
    >>> from pipelines import NPYWriter
    >>> run = os.path.join(tempfile.mkdtemp(), "run")
    >>> w = NPYWriter(run)
    >>> w.add_scalars(prefix="", value_dict={
    ...     "train-saturation_lin": 0.25,
    ...     "train-covariance-matrix_lin": np.diag([4.0, 3.0, 2.0, 1.0])})
    >>> w.save()
    >>> reconstruct_csv_from_npy_data(run, stats=["lsat"]).to_dict("list")
    {'train-saturation_lin': [0.25]}
    >>> reconstruct_csv_from_npy_data(run, thresh=0.95, stats=["lsat", "idim"]).to_dict("list")
    {'train-saturation_lin': [0.75], 'train-intrinsic-dimensionality_lin': [3]}
    """
    stats = tuple(stats)
    for stat in stats:
        if stat not in SCALAR_STATS:
            raise ValueError(f"invalid stats value {stat!r}; valid: {', '.join(SCALAR_STATS)}")
    semantics = check_semantics(semantics)
    files = read_npy_folder(npywriter_out_path)
    columns: dict[str, list[Any]] = {}

    if thresh is None:
        present = {parts[1] for parts in map(split_column, files) if parts is not None}
        for stat in stats:
            if _long_name(stat) not in present:
                warnings.warn(
                    f"No .npy file was found for {_long_name(stat)}, stat will not be included", stacklevel=2
                )
        for name, paths in files.items():
            if COVARIANCE_NAME not in name:
                columns.setdefault(_column_name(name), [_load_value(p) for p in paths])
    else:
        thresh = check_threshold(thresh, "thresh")
        cov_names = [name for name in files if COVARIANCE_NAME in name]
        if not cov_names:
            raise FileNotFoundError("Covariance Matrix was not found, recomputation impossible")
        recomputed: dict[str, dict[str, list[Any]]] = {}  # cov name -> {column: values}
        for name in cov_names:
            spectra = [spectrum_of(np.load(p)) for p in files[name]]
            recomputed[name] = {
                _column_name(name).replace(COVARIANCE_NAME, _long_name(stat)): [
                    _recomputed_value(stat, s, thresh, semantics) for s in spectra
                ]
                for stat in stats
            }
        by_column = {col: values for block in recomputed.values() for col, values in block.items()}
        for name, paths in files.items():
            if COVARIANCE_NAME in name:
                for col, values in recomputed[name].items():
                    columns.setdefault(col, values)
                continue
            col = _column_name(name)
            if col in by_column:
                columns.setdefault(col, by_column[col])
            else:
                columns.setdefault(col, [_load_value(p) for p in paths])

    result = pd.DataFrame.from_dict(pad_front(columns))
    if savefile is not None:
        write_csv(result, savefile)
    return result
