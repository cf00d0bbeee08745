"""delve-compatible result writers: CSV, npy folders, plots, TensorBoard and the console.

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
  phase (the last row's values against layer position).

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
  first ones). Plots use matplotlib's object API with the Agg canvas, never pyplot.
- ``TensorBoardWriter`` logs each value as its own scalar tag with a step counter per
  tag (or the ``global_step`` given) and skips covariance matrices; delve logged without
  a step and failed on covariance arrays in ``add_scalars``.
- Layer names containing ``_`` keep their full name in plot labels, and a phase name is
  matched as the column's prefix (``train-``), not as a substring anywhere in the name.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import shutil
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "STATMAP",
    "WRITERS",
    "AbstractWriter",
    "CSVWriter",
    "CSVandPlottingWriter",
    "CompositWriter",
    "NPYWriter",
    "PrintWriter",
    "TensorBoardWriter",
    "extract_layer_stat",
    "get_writer",
    "plot_scatter_from_results",
    "plot_stat",
    "plot_stat_level_from_results",
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

_COV = STATMAP["cov"]
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


def _atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_csv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """``frame.to_csv(path, sep=';')``, written atomically."""
    buffer = io.StringIO()
    frame.to_csv(buffer, sep=";")
    _atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


# pandas 3 reads floats back exactly by default and deprecates the argument; pandas 2 needs it.
_ROUND_TRIP: dict[str, Any] = (
    {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
)


def _read_csv_columns(path: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """The columns of a delve CSV (index column dropped), values as read back exactly."""
    frame = pd.read_csv(path, sep=";", index_col=0, **_ROUND_TRIP)
    return frame.to_dict("list")


def _pad_front(columns: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    """Pad shorter columns with NaN at the front so all have the longest column's length."""
    longest = max((len(values) for values in columns.values()), default=0)
    return {name: [np.nan] * (longest - len(values)) + list(values) for name, values in columns.items()}


def _split_column(name: str) -> tuple[str, str, str] | None:
    """``'train-saturation_conv_1'`` -> ``('train', 'saturation', 'conv_1')``; None if not a stat column.

    A leading ``_`` (delve's npy names for an empty prefix) is ignored.
    """
    head, sep, layer = name.lstrip("_").partition("_")
    mode, dash, statname = head.partition("-")
    if not sep or not dash or not mode or not statname:
        return None
    return mode, statname, layer


def _png_path(savepath: str, stat: str, stat_mode: str, epoch: Any) -> str:
    """delve's plot name: a ``.csv`` suffix becomes ``_<stat>_<mode>_epoch_<epoch>.png``."""
    if savepath.endswith(".csv"):
        return savepath[: -len(".csv")] + f"_{stat}_{stat_mode}_epoch_{epoch}.png"
    return savepath


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
    >>> run = os.path.join(tempfile.mkdtemp(), "run")
    >>> w = CSVWriter(run)
    >>> w.add_scalar("epoch", 0)
    >>> w.add_scalars(prefix="", value_dict={"train-saturation_lin": 0.5})
    >>> w.save()
    >>> print(pathlib.Path(run + ".csv").read_text(), end="")
    ;epoch;train-saturation_lin
    0;0;0.5
    >>> w2 = CSVWriter(run, resume=True)
    >>> w2.add_scalar("epoch", 1)
    >>> w2.add_scalars(prefix="", value_dict={"train-saturation_lin": 0.25})
    >>> w2.save()
    >>> print(pathlib.Path(run + ".csv").read_text(), end="")
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
        self.value_dict = _read_csv_columns(self.csv_path)
        rows = max((len(v) for v in self.value_dict.values()), default=0)
        if initial_epoch and rows != initial_epoch:
            warnings.warn(
                f"{self.csv_path} has {rows} rows but initial_epoch is {initial_epoch}; "
                "new rows are appended after all existing ones",
                stacklevel=2,
            )

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        if _COV in name:
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
        return pd.DataFrame.from_dict(_pad_front(self.value_dict))

    def save(self) -> None:
        _write_csv(self.frame(), self.csv_path)

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
            self.epoch_counter = _load_epoch_counter(self.counter_path)

    def _update_epoch_counter(self, name: str) -> int:
        self.epoch_counter[name] = self.epoch_counter[name] + 1 if name in self.epoch_counter else 0
        return self.epoch_counter[name]

    def _get_and_create_savepath(self, name: str, epoch: int) -> str:
        folder = os.path.join(self.savepath, name)
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, name + f"_epoch{epoch}")

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        value = _to_numpy(value)
        if _COV in name:
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
        _atomic_write_bytes(self.counter_path, pickle.dumps(self.epoch_counter))
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


class _CounterUnpickler(pickle.Unpickler):
    """Unpickle ``epoch_counter.pkl`` (a dict of str -> int) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"epoch_counter.pkl may not reference {module}.{name}")


def _load_epoch_counter(path: str | os.PathLike[str]) -> dict[str, int]:
    """The ``{value name: last epoch written}`` dict that :class:`NPYWriter` saves."""
    with open(path, "rb") as handle:
        counter = _CounterUnpickler(handle).load()
    if not isinstance(counter, dict):
        raise ValueError(f"{path}: expected a dict of counters, got {type(counter).__name__}")
    return {str(k): int(v) for k, v in counter.items()}


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
        if _COV in name:
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
        present = {parts[:2] for parts in map(_split_column, self.value_dict) if parts is not None}
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
        _write_csv(frame, self.csv_path)
        for stat in self.stats:
            _plot_stat_level(
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


# -- plots ---------------------------------------------------------------------------------------


def extract_layer_stat(
    df: pd.DataFrame,
    epoch: int = -1,
    primary_metric: str | None = None,
    stat: str = "saturation",
    state_mode: str = "train",
) -> tuple[pd.DataFrame, Any]:
    """One row of a delve result table, restricted to one statistic and phase.

    Parameters
    ----------
    df : pandas.DataFrame
        A table as written by :class:`CSVWriter` (read with or without ``index_col=0``).
    epoch : int
        Index value of the row; -1 for the last row (delve's default was 19).
    primary_metric : str, optional
        A column whose value in that row is returned as well.
    stat : str
        Matched as a substring of the statistic part of the column names
        (``'saturation'``, ``'intrinsic-dimensionality'``, ...).
    state_mode : str
        The phase, ``'train'`` or ``'eval'``: columns ``'<state_mode>-...'``.

    Returns
    -------
    epoch_df : pandas.DataFrame
        One row, the matching columns in table order.
    pm : object
        The primary metric's value, or None.

    Raises
    ------
    ValueError
        If ``epoch`` is not an index value of ``df``.

    Examples
    --------
    >>> df = pd.DataFrame({"epoch": [0, 1], "train-saturation_a": [0.1, 0.2], "eval-saturation_a": [0.3, 0.4]})
    >>> row, pm = extract_layer_stat(df, epoch=-1, primary_metric="epoch")
    >>> row.to_dict("list"), int(pm)
    ({'train-saturation_a': [0.2]}, 1)
    """
    if epoch == -1:
        epoch = df.index.values[-1]
    cols = []
    for col in df.columns:
        parts = _split_column(str(col))
        if parts is not None and parts[0] == state_mode and stat in parts[1] and "accuracy" not in str(col):
            cols.append(col)
    if not np.any(df.index.values == epoch):
        raise ValueError(f"Epoch {epoch} was not recorded; the table has the indices {list(df.index.values)}")
    epoch_df = df[df.index.values == epoch]
    pm = None if primary_metric is None else epoch_df[primary_metric].values[0]
    return epoch_df[cols], pm


def plot_stat(
    df: pd.DataFrame,
    stat: str,
    pm: Any = -1,
    savepath: str = "run.png",
    epoch: Any = 0,
    primary_metric: str | None = None,
    fontsize: float = 16,
    figsize: tuple[float, float] | None = None,
    line: bool = True,
    scatter: bool = True,
    ylim: tuple[float, float] | None = (0, 1.0),
    alpha_line: float = 0.6,
    alpha_scatter: float = 1.0,
    color_line: Any = None,
    color_scatter: Any = None,
    primary_metric_loc: tuple[float, float] = (0.7, 0.8),
    show_col_label_x: bool = True,
    show_col_label_y: bool = True,
    show_grid: bool = True,
    save: bool = True,
    samples: bool = False,
    stat_mode: str = "train",
    plot_manipulation_func: Callable[[Axes], Axes] | None = None,
) -> Axes:
    """Plot the first row of ``df`` (one value per layer) against layer position.

    Parameters
    ----------
    df : pandas.DataFrame
        Usually the row from :func:`extract_layer_stat`; with ``samples=True`` a table
        whose first cell is a list of ``(x, y)`` points.
    stat : str
        Short name (``'lsat'``) or label of the statistic; the y label is its long name.
    pm : object
        Value of the primary metric, printed at ``primary_metric_loc`` (data coordinates)
        when ``primary_metric`` is given.
    savepath : str
        A path ending in ``.csv`` saves to ``<stem>_<stat>_<stat_mode>_epoch_<epoch>.png``;
        any other path is used as is.
    epoch : object
        Shown in the title and the file name; -1 means the last index of ``df``.
    figsize : (float, float), optional
        Figure size in inches; matplotlib's default when None.
    line, scatter : bool
        Draw a line, markers, or both.
    ylim : (float, float), optional
        y range; automatic when None.
    save : bool
        Write the PNG.
    samples : bool
        Scatter the points of ``df``'s first cell instead of per-layer values.
    plot_manipulation_func : callable, optional
        Called with the ``Axes`` before saving (not in delve's signature).

    Other parameters (``fontsize``, ``alpha_*``, ``color_*``, ``show_*``,
    ``primary_metric``, ``stat_mode``) are delve's, with the same meaning.

    Returns
    -------
    matplotlib.axes.Axes
        The plot's axes (on a figure with an Agg canvas; no pyplot state is touched).
        A row of only NaN values gives an empty, unsaved plot.
    """
    if epoch == -1:
        epoch = df.index.values[-1]
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    col_names = [str(c) for c in df.columns]
    first = df.values[0] if len(df) else np.array([])
    if not samples and len(first) > 0:
        try:
            if np.all(np.isnan(first.astype(np.float64))):
                return ax
        except (TypeError, ValueError):
            warnings.warn(
                "Could not check the values for NaN, likely because they are not numbers; "
                "plotting them may fail or give inconsistent results",
                stacklevel=2,
            )
    positions = list(range(len(col_names)))
    if line and not samples:
        ax.plot(positions, first, alpha=alpha_line, color=color_line)
    if scatter:
        if samples:
            for sample in first[0] if len(first) else []:
                ax.scatter(float(sample[0]), float(sample[1]), alpha=alpha_scatter, color=color_scatter)
        else:
            ax.scatter(positions, first, alpha=alpha_scatter, color=color_scatter)
    if not samples:
        ax.set_xticks(positions, [name.lstrip("_").split("_", 1)[-1] for name in col_names], rotation=90)
    if ylim is not None:
        ax.set_ylim(ylim)
    if primary_metric is not None:
        ax.text(primary_metric_loc[0], primary_metric_loc[1], f"{primary_metric}: {pm}")
    ax.tick_params(axis="y", labelsize=fontsize)
    if show_col_label_x:
        ax.set_xlabel("layers", fontsize=fontsize)
    ax.set_title(
        pathlib.Path(savepath).name.replace("_", " ").replace(".csv", f" epoch: {epoch}"), fontsize=fontsize
    )
    if show_col_label_y:
        ax.set_ylabel(STATMAP.get(stat, stat), rotation="vertical", fontsize=fontsize)
    if show_grid:
        ax.grid()
    fig.tight_layout()
    if plot_manipulation_func is not None:
        ax = plot_manipulation_func(ax)
    if save:
        fig.savefig(_png_path(savepath, stat, stat_mode, epoch))
    return ax


def _plot_stat_level(
    df: pd.DataFrame,
    savepath: str,
    epoch: Any,
    stat: str,
    stat_mode: str = "train",
    ylim: Any = "auto",
    **kwargs: Any,
) -> Axes:
    """Plot one statistic and phase of a result table; ``stat`` may be ``'lsat_eval'``."""
    if "_" in stat:
        stat, stat_mode = stat.split("_")
    if epoch == -1:
        epoch = df.index.values[-1]
    epoch_df, pm = extract_layer_stat(
        df, stat=STATMAP[stat], epoch=epoch, primary_metric=kwargs.get("primary_metric"), state_mode=stat_mode
    )
    if isinstance(ylim, str):
        ylim = (0, 1.0) if stat == "lsat" else None
    return plot_stat(
        df=epoch_df,
        pm=pm,
        savepath=savepath,
        epoch=epoch,
        stat=stat,
        ylim=ylim,
        stat_mode=stat_mode,
        **kwargs,
    )


def plot_stat_level_from_results(
    savepath: str,
    epoch: int,
    stat: str,
    primary_metric: str | None = None,
    fontsize: float = 16,
    figsize: tuple[float, float] | None = None,
    line: bool = True,
    scatter: bool = True,
    ylim: tuple[float, float] | None = (0, 1.0),
    alpha_line: float = 0.6,
    alpha_scatter: float = 1.0,
    color_line: Any = None,
    color_scatter: Any = None,
    primary_metric_loc: tuple[float, float] = (0.7, 0.8),
    show_col_label_x: bool = True,
    show_col_label_y: bool = True,
    show_grid: bool = True,
    save: bool = True,
    stat_mode: str = "train",
) -> Axes:
    """Plot one statistic of a delve CSV file, as the plot writer does.

    Parameters
    ----------
    savepath : str
        The CSV file; the PNG is saved next to it (see :func:`plot_stat`).
    epoch : int
        Row index; -1 for the last row.
    stat : str
        Short name (``'lsat'``), or ``'<stat>_<mode>'`` (``'idim_eval'``), which sets
        ``stat_mode``.

    Notes
    -----
    As in delve, ``ylim`` is ignored: (0, 1) for lsat, automatic otherwise. The other
    parameters are passed to :func:`plot_stat`.
    """
    df = pd.read_csv(savepath, sep=";", index_col=0)
    return _plot_stat_level(
        df,
        savepath,
        epoch=epoch,
        stat=stat,
        stat_mode=stat_mode,
        primary_metric=primary_metric,
        fontsize=fontsize,
        figsize=figsize,
        line=line,
        scatter=scatter,
        alpha_line=alpha_line,
        alpha_scatter=alpha_scatter,
        color_line=color_line,
        color_scatter=color_scatter,
        primary_metric_loc=primary_metric_loc,
        show_col_label_x=show_col_label_x,
        show_col_label_y=show_col_label_y,
        show_grid=show_grid,
        save=save,
    )


def plot_scatter_from_results(savepath: str, epoch: Any, stat: str, df: pd.DataFrame) -> Axes | None:
    """Scatter the latest recorded sample points (``embed``); None if there are none."""
    if len(df) == 0:
        return None
    stat = stat.split("_")[0]
    return plot_stat(
        df=df.iloc[[-1]] if epoch == -1 else df.loc[[epoch]],
        savepath=savepath,
        epoch=epoch,
        stat=stat,
        line=False,
        save=True,
        samples=True,
        ylim=None,
    )
