"""A small LightningModule and its data for test_lightning.py, importable by the processes it starts.

Not a test module (the leading underscore keeps pytest away). DDP spawn pickles the module and
the loaders, so they live at module level here. As a script,
``python tests/_lightning_worker.py STORE CKPT_DIR EPOCHS KILL_EPOCH`` fits :class:`TinyModule`
with :class:`pipelines.lightning.ActivationCapture` and a checkpoint per epoch, and SIGKILLs itself
after the second training batch of epoch ``KILL_EPOCH``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import lightning.pytorch as L
import torch
from _frameworks import quiet_lightning
from torch import nn


class TinyData(torch.utils.data.Dataset):
    """``n`` deterministic (x, y) pairs, x in R^6 and y in R^3."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randn(n, 3, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class TinyModule(L.LightningModule):
    """``net = Sequential(Linear(6, 16), Tanh, Linear(16, 8), Tanh, Linear(8, 3))``, SGD with momentum."""

    def __init__(self, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, index: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


LAYERS = ("net-0", "net-2", "net-4")


def loaders(batch_size: int = 8, train: int = 32, val: int = 16) -> tuple[Any, Any]:
    """Unshuffled train and validation loaders of :class:`TinyData`."""
    make = torch.utils.data.DataLoader
    return make(TinyData(train, 1), batch_size=batch_size), make(TinyData(val, 2), batch_size=batch_size)


def trainer(root: str, epochs: int, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer (no progress bar, no summary; no logger or checkpoints unless given)."""
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


class KillAt(L.Callback):
    """SIGKILL this process after the second training batch of epoch ``epoch``.

    The capture's writer is drained first, so the store deterministically holds that epoch's
    data written so far, uncommitted (a kill at a random moment of the writer is the reliability
    suite's business).
    """

    def __init__(self, epoch: int, capture: Any) -> None:
        self.epoch = epoch
        self.capture = capture

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.current_epoch == self.epoch and trainer.fit_loop.epoch_loop.batch_idx == 1:
            self.capture.recorder.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def checkpoints(directory: str) -> L.Callback:
    """A checkpoint at the end of every epoch, ``epoch=K.ckpt``."""
    return L.callbacks.ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1)


def main(store: str, ckpt_dir: str, epochs: int, kill_epoch: int) -> None:
    from pipelines.lightning import ActivationCapture

    quiet_lightning()
    capture = ActivationCapture(store, mode="both", gram_block_rows=8)
    fit = trainer(
        ckpt_dir,
        epochs,
        [capture, checkpoints(ckpt_dir), KillAt(kill_epoch, capture)],
        enable_checkpointing=True,
        num_sanity_val_steps=0,
    )
    train, val = loaders()
    fit.fit(TinyModule(), train, val)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
