"""A PyTorch Lightning callback that records a run store while ``Trainer.fit`` trains.

Needs the optional extra ``lightning`` (``pip install "delve-pipeline[lightning]"``); import it
as ``from pipelines.lightning import ActivationCapture`` (``pipelines`` itself does not import it).

Examples
--------
>>> import lightning.pytorch as L
>>> capture = ActivationCapture("run.zarr", mode="gram", log_stats=("lsat",))
>>> isinstance(capture, L.Callback), capture.path
(True, 'run.zarr')
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as L
import torch

from pipelines.live_stats import LiveValue, labelled
from pipelines.training_capture import CaptureCallback, TrainingCapture

__all__ = ["ActivationCapture", "batch_token_mask", "metric_names"]


def metric_names(values: list[LiveValue]) -> dict[str, float]:
    """The logger keys of live values: ``{stat}/{phase}/{layer}`` (``lsat/train/net-fc1``; see
    :func:`pipelines.live_stats.labelled` for several thresholds or methods).

    Examples
    --------
    >>> metric_names([LiveValue("lsat", 0.99, "eval", "net-fc1", "none", 0.5)])
    {'lsat/eval/net-fc1': 0.5}
    """
    return {f"{stat}/{v.phase}/{layer}": v.value for stat, layer, v in labelled(values)}


def batch_token_mask(batch: Any, where: str | Callable[[Any], Any]) -> Any:
    """The token mask of a batch: its item ``where`` (a mapping batch), or ``where(batch)``; None if absent.

    Examples
    --------
    >>> batch_token_mask({"input_ids": [[5, 0]], "attention_mask": [[1, 0]]}, "attention_mask")
    [[1, 0]]
    >>> batch_token_mask((["x"], ["y"]), "attention_mask") is None, batch_token_mask((1, 2), lambda b: b[1])
    (True, 2)
    """
    if callable(where):
        return where(batch)
    return batch.get(where) if isinstance(batch, Mapping) else None


class ActivationCapture(CaptureCallback, L.Callback):
    """Record layer outputs or their moments to a run store during ``lightning.pytorch.Trainer.fit``.

    The :class:`capture.Recorder` is attached to the LightningModule when training starts, so
    layers are named from it (``net-fc1`` for ``self.net = nn.Sequential(...)``, index ``1``... as
    :func:`capture.discover_layers` names them). Training batches are recorded as phase ``train``,
    the validation of the epoch as ``eval``; the sanity check is not recorded. The store's epoch is
    ended once per training epoch, after that epoch's validation, and the store is closed when fit
    ends or fails. Epoch ``k`` of the training is epoch ``k`` of the store.

    Each process of a multi-process run (DDP) writes its own rank group; only global rank zero
    warns and logs. The state needed to resume (the store's next epoch and call counters) is in
    the checkpoint: fit resumed from a checkpoint continues the store from the checkpoint's epoch,
    and epochs the store holds from that epoch on (recorded by a run that went on after the
    checkpoint) are dropped with a warning, so that the store matches the resumed training.

    Parameters
    ----------
    path : str or PathLike
        The run store.
    log_stats : iterable of str
        Statistics (``lsat``, ``idim``, ``trc``, ``dtrc``, ``det``, ``logdet``, ``pr``, ``erank``) of each
        epoch's covariances handed to ``LightningModule.log_dict`` at each epoch end, named
        ``{stat}/{phase}/{layer}`` (see :func:`metric_names`), so that the trainer's logger
        (TensorBoard, CSV, Weights & Biases, MLflow) shows them. Needs ``mode="gram"`` or ``"both"``;
        with several processes they are those of all processes' samples.
    thresholds : float or iterable of float
        Thresholds of ``lsat`` and ``idim``.
    batch_mask : str, callable or None
        Where each batch's token mask is (``(batch, positions)``, 1 for a token, 0 for padding), for
        a LightningModule whose ``forward`` does not receive it (see :func:`batch_token_mask`): the
        key of a mapping batch (default ``"attention_mask"``; a batch without it has no mask), or a
        callable ``batch -> mask``. None: take no mask from the batches. The mask applies to the
        training and validation batches' calls (see ``token_mask`` of :class:`capture.Recorder`).
    **recorder_options
        Keyword arguments of :class:`capture.Recorder` (``mode``, ``layers``, ``layer_types``, ``dtype``,
        ``overwrite``, ...); the model, rank, world size and resumption come from the trainer.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        log_stats: str | Iterable[str] = (),
        thresholds: Any = (0.99,),
        batch_mask: str | Callable[[Any], Any] | None = "attention_mask",
        **recorder_options: Any,
    ) -> None:
        super().__init__()
        if batch_mask is not None and not isinstance(batch_mask, str) and not callable(batch_mask):
            raise TypeError(
                f"batch_mask: must be a batch key, a callable batch -> mask or None, got {type(batch_mask).__name__}"
            )
        self._capture = TrainingCapture(path, recorder_options, log_stats, thresholds, type(self).__name__)
        self._batch_mask = batch_mask
        self._saved: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=self.path)

    # -- fit -------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the checkpoint is restored: trainer.current_epoch is the epoch training resumes at.
        resumed = trainer.ckpt_path is not None
        self._capture.start(
            pl_module,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            resume_epoch=trainer.current_epoch if resumed else None,
            saved=self._saved if resumed else None,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._capture.begin_epoch()

    def _take_mask(self, batch: Any) -> None:
        recorder = self._capture.recorder
        if recorder is not None and self._batch_mask is not None:
            recorder.set_token_mask(batch_token_mask(batch, self._batch_mask))

    def _drop_mask(self) -> None:
        if self._capture.recorder is not None:
            self._capture.recorder.set_token_mask(None)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._take_mask(batch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._drop_mask()

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._take_mask(batch)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._drop_mask()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = self._capture.end_epoch()  # every process: the statistics are merged over them
        if values and trainer.is_global_zero:
            metrics = metric_names(values)
            # float64 tensors: a Python float would be logged as float32. The values are already those of
            # every process (sync_dist=True says so, rank_zero_only=True that no other process logs them).
            tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}
            pl_module.log_dict(tensors, on_step=False, on_epoch=True, sync_dist=True, rank_zero_only=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._capture.end_epoch()  # an epoch cut short by max_steps: what it recorded is kept
        self._capture.close()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._capture.close(failed=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._capture.close(failed=True)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self._capture.state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = dict(state_dict)
