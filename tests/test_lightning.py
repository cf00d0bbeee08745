"""pipelines.lightning.ActivationCapture under a real ``lightning.pytorch.Trainer`` on the CPU.

The reference is a plain forward-hook tape on the same layers during the same fit, its calls
split by training epoch, reduced with numpy (tests/_frameworks.py). One process and two DDP
processes (spawn, gloo), an exception, and a fit killed with SIGKILL then resumed from an older
checkpoint.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

from _frameworks import assert_close, expected_table, quiet_lightning, table_of  # noqa: E402
from _lightning_worker import LAYERS, TinyModule, checkpoints, loaders, trainer  # noqa: E402

from capture import open_run  # noqa: E402
from pipelines.lightning import ActivationCapture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_lightning_worker.py")
LOGGED = ("lsat", "trc", "erank")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    quiet_lightning()


class EpochSplit(L.Callback):
    """The tape's calls per training epoch (the sanity check, before training starts, left out)."""

    def __init__(self, tape: Any) -> None:
        self.tape = tape
        self.epochs: list[list[Any]] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.tape.clear()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epochs.append(list(self.tape.seen))
        self.tape.clear()


def logged_metrics(logger: Any) -> dict[tuple[int, str, str, str], float]:
    """``(epoch, phase, layer, stat) -> value`` of the ``{stat}/{phase}/{layer}`` columns of a CSVLogger."""
    out = {}
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.count("/") == 2 and value:
                    stat, phase, layer = key.split("/")
                    out[(int(row["epoch"]), phase, layer, stat)] = float(value)
    return out


def test_fit_records_train_and_eval_per_epoch_as_plain_hooks_see_them(tmp_path, hook_tape):
    model = TinyModule()
    tape = hook_tape({name: model.net[int(name[-1])] for name in LAYERS})
    split = EpochSplit(tape)
    store = tmp_path / "run.zarr"
    capture = ActivationCapture(store, mode="both", log_stats=LOGGED, gram_block_rows=12)
    logger = L.loggers.CSVLogger(tmp_path, name="logs")
    fit = trainer(str(tmp_path), 2, [capture, split], logger=logger, num_sanity_val_steps=2)
    fit.fit(model, *loaders())

    run = open_run(store)
    assert run.epochs == [0, 1] and run.layers == list(LAYERS) and run.incomplete_epoch is None
    # 32 training and 16 validation samples per epoch; the sanity check's 16 are not recorded
    assert run.samples() == {
        (e, p, n): 32 if p == "train" else 16 for e in (0, 1) for p in ("train", "eval") for n in LAYERS
    }
    for name in LAYERS:  # raw rows in call order, equal to what the hooks saw
        seen = [s.output for epoch in split.epochs for s in epoch if s.name == name]
        np.testing.assert_array_equal(run.ranks[0].raw(name)[:], torch.cat(seen).numpy())
    want = expected_table(split.epochs, LAYERS)
    assert_close(table_of(store), want)
    # the live statistics reached the trainer's logger, with the store's numbers
    assert_close(logged_metrics(logger), {k: v for k, v in want.items() if k[3] in LOGGED})
    # fit is over: hooks removed, and the state a checkpoint would keep says where the store is
    assert capture.recorder is None and all(len(model.net[i]._forward_hooks) == 1 for i in (0, 2, 4))
    assert capture.state_dict() == {
        "path": str(store),
        "epoch": 2,
        "call_counters": dict.fromkeys(LAYERS, 12),
        "mid_epoch": False,
    }


@pytest.mark.slow
def test_two_ddp_processes_store_the_statistics_of_one_process(tmp_path):
    """With a learning rate of 0 both runs see the same samples: two rank groups, the same statistics."""
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    fit = trainer(str(tmp_path / "a"), 2, [ActivationCapture(one, mode="gram")], num_sanity_val_steps=0)
    fit.fit(TinyModule(lr=0.0), *loaders())
    logger = L.loggers.CSVLogger(tmp_path, name="logs", version=0)  # chosen here, not in the workers
    capture = ActivationCapture(two, mode="gram", log_stats=LOGGED)
    fit = trainer(
        str(tmp_path / "b"),
        2,
        [capture],
        strategy="ddp_spawn",
        devices=2,
        logger=logger,
        num_sanity_val_steps=0,
    )
    fit.fit(TinyModule(lr=0.0), *loaders())

    run = open_run(two)
    assert [p.rank for p in run.ranks] == [0, 1] and run.epochs == [0, 1]
    for part in run.ranks:  # each process saw half of the data
        assert sum(part.calls[:, 5]) == 2 * 3 * (16 + 8)
    reference = table_of(one)
    assert_close(table_of(two), reference)
    # rank 0 logged the statistics of both processes' samples
    assert_close(logged_metrics(logger), {k: v for k, v in reference.items() if k[3] in LOGGED})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_killed_fit_resumed_from_an_older_checkpoint_matches_an_uninterrupted_fit(tmp_path):
    store, ckpt = tmp_path / "run.zarr", tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(store), str(ckpt), "4", "2"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = open_run(store)
    assert killed.epochs == [0, 1] and killed.incomplete_epoch == 2
    saved = torch.load(ckpt / "epoch=0.ckpt", weights_only=False)["callbacks"]
    state = saved[ActivationCapture(store).state_key]
    assert state["epoch"] == 1 and state["call_counters"] == dict.fromkeys(LAYERS, 6)

    # Resume from the checkpoint of epoch 0: the store's epoch 1 came after it and is dropped.
    capture = ActivationCapture(store, mode="both", gram_block_rows=8)
    with pytest.warns(RuntimeWarning, match=r"epoch 1 was recorded after the checkpoint .*at epoch 1"):
        callbacks = [capture, checkpoints(str(ckpt))]
        trainer(str(tmp_path), 3, callbacks, enable_checkpointing=True, num_sanity_val_steps=0).fit(
            TinyModule(), *loaders(), ckpt_path=ckpt / "epoch=0.ckpt"
        )
    reference = tmp_path / "reference.zarr"
    capture = ActivationCapture(reference, mode="both", gram_block_rows=8)
    trainer(str(tmp_path / "ref"), 3, [capture], num_sanity_val_steps=0).fit(TinyModule(), *loaders())

    run, ref = open_run(store), open_run(reference)
    assert run.epochs == ref.epochs == [0, 1, 2] and run.incomplete_epoch is None
    np.testing.assert_array_equal(run.ranks[0].calls, ref.ranks[0].calls)  # call counters continued
    for name in LAYERS:
        np.testing.assert_array_equal(run.ranks[0].raw(name)[:], ref.ranks[0].raw(name)[:])
        blocks, ref_blocks = run.ranks[0].gram(name, "none"), ref.ranks[0].gram(name, "none")
        np.testing.assert_array_equal(blocks.info, ref_blocks.info)
    assert_close(table_of(store, source="gram"), table_of(reference, source="raw"))


class FailingModule(TinyModule):
    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        if self.current_epoch == 1 and index == 1:
            raise RuntimeError("training failed")
        return super().training_step(batch, index)


def test_an_exception_closes_the_store_and_keeps_the_committed_epochs(tmp_path):
    model = FailingModule()
    capture = ActivationCapture(tmp_path / "run.zarr", mode="gram")
    with pytest.raises(RuntimeError, match="training failed"):
        trainer(str(tmp_path), 3, [capture], num_sanity_val_steps=0).fit(model, *loaders())
    run = open_run(tmp_path / "run.zarr")
    assert run.epochs == [0] and run.incomplete_epoch == 1
    assert capture.recorder is None and not any(m._forward_hooks for m in model.modules())
    assert sorted(table_of(tmp_path / "run.zarr", stats=["lsat"])) == [
        (0, phase, name, "lsat") for phase in ("eval", "train") for name in LAYERS
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 1}, ValueError, "rank: ActivationCapture sets it from the training"),
        ({"resume": True}, ValueError, "resume: ActivationCapture sets it"),
        ({"moed": "gram"}, TypeError, "unknown Recorder option 'moed'; valid: mode, layer_filter"),
        ({"log_stats": ("lsat",)}, ValueError, "log_stats: needs the gram moments; pass mode='gram'"),
        ({"mode": "gram", "log_stats": ("cov",)}, ValueError, "log_stats: 'cov' is not a number"),
        ({"mode": "gram", "log_stats": ("sat",)}, ValueError, "invalid log_stats value 'sat'"),
        ({"mode": "gram", "log_stats": ("lsat",), "thresholds": (1.5,)}, ValueError, "thresholds"),
    ],
)
def test_bad_options_are_refused_when_the_callback_is_made(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        ActivationCapture(tmp_path / "run.zarr", **kwargs)


def test_two_stores_have_their_own_checkpoint_state(tmp_path):
    a, b = ActivationCapture(tmp_path / "a.zarr"), ActivationCapture(tmp_path / "b.zarr")
    assert a.state_key != b.state_key and str(tmp_path / "a.zarr") in a.state_key


@pytest.mark.parametrize(
    "module", ["pipelines.lightning", "pipelines.live_stats", "pipelines.training_capture"]
)
def test_doctests(module, tmp_path, monkeypatch):
    import doctest
    import importlib

    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed
