"""A Hugging Face ``transformers`` callback that records a run store while ``Trainer.train`` trains.

Needs the optional extra ``transformers`` (``pip install "delve-pipeline[transformers]"``); import
it as ``from pipelines.huggingface import ActivationCapture`` (``pipelines`` itself does not
import it).

Examples
--------
>>> from transformers import TrainerCallback
>>> capture = ActivationCapture("run.zarr", mode="gram", layers=["transformer-h-*-mlp-c_fc"])
>>> isinstance(capture, TrainerCallback), capture.state()["args"]["layers"]
(True, ['transformer-h-*-mlp-c_fc'])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from pipelines.live_stats import LiveValue, labelled
from pipelines.training_capture import CaptureCallback, TrainingCapture, jsonable_options

__all__ = ["ActivationCapture", "log_names"]


def log_names(values: list[LiveValue]) -> dict[str, float]:
    """The ``Trainer.log`` keys of live values, after the Trainer's own (``loss`` / ``eval_loss``).

    ``lsat/{layer}`` for training, ``eval_lsat/{layer}`` for evaluation; the reporting integrations
    show them as ``train/lsat/{layer}`` and ``eval/lsat/{layer}`` (see
    :func:`pipelines.live_stats.labelled` for several thresholds or methods).

    Examples
    --------
    >>> log_names([LiveValue("lsat", 0.99, "eval", "transformer-h-0-mlp-c_fc", "last_timestep", 0.5)])
    {'eval_lsat/transformer-h-0-mlp-c_fc': 0.5}
    """
    return {
        f"{'eval_' if v.phase == 'eval' else ''}{stat}/{layer}": v.value
        for stat, layer, v in labelled(values)
    }


def _saved_state(state: TrainerState, name: str, path: str) -> Mapping[str, Any] | None:
    """This callback's state in the checkpoint's ``stateful_callbacks`` (kept even when not restored)."""
    entries = (state.stateful_callbacks or {}).get(name)
    for entry in entries if isinstance(entries, list) else [entries]:
        if isinstance(entry, Mapping) and entry.get("args", {}).get("path") == path:
            return entry.get("attributes", {}).get("resume_state")
    return None


class ActivationCapture(CaptureCallback, TrainerCallback, ExportableState):
    """Record layer outputs or their moments to a run store during ``transformers.Trainer.train``.

    The :class:`capture.Recorder` is attached to the Trainer's model when training begins, so layers
    are named from it (``transformer-h-0-mlp-c_fc`` in a GPT-2 LM, ``bert-encoder-layer-0-output-dense``
    in BERT). Training batches are recorded as phase ``train``; the evaluation run at the end of an
    epoch (``eval_strategy="epoch"``) and any evaluation during it are that epoch's ``eval`` phase,
    whatever order the Trainer calls its hooks in; an evaluation before the first epoch
    (``eval_on_start``) is not recorded. The store's epoch is ended once per training epoch, after
    that evaluation, and the store is closed when training ends. Epoch ``k`` of the training is
    epoch ``k`` of the store. The Trainer has no hook for a failed training: after ``train()``
    raised, call :meth:`close` (or a later ``train()`` does).

    Each process of a distributed run writes its own rank group; only the main process warns and
    logs. The state needed to resume is the callback's exportable state in the checkpoint
    (``trainer_state.json``; read even when ``restore_callback_states_from_checkpoint`` is off):
    training resumed from a checkpoint continues the store from the checkpoint's epoch, and epochs
    the store holds from that epoch on are dropped with a warning.

    Parameters
    ----------
    path : str or PathLike
        The run store.
    log_stats : iterable of str
        Statistics (``lsat``, ``idim``, ``trc``, ...) of each epoch's covariances handed to
        ``Trainer.log`` at each epoch end (see :func:`log_names`), so the reporting integrations
        (TensorBoard, Weights & Biases, MLflow) show them. Needs ``mode="gram"`` or ``"both"`` and the
        Trainer: add the callback with :meth:`attach`.
    thresholds : float or iterable of float
        Thresholds of ``lsat`` and ``idim``.
    **recorder_options
        Keyword arguments of :class:`capture.Recorder` (``mode``, ``layers``, ``layer_types``, ...); the
        model, rank, world size and resumption come from the Trainer.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        log_stats: str | Iterable[str] = (),
        thresholds: Any = (0.99,),
        **recorder_options: Any,
    ) -> None:
        self._capture = TrainingCapture(path, recorder_options, log_stats, thresholds, type(self).__name__)
        self._trainer: Trainer | None = None
        self._pending = False  # the epoch's training is over, its end-of-epoch evaluation is to come
        #: Set by the Trainer when ``restore_callback_states_from_checkpoint`` rebuilds the callback.
        self.resume_state: Mapping[str, Any] | None = None
        self.unsaved_options: list[str] = []

    def attach(self, trainer: Trainer) -> ActivationCapture:
        """Add this callback to ``trainer`` (if it is not there yet) and log through its ``Trainer.log``."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return self

    def close(self) -> None:
        """Remove the hooks and finish writing; the epoch in progress stays incomplete in the store."""
        self._pending = False
        self._capture.close(failed=True)

    # -- training --------------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self._capture.log_stats and self._trainer is None:
            raise ValueError(
                "log_stats: the callback logs through Trainer.log and needs the Trainer: add it with "
                "ActivationCapture(...).attach(trainer) instead of Trainer(callbacks=[...]) (a callback rebuilt "
                "by restore_callback_states_from_checkpoint=True has lost it: leave that flag off)"
            )
        if self.unsaved_options:
            warnings.warn(
                f"{self.path}: restore_callback_states_from_checkpoint rebuilt ActivationCapture without its "
                f"options {', '.join(self.unsaved_options)} (they have no JSON form); leave that flag off, the "
                "store is resumed without it",
                RuntimeWarning,
                stacklevel=2,
            )
        self.close()  # a previous train() that raised
        resumed = state.global_step > 0
        saved = self.resume_state or _saved_state(state, type(self).__name__, self.path)
        self._capture.start(
            model,
            rank=args.process_index,
            world_size=args.world_size,
            resume_epoch=int(state.epoch or 0) if resumed else None,
            saved=saved if resumed else None,
        )

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._end_epoch(state)  # an epoch whose announced evaluation never came
        self._capture.begin_epoch()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # DefaultFlowCallback (always first) has decided whether the end-of-epoch evaluation follows.
        self._pending = True
        if not control.should_evaluate:
            self._end_epoch(state)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._pending:
            self._end_epoch(state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._pending = True  # an epoch cut short by max_steps: what it recorded is kept
        self._end_epoch(state)
        self._capture.close()

    def _end_epoch(self, state: TrainerState) -> None:
        if not self._pending:
            return
        self._pending = False
        values = self._capture.end_epoch()  # every process: the statistics are merged over them
        if values and state.is_world_process_zero and self._trainer is not None:
            self._trainer.log(log_names(values))

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The exportable state (``trainer_state.json``): the arguments that rebuild the callback, and
        what resuming the store needs (``resume_state``)."""
        args, left_out = jsonable_options(self._capture.options)
        args.update(
            path=self.path, log_stats=list(self._capture.log_stats), thresholds=list(self._capture.thresholds)
        )
        return {
            "args": args,
            "attributes": {"resume_state": self._capture.state(), "unsaved_options": left_out},
        }
