"""Crash safety: a training process killed with SIGKILL mid-epoch leaves a store whose committed
epochs read back exactly, and ``Recorder(resume=True)`` continues it to the same data as an
uninterrupted run."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from capture import Recorder, open_run
from capture.format import CALL_COLUMNS, PHASES

TRAIN_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    import torch
    from torch import nn

    from capture import Recorder, open_run

    torch.set_num_threads(1)  # bit-for-bit the same numbers in every process
    store, work, epochs, ready_after, how = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    work.mkdir(exist_ok=True)


    def batches(epoch):
        g = torch.Generator().manual_seed(1000 + epoch)
        train = [torch.randn(b, 1, 8, 8, generator=g) for b in (6, 5, 7)]
        return train, torch.randn(4, 1, 8, 8, generator=g)


    def step(x):
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss


    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    start = 0
    if how == "resume":
        done = open_run(store).epochs
        if done:
            state = torch.load(work / f"epoch{done[-1]}.pt")
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start = done[-1] + 1
    rec = Recorder(net, store, mode="both", resume=how == "resume", gram_block_rows=8, chunk_bytes=1000)
    assert rec.epoch == start, (rec.epoch, start)
    for epoch in range(start, epochs):
        train, test = batches(epoch)
        net.train()
        for x in train:
            loss = step(x)
        net.eval()
        with torch.no_grad():
            net(test)
        rec.add_scalar("loss", loss.item())
        rec.end_epoch()
        torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, work / "tmp.pt")
        os.replace(work / "tmp.pt", work / f"epoch{epoch}.pt")
        if epoch + 1 == ready_after:
            (work / "ready").write_text(str(epoch))
            net.train()
            while True:  # the next epoch never ends: raw rows and gram blocks keep coming until killed
                for x in batches(epoch + 1)[0]:
                    step(x)
                time.sleep(0.002)
    rec.close()
    """
)


def start(script: Path, store: Path, work: Path, epochs: int, ready_after: int, how: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    args = [sys.executable, str(script), str(store), str(work), str(epochs), str(ready_after), how]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out


def epoch_data(path: Path, epochs: list[int]) -> dict:
    """Everything a run store holds about ``epochs``: calls, raw rows, gram blocks, scalars."""
    run = open_run(path)
    part = run.ranks[0]
    col = {c: i for i, c in enumerate(CALL_COLUMNS)}
    calls = part.calls[np.isin(part.calls[:, col["epoch"]], epochs)]
    out: dict = {"calls": calls, "scalars": {e: run.scalars[e] for e in epochs}}
    for name in run.layers:
        layer_calls = calls[calls[:, col["layer"]] == part.layers[name].index]
        stop = int((layer_calls[:, col["first_row"]] + layer_calls[:, col["row_count"]]).max())
        out[name, "raw"] = part.raw(name)[:stop]
        for method in part.layers[name].gram:
            blocks = part.gram(name, method)
            keep = np.flatnonzero(np.isin(blocks.info_column("epoch"), epochs))
            assert np.array_equal(keep, np.arange(len(keep)))  # an epoch's blocks follow the previous ones
            out[name, method] = [blocks.info[keep]] + [
                np.asarray(a[: len(keep)]) for a in (blocks.count, blocks.mean, blocks.m2)
            ]
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], list):
            for x, y in zip(a[key], b[key], strict=True):
                np.testing.assert_array_equal(x, y, err_msg=str(key))
        elif isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
        else:
            assert a[key] == b[key], key


def test_sigkill_mid_epoch_then_resume(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    ref_store, store = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    victim = start(script, store, tmp_path / "killed", 4, 2, "fresh")
    # meanwhile, the uninterrupted run: the same script, in this process (one thread, as there)
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(
            sys, "argv", [str(script), str(ref_store), str(tmp_path / "ref"), "4", "-1", "fresh"]
        )
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    ready = tmp_path / "killed" / "ready"
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "the training script never got ready"
        time.sleep(0.05)
    time.sleep(0.5)  # let it write some of epoch 2
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL

    run = open_run(store)
    assert run.epochs == [0, 1] and run.incomplete_epoch == 2
    assert run.layers == open_run(ref_store).layers == ["0", "3", "5"]
    assert_same(epoch_data(store, [0, 1]), epoch_data(ref_store, [0, 1]))

    finish(start(script, store, tmp_path / "killed", 4, -1, "resume"))
    run, ref = open_run(store), open_run(ref_store)
    assert run.epochs == ref.epochs == [0, 1, 2, 3] and run.incomplete_epoch is None
    assert run.ranks[0].state["call_counters"] == ref.ranks[0].state["call_counters"]
    assert run.ranks[0].state["committed"] == ref.ranks[0].state["committed"]
    assert_same(epoch_data(store, [0, 1, 2, 3]), epoch_data(ref_store, [0, 1, 2, 3]))


# -- the same states in-process: a recorder closed without end_epoch stops where a crash would ---


def batch(seed: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed))


def run_epochs(rec: Recorder, net: nn.Module, epochs: list[list[int]], close: bool = True) -> None:
    for seeds in epochs:
        for seed in seeds:
            net(batch(seed, 5))
        rec.end_epoch()
    if close:
        rec.close()


@pytest.mark.parametrize("crash_epoch", [0, 1])
def test_resume_discards_what_the_unfinished_epoch_wrote(tmp_path, crash_epoch):
    """Layers first seen and gram blocks flushed in the unfinished epoch are not counted twice."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    plan = [[1, 2], [3, 4, 5], [6]]
    options = {"mode": "both", "gram_block_rows": 4, "chunk_bytes": 40}
    ref_path, path = tmp_path / "ref.zarr", tmp_path / "run.zarr"
    run_epochs(Recorder(net, ref_path, **options), net, plan)

    rec = Recorder(net, path, **options)
    run_epochs(rec, net, plan[:crash_epoch], close=False)
    for seed in (91, 92, 93):  # blocks of 5 rows > gram_block_rows: flushed and visible mid-epoch
        net(batch(seed, 5))
    rec.close()  # no end_epoch: the epoch stays incomplete, as after a crash
    run = open_run(path)
    assert run.epochs == list(range(crash_epoch)) and run.incomplete_epoch == crash_epoch
    blocks = run.ranks[0].gram("0", "none") if crash_epoch else None
    assert blocks is None or crash_epoch in blocks.info_column("epoch")  # the stale blocks are there

    rec = Recorder(net, path, resume=True, **options)
    assert rec.epoch == crash_epoch
    run_epochs(rec, net, plan[crash_epoch:])
    run, ref = open_run(path), open_run(ref_path)
    assert run.epochs == [0, 1, 2] and run.incomplete_epoch is None
    part, ref_part = run.ranks[0], ref.ranks[0]
    np.testing.assert_array_equal(part.calls, ref_part.calls)
    # the calls of the lost epoch are forgotten: the counters continue from the last commit
    assert part.state["call_counters"] == ref_part.state["call_counters"]
    for name in ("0", "2"):
        np.testing.assert_array_equal(part.raw(name)[:], ref_part.raw(name)[:])
        blocks, ref_blocks = part.gram(name, "none"), ref_part.gram(name, "none")
        np.testing.assert_array_equal(blocks.info, ref_blocks.info)
        for i in range(ref_blocks.blocks):
            for x, y in zip(blocks.read(i), ref_blocks.read(i), strict=True):
                np.testing.assert_array_equal(x, y)
    samples = {(e, p, n): 5 * len(plan[e]) for e in range(3) for p in PHASES[:1] for n in ("0", "2")}
    assert run.samples() == samples
