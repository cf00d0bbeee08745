"""What the Lightning and Hugging Face callbacks share: one run store recorded along a training.

:class:`TrainingCapture` knows nothing of either framework. A callback tells it when training
starts (the model, this process's rank, the epoch a resumed training starts at and the state
its checkpoint saved), when an epoch begins and ends, and when training is over; it keeps the
store's epochs equal to the framework's epochs (epoch ``k`` of the training is epoch ``k`` of
the store), records nothing outside a training epoch (sanity checks, evaluations before the
first epoch), and computes the live statistics at each epoch end.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from analyze.stats import check_thresholds
from capture.recorder import Recorder
from pipelines.live_stats import EpochMoments, LiveValue, check_live_stats, gather_moments, live_values

__all__ = ["RECORDER_OPTIONS", "CaptureCallback", "TrainingCapture", "jsonable_options"]

#: Recorder arguments that the training decides (model, store, process, resumption, moments).
_DECIDED = ("modules", "path", "rank", "world_size", "resume", "resume_epoch", "call_counters", "on_block")
#: The Recorder options a callback passes on (every other keyword argument of :class:`capture.Recorder`).
RECORDER_OPTIONS: tuple[str, ...] = tuple(
    name for name in inspect.signature(Recorder).parameters if name not in _DECIDED
)


def jsonable_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The options as JSON values (tuples as lists, module types by ``module.qualname``), and the names
    of those that have no JSON form (callables, codecs), left out.

    Examples
    --------
    >>> jsonable_options({"layer_types": (nn.LayerNorm, "Conv1D"), "layer_filter": len})
    ({'layer_types': ['torch.nn.modules.normalization.LayerNorm', 'Conv1D']}, ['layer_filter'])
    """

    def convert(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, type):
            return f"{value.__module__}.{value.__qualname__}"
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        raise TypeError(type(value).__name__)

    out: dict[str, Any] = {}
    left_out: list[str] = []
    for name, value in options.items():
        try:
            out[name] = convert(value)
        except TypeError:
            left_out.append(name)
    return out, left_out


@contextlib.contextmanager
def _first_process_first(rank: int, world_size: int) -> Iterator[None]:
    """Let process 0 create the store before the others open it (two creating it at once collide)."""
    dist = torch.distributed
    together = world_size > 1 and dist.is_available() and dist.is_initialized()
    if together and rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if together and rank == 0:
            dist.barrier()


class TrainingCapture:
    """One store recorded along a training; the framework-independent half of a capture callback.

    Parameters
    ----------
    path : str or PathLike
        The run store.
    recorder_options : mapping
        Keyword arguments of :class:`capture.Recorder` (:data:`RECORDER_OPTIONS`).
    log_stats : iterable of str
        Statistics computed at each epoch end from the gram moments (``lsat``, ``idim``, ``trc``, ...);
        empty: none. Needs ``mode="gram"`` or ``"both"``.
    thresholds : float or iterable of float
        Thresholds of ``lsat`` / ``idim``.
    owner : str
        The callback's name, for messages.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        recorder_options: Mapping[str, Any],
        log_stats: str | Iterable[str] = (),
        thresholds: Any = (0.99,),
        owner: str = "ActivationCapture",
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{owner}: path must be a path to a run store, got {type(path).__name__}")
        for name in recorder_options:
            if name in _DECIDED:
                raise ValueError(
                    f"{name}: {owner} sets it from the training (model, process rank, checkpoint); do not pass it"
                )
            if name not in RECORDER_OPTIONS:
                raise TypeError(
                    f"{owner}: unknown Recorder option {name!r}; valid: {', '.join(RECORDER_OPTIONS)}"
                )
        self.path = os.fspath(path)
        self.options = dict(recorder_options)
        self.log_stats = check_live_stats(log_stats) if log_stats else ()
        self.thresholds = check_thresholds(thresholds)
        if self.log_stats and self.options.get("mode", "raw") == "raw":
            raise ValueError("log_stats: needs the gram moments; pass mode='gram' or mode='both'")
        self.owner = owner
        self.recorder: Recorder | None = None
        self.in_epoch = False
        self.quiet = False
        self._moments = EpochMoments()
        self._final: dict[str, Any] = {"path": self.path, "epoch": 0, "call_counters": {}, "mid_epoch": False}

    @contextlib.contextmanager
    def _warnings(self) -> Iterator[None]:
        """Warnings of the recorder reach the user from the first process only."""
        if not self.quiet:
            yield
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield

    def start(
        self,
        model: nn.Module,
        *,
        rank: int,
        world_size: int,
        resume_epoch: int | None = None,
        saved: Mapping[str, Any] | None = None,
    ) -> Recorder:
        """Attach the recorder to ``model`` (paused until :meth:`begin_epoch`).

        ``resume_epoch`` is the epoch a training resumed from a checkpoint starts at (None for a
        fresh training); ``saved`` is what :meth:`state` returned when that checkpoint was written.
        """
        self.close()
        self.quiet = rank != 0
        options = dict(self.options)
        if resume_epoch is not None:
            options.pop("overwrite", None)
            options.update(resume=True, resume_epoch=int(resume_epoch))
            if saved and saved.get("call_counters") is not None:
                options["call_counters"] = {str(k): int(v) for k, v in saved["call_counters"].items()}
            if saved and saved.get("mid_epoch") and int(saved.get("epoch", -1)) == int(resume_epoch):
                with self._warnings():
                    warnings.warn(
                        f"{self.path}: the training resumes in the middle of epoch {resume_epoch}: the store's "
                        f"epoch {resume_epoch} holds only the batches after the checkpoint",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        self._moments = EpochMoments()
        on_block = self._moments if self.log_stats else None
        with self._warnings(), _first_process_first(rank, world_size):
            self.recorder = Recorder(
                model, self.path, rank=rank, world_size=world_size, on_block=on_block, **options
            )
        self.recorder.stop()
        self.in_epoch = False
        return self.recorder

    def begin_epoch(self) -> None:
        """Record from now on into the store's current epoch."""
        if self.recorder is not None:
            self.recorder.resume()
            self.in_epoch = True

    def end_epoch(self) -> list[LiveValue]:
        """Commit the epoch, pause recording; the live statistics (merged over processes), if asked for.

        Every process of a multi-process run must call it (the statistics are a collective).
        """
        if self.recorder is None or not self.in_epoch:
            return []
        self.in_epoch = False
        with self._warnings():
            self.recorder.end_epoch()
        self.recorder.stop()
        if not self.log_stats:
            return []
        return live_values(gather_moments(self._moments.pop()), self.log_stats, self.thresholds)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the store: the next epoch, the call counters, whether mid-epoch."""
        rec = self.recorder
        if rec is None:  # before training, or the state it ended with
            return dict(self._final)
        return {
            "path": self.path,
            "epoch": int(rec.epoch),
            "call_counters": rec.call_counters,
            "mid_epoch": bool(self.in_epoch),
        }

    def close(self, *, failed: bool = False) -> None:
        """Remove the hooks and finish writing (an epoch not ended stays incomplete in the store).

        ``failed``: the training is failing; a writer error must not hide its exception (it is warned).
        """
        if self.recorder is None:
            return
        self._final = self.state()
        rec, self.recorder = self.recorder, None
        self.in_epoch = False
        if not failed:
            rec.close()
            return
        try:
            rec.close()
        except Exception as exc:  # noqa: BLE001 - the training's own exception is the one to see
            warnings.warn(f"{self.path}: closing the store failed too: {exc}", RuntimeWarning, stacklevel=2)


class CaptureCallback:
    """What the framework callbacks show of their :class:`TrainingCapture`: the store and the recorder."""

    _capture: TrainingCapture

    @property
    def path(self) -> str:
        """The run store."""
        return self._capture.path

    @property
    def recorder(self) -> Recorder | None:
        """The recorder while the framework trains, else None."""
        return self._capture.recorder
