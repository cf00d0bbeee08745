"""delve-compatible result writers: CSV, npy folders, CSV with plots, TensorBoard and the console.

A writer receives the values a saturation tracker computes, one call per value
(:meth:`AbstractWriter.add_scalar`) or per layer (:meth:`AbstractWriter.add_scalars`),
and persists them on :meth:`AbstractWriter.save`. Class names, constructor arguments,
the ``WRITERS`` registry and the files written are those of delve 0.1.50
(``delve/writers.py``), so a tracker, a user subclass or a downstream script written
for delve works unchanged:

- ``csv``: ``savepath + '.csv'``, separator ``;``, first column the unnamed row index,
  one column per value name in order of first appearance;
- ``npy``: folder ``savepath/``, one subfolder per value name holding
  ``<name>_epoch<k>.npy`` (k counts the writes of that name), plus
  ``epoch_counter.pkl``; ``add_scalars`` names a value ``prefix + '_' + key``, so the
  tracker's values (prefix ``''``) land in e.g.
  ``savepath/_train-saturation_conv/_train-saturation_conv_epoch0.npy``;
- ``plot``: the CSV plus ``<savepath>_<stat>_<mode>_epoch_<row>.png`` per statistic and
  phase (the last row's values against layer position, drawn by
  :mod:`pipelines.dropin.plotting`).

The file formats themselves (value names, the ``;`` CSV, ``epoch_counter.pkl``) are
:mod:`pipelines.dropin.formats`, shared with the npy tools.

Resuming
--------
Every file writer takes ``resume=False``. With ``resume=True`` it picks up the state a
previous run left in ``savepath`` (the CSV's rows, the npy epoch counters) and appends
to it; nothing already written is lost. ``resume_from_saved_state(initial_epoch)`` is
delve's hook for the same thing, called by a tracker built with ``initial_epoch != 0``.

Differences from delve 0.1.50 (bugs fixed; outputs are otherwise identical)
--------------------------------------------------------------------------------
- ``AbstractWriter.resume_from_saved_state`` has a default (raise
  ``NotImplementedError``) instead of being abstract, so a subclass needs only the four
  methods it uses; delve subclasses that implement it work unchanged.
- CSV files are written atomically (temporary file, then rename); a resumed CSV is read
  with ``float_precision='round_trip'``, so old rows are rewritten byte for byte.
- Columns of unequal length are padded with NaN at the front (a value first logged late
  is aligned with the latest rows) instead of failing in pandas.
- ``NPYWriter(zip=True)`` writes ``savepath + '.zip'`` holding only the npy folder; delve
  archived the folder's whole parent directory into the current working directory.
  ``add_scalar`` keyword arguments are no longer forwarded to ``numpy.save``.
- The plot writer applies ``plot_manipulation_func`` (delve stored and ignored it),
  re-detects statistics on every save, skips a phase that has no column for a statistic
  (delve saved an empty figure) and plots the latest embedded samples (delve plotted the
  first ones). Plots use matplotlib's object API with the Agg canvas, never pyplot
  (see :mod:`pipelines.dropin.plotting` for the plots' own fixes).
- ``TensorBoardWriter`` logs each value as its own scalar tag with a step counter per
  tag (or the ``global_step`` given) and skips covariance matrices; delve logged without
  a step and failed on covariance arrays in ``add_scalars``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from analyze.outputs import atomic_write_bytes
from pipelines.dropin.formats import (
    COVARIANCE_NAME,
    STATMAP,
    load_epoch_counter,
    pad_front,
    read_csv_columns,
    split_column,
    write_csv,
)
from pipelines.dropin.plotting import plot_scatter_from_results, plot_stat_level

__all__ = [
    "WRITERS",
    "AbstractWriter",
    "CSVWriter",
    "CSVandPlottingWriter",
    "CompositWriter",
    "NPYWriter",
    "PrintWriter",
    "TensorBoardWriter",
    "get_writer",
]

_PHASES = ("train", "eval")
# Statistics the plot writer draws, in delve's order.
_PLOTTED_STATS = ("lsat", "idim", "det", "trc", "dtrc")


# -- small helpers -----------------------------------------------------------------------------


def _to_numpy(value: Any) -> Any:
    """A torch tensor as a numpy array (0-d as a numpy scalar); anything else unchanged."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        array = value.detach().cpu().numpy()
        return array[()] if array.ndim == 0 else array
    return value


# -- the writers -------------------------------------------------------------------------------


class AbstractWriter(ABC):
    """Base class of all writers; delve's interface.

    Subclasses implement :meth:`add_scalar`, :meth:`add_scalars`, :meth:`save` and
    :meth:`close`, and may implement :meth:`resume_from_saved_state`.

    Examples
    --------
    >>> class ListWriter(AbstractWriter):
    ...     def __init__(self, **kwargs):
    ...         self.rows = []
    ...     def add_scalar(self, name, value, **kwargs):
    ...         self.rows.append((name, value))
    ...     def add_scalars(self, prefix, value_dict, global_step=None, **kwargs):
    ...         for key, value in value_dict.items():
    ...             self.add_scalar(key, value)
    ...     def save(self):
    ...         pass
    ...     def close(self):
    ...         pass
    >>> w = get_writer(ListWriter(), {})
    >>> w.add_scalars(prefix="", value_dict={"train-saturation_lin": 0.5})
    >>> w.rows
    [('train-saturation_lin', 0.5)]
    """

    def _check_savestate_ok(self, savepath: str) -> bool:
        """Whether ``savepath`` exists; warn if it does not."""
        if not os.path.exists(savepath):
            warnings.warn(
                f"{savepath} does not exist, savestate for {self.__class__.__name__} cannot be loaded",
                stacklevel=3,
            )
            return False
        return True

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Load the state a previous run saved, to continue it from ``initial_epoch``."""
        raise NotImplementedError(f"Resuming is not implemented for {self.__class__.__name__}")

    @abstractmethod
    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        """Record one value under ``name``."""
        raise NotImplementedError()

    @abstractmethod
    def add_scalars(
        self, prefix: str, value_dict: Mapping[str, Any], global_step: Any, **kwargs: Any
    ) -> None:
        """Record several values; ``prefix`` is empty for the tracker's values."""
        raise NotImplementedError()

    @abstractmethod
    def save(self) -> None:
        """Persist what has been recorded so far."""

    @abstractmethod
    def close(self) -> None:
        """Release resources."""


class CompositWriter(AbstractWriter):
    """Forward every call to several writers (delve's spelling of the name).

    Parameters
    ----------
    writers : list of AbstractWriter
        Called in order.
    """

    def __init__(self, writers: Iterable[AbstractWriter]) -> None:
        super().__init__()
        self.writers = list(writers)

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        for w in self.writers:
            try:
                w.resume_from_saved_state(initial_epoch)
            except NotImplementedError:
                warnings.warn(
                    f"Writer {w.__class__.__name__} raised a NotImplementedError when attempting to resume "
                    "training. This may result in corrupted or overwritten data.",
                    stacklevel=2,
                )

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        for w in self.writers:
            w.add_scalar(name, value, **kwargs)

    def add_scalars(
        self, prefix: str, value_dict: Mapping[str, Any], global_step: Any = None, **kwargs: Any
    ) -> None:
        if global_step is not None:
            kwargs["global_step"] = global_step
        for w in self.writers:
            w.add_scalars(prefix, value_dict, **kwargs)

    def save(self) -> None:
        for w in self.writers:
            w.save()

    def close(self) -> None:
        for w in self.writers:
            w.close()


class CSVWriter(AbstractWriter):
    """All scalar values in one CSV file, rewritten on every :meth:`save`.

    Parameters
    ----------
    savepath : str
        The file is ``savepath + '.csv'``; separator ``;``; the first column is the
        unnamed row index. Covariance matrices are skipped.
    resume : bool
        Continue an existing ``savepath + '.csv'``: its rows are read back and new rows
        appended. Without it an existing file is overwritten on the first save.
    **kwargs
        Ignored (a tracker passes the same ``writer_args`` to every writer).

    Examples
    --------
    >>> import os, tempfile
    >>> from pathlib import Path
    >>> run = os.path.join(tempfile.mkdtemp(), "run")
    >>> w = CSVWriter(run)
    >>> w.add_scalar("epoch", 0)
    >>> w.add_scalars(prefix="", value_dict={"train-saturation_lin": 0.5})
    >>> w.save()
    >>> print(Path(run + ".csv").read_text(), end="")
    ;epoch;train-saturation_lin
    0;0;0.5
    >>> w2 = CSVWriter(run, resume=True)
    >>> w2.add_scalar("epoch", 1)
    >>> w2.add_scalars(prefix="", value_dict={"train-saturation_lin": 0.25})
    >>> w2.save()
    >>> print(Path(run + ".csv").read_text(), end="")
    ;epoch;train-saturation_lin
    0;0;0.5
    1;1;0.25
    """

    def __init__(self, savepath: str, resume: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.value_dict: dict[str, list[Any]] = {}
        self.savepath = os.fspath(savepath)
        self.epoch_counter = 0
        if resume:
            self.resume_from_saved_state(0)

    @property
    def csv_path(self) -> str:
        """The CSV file, ``savepath + '.csv'``."""
        return self.savepath + ".csv"

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Read the existing CSV back; new rows are appended to it.

        ``initial_epoch`` is delve's argument: the number of epochs already done. A CSV
        with a different number of rows is kept whole, with a warning.
        """
        self.epoch_counter = initial_epoch
        if not self._check_savestate_ok(self.csv_path):
            return
        self.value_dict = read_csv_columns(self.csv_path)
        rows = max((len(v) for v in self.value_dict.values()), default=0)
        if initial_epoch and rows != initial_epoch:
            warnings.warn(
                f"{self.csv_path} has {rows} rows but initial_epoch is {initial_epoch}; "
                "new rows are appended after all existing ones",
                stacklevel=2,
            )

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        if COVARIANCE_NAME in name:
            return
        self.value_dict.setdefault(name, []).append(_to_numpy(value))

    def add_scalars(
        self, prefix: str, value_dict: Mapping[str, Any], global_step: Any = None, **kwargs: Any
    ) -> None:
        """Record each value under its key (``prefix`` is ignored, as in delve)."""
        for name, value in value_dict.items():
            self.add_scalar(name, value)

    def frame(self) -> pd.DataFrame:
        """The values recorded so far, as the DataFrame that :meth:`save` writes."""
        return pd.DataFrame.from_dict(pad_front(self.value_dict))

    def save(self) -> None:
        write_csv(self.frame(), self.csv_path)

    def close(self) -> None:
        pass


class NPYWriter(AbstractWriter):
    """One ``.npy`` file per value and write; the only writer that keeps covariance matrices.

    Parameters
    ----------
    savepath : str
        Root folder. A value named ``name`` written for the k-th time goes to
        ``savepath/name/name_epoch{k}.npy``; ``save()`` writes the counters to
        ``savepath/epoch_counter.pkl``.
    zip : bool
        After every save, archive the folder as ``savepath + '.zip'``.
    resume : bool
        Continue the counters of an existing folder (from ``epoch_counter.pkl``).
    **kwargs
        Ignored.

    Examples
    --------
    >>> import os, tempfile
    >>> run = os.path.join(tempfile.mkdtemp(), "run")
    >>> w = NPYWriter(run)
    >>> w.add_scalars(prefix="", value_dict={"train-covariance-matrix_lin": np.eye(2)})
    >>> w.save()
    >>> sorted(os.listdir(run))
    ['_train-covariance-matrix_lin', 'epoch_counter.pkl']
    >>> os.listdir(os.path.join(run, "_train-covariance-matrix_lin"))
    ['_train-covariance-matrix_lin_epoch0.npy']
    """

    def __init__(self, savepath: str, zip: bool = False, resume: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.savepath = os.fspath(savepath)
        self.epoch_counter: dict[str, int] = {}
        self.zip = zip
        if resume:
            self.resume_from_saved_state(0)

    @property
    def counter_path(self) -> str:
        """``savepath/epoch_counter.pkl``."""
        return os.path.join(self.savepath, "epoch_counter.pkl")

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Load the write counters, so that new files continue the numbering."""
        if self._check_savestate_ok(self.counter_path):
            self.epoch_counter = load_epoch_counter(self.counter_path)

    def _update_epoch_counter(self, name: str) -> int:
        self.epoch_counter[name] = self.epoch_counter[name] + 1 if name in self.epoch_counter else 0
        return self.epoch_counter[name]

    def _get_and_create_savepath(self, name: str, epoch: int) -> str:
        folder = os.path.join(self.savepath, name)
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, name + f"_epoch{epoch}")

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        value = _to_numpy(value)
        if COVARIANCE_NAME in name:
            value = np.asarray(value, dtype=np.float64)
        epoch = self._update_epoch_counter(name)
        np.save(self._get_and_create_savepath(name, epoch), value)

    def add_scalars(
        self, prefix: str, value_dict: Mapping[str, Any], global_step: Any = None, **kwargs: Any
    ) -> None:
        """Record each value as ``prefix + '_' + key``."""
        for key, value in value_dict.items():
            self.add_scalar(prefix + "_" + key, value)

    def save(self) -> None:
        os.makedirs(self.savepath, exist_ok=True)
        atomic_write_bytes(self.counter_path, pickle.dumps(self.epoch_counter))
        if self.zip:
            root = os.path.abspath(self.savepath)
            shutil.make_archive(
                base_name=root,
                format="zip",
                root_dir=os.path.dirname(root),
                base_dir=os.path.basename(root),
            )

    def close(self) -> None:
        pass


class PrintWriter(AbstractWriter):
    """Print every value to standard output as ``name : value``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        pass

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        print(name, ":", value)

    def add_scalars(
        self, prefix: str, value_dict: Mapping[str, Any], global_step: Any = None, **kwargs: Any
    ) -> None:
        for key, value in value_dict.items():
            self.add_scalar(prefix + "_" + key, value)

    def save(self) -> None:
        pass

    def close(self) -> None:
        pass


_TENSORBOARD_MISSING = (
    "TensorBoardWriter needs tensorboardX (or torch.utils.tensorboard with the tensorboard package); "
    "install it with `pip install delve-pipeline[tensorboard]`"
)


def _summary_writer_class() -> type:
    """``SummaryWriter`` from tensorboardX, else from torch.utils.tensorboard."""
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError as err:
        raise ImportError(_TENSORBOARD_MISSING) from err


class TensorBoardWriter(AbstractWriter):
    """Scalars as TensorBoard event files in ``savepath``.

    Parameters
    ----------
    savepath : str
        The log directory.
    **kwargs
        Ignored.

    Raises
    ------
    ImportError
        If neither tensorboardX nor torch.utils.tensorboard can be imported
        (``pip install delve-pipeline[tensorboard]``).

    Notes
    -----
    Each value is its own tag (``key``, or ``prefix/key`` for a non-empty prefix); its
    step is the ``global_step`` given, else the number of earlier writes of that tag.
    Covariance matrices are skipped.
    """

    def __init__(self, savepath: str, **kwargs: Any) -> None:
        super().__init__()
        self.savepath = os.fspath(savepath)
        self.writer = _summary_writer_class()(self.savepath)
        self._steps: dict[str, int] = {}

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        raise NotImplementedError("Resuming is not yet implemented for TensorBoardWriter")

    def _step(self, tag: str, global_step: Any) -> Any:
        step = self._steps.get(tag, 0)
        self._steps[tag] = step + 1
        return step if global_step is None else global_step

    def add_scalar(self, name: str, value: Any, global_step: Any = None, **kwargs: Any) -> None:
        if COVARIANCE_NAME in name:
            return
        self.writer.add_scalar(name, _to_numpy(value), global_step=self._step(name, global_step))

    def add_scalars(
        self, prefix: str, value_dict: Mapping[str, Any], global_step: Any = None, **kwargs: Any
    ) -> None:
        for key, value in value_dict.items():
            self.add_scalar(f"{prefix}/{key}" if prefix else key, value, global_step=global_step)

    def save(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CSVandPlottingWriter(CSVWriter):
    """The CSV of :class:`CSVWriter` plus one PNG per statistic and phase on every save.

    The PNGs are ``<savepath>_<stat>_<mode>_epoch_<row>.png`` (stat in lsat, idim, det,
    trc, dtrc; mode train or eval; row the CSV's last row index): the last row's values
    against layer position.

    Parameters
    ----------
    savepath : str
        As for :class:`CSVWriter`.
    plot_manipulation_func : callable, optional
        Called with each plot's ``Axes`` before it is saved; returns the ``Axes``.
    resume : bool
        As for :class:`CSVWriter`.
    **kwargs
        ``primary_metric`` (a column whose value is printed on the plots), ``fontsize``
        (16), ``figsize`` (matplotlib's default); others are ignored.
    """

    def __init__(
        self,
        savepath: str,
        plot_manipulation_func: Callable[[Axes], Axes] | None = None,
        resume: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(savepath, resume=resume)
        self.plot_man_func = plot_manipulation_func if plot_manipulation_func is not None else lambda x: x
        self.primary_metric: str | None = kwargs.get("primary_metric")
        self.fontsize: int = kwargs.get("fontsize", 16)
        self.figsize: tuple[float, float] | None = kwargs.get("figsize")
        self.stats: list[str] = []
        self.sample_stats: list[str] = []
        self.sample_value_dict: dict[str, list[Any]] = {}

    def _look_for_stats(self) -> None:
        """``self.stats`` = ``'<stat>_<mode>'`` for each statistic and phase with a column."""
        present = {parts[:2] for parts in map(split_column, self.value_dict) if parts is not None}
        self.stats = [
            f"{stat}_{mode}"
            for stat in _PLOTTED_STATS
            for mode in _PHASES
            if (mode, STATMAP[stat]) in present
        ]
        self.sample_stats = ["embed"] if self.sample_value_dict else []

    def add_sample_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        self.sample_value_dict.setdefault(name, []).append(value)

    def add_scalars(
        self,
        prefix: str,
        value_dict: Mapping[str, Any],
        sample_value_dict: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in value_dict.items():
            self.add_scalar(name, value)
        for name, value in (sample_value_dict or {}).items():
            self.add_sample_scalar(name, value)

    def save(self) -> None:
        self._look_for_stats()
        frame = self.frame()
        write_csv(frame, self.csv_path)
        for stat in self.stats:
            plot_stat_level(
                frame,
                self.csv_path,
                epoch=-1,
                stat=stat,
                primary_metric=self.primary_metric,
                fontsize=self.fontsize,
                figsize=self.figsize,
                plot_manipulation_func=self.plot_man_func,
            )
        for stat in self.sample_stats:
            plot_scatter_from_results(self.csv_path, -1, stat, pd.DataFrame.from_dict(self.sample_value_dict))
        self.epoch_counter += 1


#: Writer names accepted by ``get_writer`` / a tracker's ``save_to`` (delve's table).
WRITERS: dict[str, type[AbstractWriter]] = {
    "csv": CSVWriter,
    "npy": NPYWriter,
    "print": PrintWriter,
    "tb": TensorBoardWriter,
    "tensorboard": TensorBoardWriter,
    "csvplotting": CSVandPlottingWriter,
    "csvplot": CSVandPlottingWriter,
    "plot": CSVandPlottingWriter,
    "plotcsv": CSVandPlottingWriter,
}


def get_writer(
    save_to: str | AbstractWriter | Iterable[str | AbstractWriter],
    writer_args: Mapping[str, Any] | None = None,
) -> AbstractWriter:
    """The writer for a tracker's ``save_to`` argument.

    Parameters
    ----------
    save_to : str, AbstractWriter or list of these
        A name from :data:`WRITERS`, a writer instance (returned as is), or a list
        (a :class:`CompositWriter` over the writers of its items).
    writer_args : mapping, optional
        Keyword arguments for the constructor of every named writer (a tracker passes
        ``savepath`` here).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.

    Examples
    --------
    >>> w = get_writer(["print", PrintWriter()])
    >>> type(w).__name__, [type(x).__name__ for x in w.writers]
    ('CompositWriter', ['PrintWriter', 'PrintWriter'])
    >>> get_writer("xls", {"savepath": "run"})
    Traceback (most recent call last):
    ...
    ValueError: Illegal argument for save_to 'xls'; valid writer names: csv, csvplot, csvplotting, npy, plot, plotcsv, print, tb, tensorboard
    """
    args = dict(writer_args or {})
    if isinstance(save_to, AbstractWriter):
        return save_to
    if isinstance(save_to, str):
        if save_to not in WRITERS:
            raise ValueError(
                f"Illegal argument for save_to {save_to!r}; valid writer names: {', '.join(sorted(WRITERS))}"
            )
        return WRITERS[save_to](**args)
    if isinstance(save_to, Iterable):
        return CompositWriter([get_writer(item, args) for item in save_to])
    raise ValueError(
        f"Illegal argument for save_to {save_to!r}: expected a writer name ({', '.join(sorted(WRITERS))}), "
        "an AbstractWriter or a list of these"
    )
