"""``Recorder(..., resume=True, resume_epoch=k)``: a store rolled back to a checkpoint's epoch.

The reference is a store that never had the dropped epochs: recorded with the same data up to
epoch k, then the resumed epochs. Both must hold the same calls, raw rows, gram blocks, layers
and scalars.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from capture import Recorder, open_run

# ``b`` is not called before epoch 2, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*recorded layers never called:RuntimeWarning")


class Late(nn.Module):
    """``a`` always runs; ``b`` only from epoch 2 on (a layer first seen in an epoch to be dropped)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, epoch: int) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) if epoch >= 2 else h


def batches(epoch: int, version: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * version + epoch)
    return [torch.randn(5, 4, generator=g) for _ in range(3)]


def record(rec: Recorder, net: Late, epochs: range, version: int) -> None:
    for epoch in epochs:
        net.train()
        for x in batches(epoch, version):
            net(x, epoch)
        net.eval()
        net(batches(epoch, version)[0], epoch)
        rec.add_scalar("version", version)
        rec.end_epoch()


OPTIONS = {"mode": "both", "gram_block_rows": 7}


def test_resume_epoch_drops_the_later_epochs_and_continues_as_if_they_never_were(tmp_path):
    net, path, reference = Late(), tmp_path / "run.zarr", tmp_path / "reference.zarr"
    with Recorder(net, path, **OPTIONS) as rec:
        record(rec, net, range(4), version=1)
    counters = {"a": 8}  # after epochs 0 and 1: 4 calls each
    with pytest.warns(
        RuntimeWarning, match=r"epochs 2, 3 were recorded after the checkpoint .*\(at epoch 2\)"
    ):
        rec = Recorder(net, path, resume=True, resume_epoch=2, call_counters=counters, **OPTIONS)
    # rolled back on disk at once, before anything new is written
    run = open_run(path)
    assert run.epochs == [0, 1] and run.layers == ["a"] and sorted(run.scalars) == [0, 1]
    assert rec.epoch == 2 and rec.call_counters == counters
    with rec:
        record(rec, net, range(2, 4), version=2)
    with Recorder(net, reference, **OPTIONS) as ref:
        record(ref, net, range(2), version=1)
        record(ref, net, range(2, 4), version=2)

    run, ref_run = open_run(path), open_run(reference)
    part, ref_part = run.ranks[0], ref_run.ranks[0]
    assert run.epochs == ref_run.epochs == [0, 1, 2, 3] and run.layers == ref_run.layers == ["a", "b"]
    assert (
        run.scalars
        == ref_run.scalars
        == {0: {"version": 1}, 1: {"version": 1}, 2: {"version": 2}, 3: {"version": 2}}
    )
    np.testing.assert_array_equal(part.calls, ref_part.calls)
    for layer in ("a", "b"):
        np.testing.assert_array_equal(part.raw(layer)[:], ref_part.raw(layer)[:])
        got, want = part.gram(layer, "none"), ref_part.gram(layer, "none")
        assert got.blocks == want.blocks
        for array in ("info", "count", "mean", "m2"):  # the committed blocks, all of them equal
            np.testing.assert_array_equal(
                np.asarray(getattr(got, array))[: got.blocks], np.asarray(getattr(want, array))[: want.blocks]
            )


def test_a_resume_without_new_commit_never_shows_a_dropped_epoch_again(tmp_path):
    net, path = Late(), tmp_path / "run.zarr"
    with Recorder(net, path, **OPTIONS) as rec:
        record(rec, net, range(3), version=1)
    with pytest.warns(RuntimeWarning, match="epochs 1, 2 were recorded"):
        rec = Recorder(net, path, resume=True, resume_epoch=1, **OPTIONS)
    net(batches(1, 3)[0], 1)  # recorded, never committed: the run stops here
    rec.close()
    run = open_run(path)
    assert run.epochs == [0] and run.incomplete_epoch == 1
    with Recorder(net, path, resume=True, **OPTIONS) as rec:  # an ordinary resume goes on at epoch 1
        assert rec.epoch == 1
        record(rec, net, range(1, 2), version=2)
    assert open_run(path).epochs == [0, 1] and open_run(path).scalars[1] == {"version": 2}


def test_resume_epoch_past_the_store_warns_about_the_missing_epochs(tmp_path):
    net, path = Late(), tmp_path / "run.zarr"
    with Recorder(net, path, **OPTIONS) as rec:
        record(rec, net, range(1), version=1)
    with pytest.warns(RuntimeWarning, match=r"resumes at epoch 3 but the store lacks epochs 1, 2"):
        rec = Recorder(net, path, resume=True, resume_epoch=3, **OPTIONS)
    with rec:
        record(rec, net, range(3, 4), version=2)
    assert open_run(path).epochs == [0, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resume_epoch": 1}, "resume_epoch / call_counters: only with resume=True"),
        ({"call_counters": {"a": 1}}, "resume_epoch / call_counters: only with resume=True"),
        ({"resume": True, "resume_epoch": -1}, "resume_epoch: must be an integer >= 0, got -1"),
        ({"resume": True, "resume_epoch": 1.5}, "resume_epoch: must be an integer >= 0, got 1.5"),
    ],
)
def test_bad_resume_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recorder(Late(), tmp_path / "run.zarr", **kwargs)
