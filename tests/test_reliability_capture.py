"""Faults during capture: SIGKILLed training, a full disk, a failing writer thread.

A training process (``tests/_kill_worker.py``) is SIGKILLed at many moments: at chosen store file
writes (before one, in the middle of one, after one), at chosen calls of the writer's methods
(epoch opening, gram block flushes and mid-epoch commits, raw chunk writes, between the data
flush and the commit of ``end_epoch``), at chosen training steps, inside ``Recorder.close``, and
from outside after random delays. Every time the store must open, every completed epoch must
analyse to the uninterrupted run's numbers (raw and gram sources, lsat / idim / trc), the
unfinished epoch must be reported as incomplete, and ``Recorder(..., resume=True)`` must finish the
run with exactly the uninterrupted run's stored values. ``docs/reliability.md`` sums up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import zarr.codecs
import zarr.storage._local as zarr_local
from torch import nn

import capture.store_writer as store_writer
from analyze import AnalysisError, run_stats
from capture import CaptureError, Recorder, StoreFormatError, open_run

WORKER = Path(__file__).with_name("_kill_worker.py")
SEED = 7
EPOCHS = 3  # _kill_worker.EPOCHS
STATS = ("lsat", "idim", "trc")
CONV_METHODS = ("channelwise",)  # _kill_worker.RECORDER_OPTIONS
N_WRITE_KILLS = 10
N_TIMED_KILLS = 4


def _worker(*args: str, timeout: float = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, f"worker {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"


# -- the kill points -------------------------------------------------------------------------------


def _slots() -> list[tuple[str, dict[str, Any]]]:
    """The kill points, by name; store-write numbers and delays are drawn in :func:`_materialise`."""
    slots: list[tuple[str, dict[str, Any]]] = []
    # Store creation: after each of the first writes (root group, rank group with its state, ...).
    for n in (1, 2, 3):
        slots.append((f"create-write{n}-after", {"at": "write", "n": n, "how": "after"}))
    # Store writes over the whole run, one per stratum, before / in the middle of / after the write.
    for i in range(N_WRITE_KILLS):
        how = ("before", "partial", "after")[i % 3]
        slots.append((f"write-stratum{i}-{how}", {"at": "write", "stratum": i, "how": how}))
    # The writer thread: epoch opening, gram block flushes and mid-epoch gram commits, raw chunk
    # writes, end_epoch's commit (data flushed and calls written, not committed). ``n`` is a call
    # number, or a fraction of the reference run's calls.
    for target, n, how in (
        ("RunStoreWriter.open_epoch", 2, "before"),
        ("RunStoreWriter.open_epoch", 3, "after"),
        ("RunStoreWriter.write_gram_block", 0.45, "before"),
        ("RunStoreWriter.write_gram_block", 0.9, "after"),
        ("RunStoreWriter.commit_blocks", 0.2, "before"),
        ("RunStoreWriter.commit_blocks", 0.6, "after"),
        ("_RawSink._write", 0.3, "before"),
        ("_RawSink._write", 0.75, "after"),
        ("RunStoreWriter.write_calls", 2, "after"),
        ("_GrowingArray.trim", 1.5 / EPOCHS, "before"),  # in the middle of epoch 1's commit
        ("RunStoreWriter.commit_epoch", 2, "before"),
        ("RunStoreWriter.commit_epoch", EPOCHS, "after"),  # all committed, before close
    ):
        call = f"{n:.2f}" if isinstance(n, float) else str(n)
        kill = {"at": "method", "target": target, "n": n, "how": how}
        slots.append((f"{target.split('.')[1].lstrip('_')}-call{call}-{how}", kill))
    # The training thread: in Recorder.close, in end_epoch, at training and evaluation steps (after
    # letting the writer drain, or not).
    for target, n, racy in (
        ("BackgroundWriter.close", 1, False),
        ("Recorder.end_epoch", 2, True),
        ("Recorder._flush_writer", 2, True),
    ):
        kill = {"at": "method", "target": target, "n": n, "how": "before", "racy": racy}
        slots.append((f"{target.replace('._', '.').replace('.', '-')}-call{n}", kill))
    for epoch, phase, step, drain in (
        (0, "train", 2, True),
        (1, "eval", 1, False),
        (2, "train", 0, True),
        (2, "eval", 1, False),
    ):
        kill = {"at": "step", "epoch": epoch, "phase": phase, "step": step, "drain": drain}
        slots.append((f"step-e{epoch}-{phase}{step}" + ("-drained" if drain else ""), kill))
    # From outside, after random delays (the child sleeps 0.05 s a step: a run lasts about 1.5 s).
    for i in range(N_TIMED_KILLS):
        slots.append((f"timed{i}", {"at": "timed"}))
    return slots


KILL_SLOTS = _slots()
SLOT_NAMES = [name for name, _ in KILL_SLOTS]


def _materialise(log: dict[str, Any]) -> list[dict[str, Any]]:
    """Concrete kill points: write numbers from the reference's write count, call numbers, delays."""
    rng = random.Random(SEED)
    edges = np.linspace(4, int(log["total"]) + 1, N_WRITE_KILLS + 1).astype(int)
    points = []
    for _, template in KILL_SLOTS:
        kill = dict(template)
        if "stratum" in kill:
            i = kill.pop("stratum")
            kill["n"] = rng.randrange(edges[i], edges[i + 1])
        if isinstance(kill.get("n"), float):
            kill["n"] = max(1, round(kill["n"] * log["calls"][kill["target"]]))
        if kill["at"] == "timed":
            kill["delay"] = round(rng.uniform(0.0, 1.0), 3)
        points.append(kill)
    return points


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the reference, then every kill point (two worker processes, each forking per point)."""
    root = tmp_path_factory.mktemp("kills")
    ref = root / "reference.zarr"
    _worker("reference", str(ref), str(root / "reference.json"))
    log = json.loads((root / "reference.json").read_text())
    jobs = []
    for (name, _), kill in zip(KILL_SLOTS, _materialise(log), strict=True):
        job = {
            "id": name,
            "kill": kill,
            "store": str(root / f"{name}.zarr"),
            "resume_store": str(root / f"{name}-resumed.zarr"),
        }
        if kill["at"] == "timed":
            job["sleep"] = 0.05
        jobs.append(job)
    for k in range(2):
        (root / f"jobs{k}.json").write_text(json.dumps(jobs[k::2]))
    with ThreadPoolExecutor(2) as pool:
        list(
            pool.map(
                lambda k: _worker("batch", str(root / f"jobs{k}.json"), str(root / f"results{k}.json")),
                range(2),
            )
        )
    results = {}
    for k in range(2):
        for r in json.loads((root / f"results{k}.json").read_text()):
            results[r["id"]] = r
    return {"root": root, "ref": str(ref), "log": log, "jobs": jobs, "results": results, "cache": {}}


# -- expectations ----------------------------------------------------------------------------------


def _state_after(log: dict[str, Any], done: int) -> tuple[bool, list[int], int | None] | None:
    """What the store declares once the writes numbered ``<= done`` are on disk.

    ``None``: not a run store yet (no root attributes). Else ``(has_group_state, complete, open)``.
    """
    root_ok = any(w["key"] == "zarr.json" and w.get("root_attrs") and w["n"] <= done for w in log["writes"])
    if not root_ok:
        return None
    states = [w for w in log["writes"] if w.get("complete") is not None and w["n"] <= done]
    if not states:
        return (False, [], None)
    return (True, list(states[-1]["complete"]), states[-1]["open"])


def _expected(job: dict[str, Any], result: dict[str, Any], log: dict[str, Any]) -> list[Any]:
    """The allowed ``(complete epochs, incomplete epoch)`` outcomes (``None``: not a store yet)."""
    kill = job["kill"]
    journal = result["journal"]
    if kill["at"] == "write":
        done = kill["n"] if kill["how"] == "after" else kill["n"] - 1
    elif kill["at"] == "method" and not kill.get("racy"):
        # At a writer-method boundary, or with an idle writer, no store write is in flight.
        assert journal["started"] == journal["finished"], journal
        done = journal["started"]
    else:
        done = None
    if done is not None:
        state = _state_after(log, done)
        if state is None:
            return [None]
        return [(state[1], state[2])]
    if kill["at"] == "step" or kill.get("racy"):
        e = journal["epoch"]
        if kill.get("drain"):
            return [(list(range(e)), e)]
        allowed = [(list(range(e)), e), (list(range(e)), None)]
        if kill["at"] == "method" and kill["target"].endswith("_flush_writer"):
            allowed.append((list(range(e + 1)), None))
        return allowed
    # timed: any prefix of epochs, the next one open or not yet opened
    return [(list(range(k)), o) for k in range(EPOCHS + 1) for o in ((k, None) if k < EPOCHS else (None,))]


# -- comparisons -----------------------------------------------------------------------------------


def _stats(store: str, epochs: list[int], source: str) -> pd.DataFrame:
    table = run_stats(
        store,
        stats=STATS,
        conv_methods=CONV_METHODS,
        epochs=epochs,
        source=source,
        scheduler="synchronous",
        progress=False,
    )
    table = table.assign(run="run")
    keys = ["epoch", "phase", "layer", "conv_method", "timeseries_method", "stat", "threshold"]
    return table.sort_values(keys, kind="mergesort").reset_index(drop=True)


def _reference_stats(campaign: dict[str, Any], epochs: list[int], source: str) -> pd.DataFrame:
    key = (tuple(epochs), source)
    if key not in campaign["cache"]:
        campaign["cache"][key] = _stats(campaign["ref"], epochs, source)
    return campaign["cache"][key]


def _assert_same_stats(campaign: dict[str, Any], store: str, epochs: list[int]) -> None:
    for source in ("raw", "gram"):
        got = _stats(store, epochs, source)
        want = _reference_stats(campaign, epochs, source)
        assert len(got) > 0
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def _arrays(store: str) -> dict[str, np.ndarray]:
    """Every committed value of a store's rank group: calls, raw rows, gram blocks of complete epochs."""
    run = open_run(store)
    part = run.ranks[0]
    out = {"calls": part.calls}
    for layer, rec in part.layers.items():
        if rec.raw_array:
            out[f"{layer}/raw"] = part.raw(layer)[:]
        for method in rec.gram:
            blocks = part.gram(layer, method)
            keep = np.isin(blocks.info_column("epoch"), run.epochs)
            k = int(keep.sum())
            assert keep[:k].all(), "the blocks of complete epochs come first"
            out[f"{layer}/{method}/info"] = blocks.info[:k]
            for name in ("count", "mean", "m2"):
                out[f"{layer}/{method}/{name}"] = np.asarray(getattr(blocks, name)[:k])
    return out


def _assert_same_arrays(campaign: dict[str, Any], store: str, whole: bool) -> None:
    """The committed values equal the uninterrupted run's: a prefix of them, or all of them."""
    if "arrays" not in campaign["cache"]:
        campaign["cache"]["arrays"] = _arrays(campaign["ref"])
    want = campaign["cache"]["arrays"]
    got = _arrays(store)
    assert set(got) <= set(want) and (not whole or set(got) == set(want))
    for key, value in got.items():
        assert len(value) <= len(want[key]) and (not whole or len(value) == len(want[key])), key
        np.testing.assert_array_equal(value, want[key][: len(value)], err_msg=key)


# -- the kill tests --------------------------------------------------------------------------------


def test_kill_campaign(campaign: dict[str, Any]) -> None:
    """At least 20 deterministic kill points spread over the epochs, plus timed kills; all SIGKILLed."""
    kinds = [j["kill"]["at"] for j in campaign["jobs"]]
    assert len(kinds) - kinds.count("timed") >= 20 and kinds.count("timed") >= 3
    killed_in = {r["journal"]["epoch"] for r in campaign["results"].values() if r["journal"]}
    assert killed_in >= set(range(EPOCHS))
    assert all(r["kill_status"]["signal"] == signal.SIGKILL for r in campaign["results"].values())
    assert all(r.get("ready", True) for r in campaign["results"].values())


def _job(campaign: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    job = next(j for j in campaign["jobs"] if j["id"] == name)
    return job, campaign["results"][name]


@pytest.mark.slow
@pytest.mark.parametrize("slot", SLOT_NAMES)
def test_killed_store_reads_back(campaign: dict[str, Any], slot: str) -> None:
    job, result = _job(campaign, slot)
    assert result["kill_status"]["signal"] == signal.SIGKILL, result
    allowed = _expected(job, result, campaign["log"])
    store = job["store"]
    if allowed == [None]:  # killed before the store's first file: nothing to open, nothing lost
        with pytest.raises((FileNotFoundError, StoreFormatError)):
            open_run(store)
        return
    run = open_run(store)
    assert (run.epochs, run.incomplete_epoch) in allowed, (job["id"], result["journal"])
    if run.epochs:
        _assert_same_stats(campaign, store, run.epochs)
        _assert_same_arrays(campaign, store, whole=False)
    else:
        with pytest.raises(AnalysisError, match="no complete epoch"):
            run_stats(store, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("slot", SLOT_NAMES)
def test_resumed_run_equals_uninterrupted(campaign: dict[str, Any], slot: str) -> None:
    job, result = _job(campaign, slot)
    assert result["resume_status"] == {"signal": None, "exit": 0}, result
    run = open_run(job["resume_store"])
    assert run.epochs == list(range(EPOCHS)) and run.incomplete_epoch is None
    _assert_same_stats(campaign, job["resume_store"], run.epochs)
    _assert_same_arrays(campaign, job["resume_store"], whole=True)


# -- a full disk -----------------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _batches(epoch: int, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + epoch)
    return [torch.randn(8, 1, 4, 4, generator=g) for _ in range(n)]


def _record_epochs(rec: Recorder, net: nn.Module, epochs: range) -> None:
    for epoch in epochs:
        for x in _batches(epoch):
            net(x)
        rec.end_epoch()


OPTIONS: dict[str, Any] = {"mode": "both", "chunk_bytes": 256, "gram_block_rows": 16}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three epochs of :class:`SmallNet` without faults."""
    path = str(tmp_path_factory.mktemp("clean") / "clean.zarr")
    torch.manual_seed(0)
    net = SmallNet()
    with Recorder(net, path, **OPTIONS) as rec:
        _record_epochs(rec, net, range(3))
    return path


def _same_stats(store: str, ref: str, epochs: list[int]) -> None:
    for source in ("raw", "gram"):
        kw = {"stats": STATS, "epochs": epochs, "source": source, "progress": False}
        got, want = run_stats(store, **kw), run_stats(ref, **kw)
        pd.testing.assert_frame_equal(got.assign(run=""), want.assign(run=""), check_exact=True)


@contextlib.contextmanager
def disk_full_after(n_writes: int) -> Iterator[dict[str, Any]]:
    """Every zarr local-store file write after the first ``n_writes`` fails with ENOSPC (a full disk)."""
    original = zarr_local._put
    seen: dict[str, Any] = {"writes": 0, "refused": []}
    lock = threading.Lock()

    def put(path: Path, value: Any, exclusive: bool = False) -> int:
        with lock:
            seen["writes"] += 1
            full = seen["writes"] > n_writes
        if full:
            seen["refused"].append(str(path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, value, exclusive=exclusive)

    zarr_local._put = put
    try:
        yield seen
    finally:
        zarr_local._put = original


@pytest.mark.parametrize("n_writes", [0, 1, 6, 25])
def test_full_disk_raises_at_the_next_call(tmp_path: Path, clean_run: str, n_writes: int) -> None:
    """ENOSPC in the writer: a CaptureError naming the store and the layer; the committed epochs stay."""
    path = str(tmp_path / "run.zarr")
    torch.manual_seed(0)
    net = SmallNet()
    rec = Recorder(net, path, **OPTIONS)
    _record_epochs(rec, net, range(2))
    with disk_full_after(n_writes) as disk, pytest.raises(CaptureError) as info:
        _record_epochs(rec, net, range(2, 3))
    assert disk["refused"]
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "No space left on device" in message
    if n_writes == 0:  # the first write of epoch 2 is its opening
        assert "opening the epoch" in message
    else:
        assert re.search(r"layer '(conv|fc)'", message), message
    with pytest.raises(CaptureError, match="No space left on device"):
        rec.close()  # reported again, never swallowed
    run = open_run(path)
    assert run.epochs == [0, 1]
    assert run.incomplete_epoch == (None if n_writes == 0 else 2)
    _same_stats(path, clean_run, [0, 1])
    # Space freed: the run resumes after its last complete epoch and ends as the clean run did.
    torch.manual_seed(0)
    net = SmallNet()
    with Recorder(net, path, resume=True, **OPTIONS) as rec:
        assert rec.epoch == 2
        _record_epochs(rec, net, range(2, 3))
    assert open_run(path).epochs == [0, 1, 2]
    _same_stats(path, clean_run, [0, 1, 2])


def test_full_disk_warns_and_training_goes_on(tmp_path: Path, clean_run: str) -> None:
    """``on_error="warn"``: one RuntimeWarning, capture switched off, training unaffected."""
    path = str(tmp_path / "run.zarr")
    torch.manual_seed(0)
    net = SmallNet()
    rec = Recorder(net, path, on_error="warn", **OPTIONS)
    _record_epochs(rec, net, range(2))
    with disk_full_after(3), pytest.warns(RuntimeWarning, match="capture switched off") as caught:
        for epoch in range(2, 5):
            for x in _batches(epoch):
                assert net(x).shape == (8, 4)
            rec.end_epoch()
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert "No space left on device" in str(caught[0].message) and path in str(caught[0].message)
    assert not rec.is_recording
    rec.close()  # no second report
    run = open_run(path)
    assert run.epochs == [0, 1] and run.incomplete_epoch == 2
    _same_stats(path, clean_run, [0, 1])


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_real_full_disk(tiny_disk: Path, tmp_path: Path) -> None:
    """On a 2 MiB tmpfs: CaptureError at the next call; every committed epoch analyses as a clean run's."""

    def run(path: str, epochs: int) -> None:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32))
        rec = Recorder(net, path, mode="both", compression="none", chunk_bytes=2**16)
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(epoch)
            for _ in range(4):
                net(torch.randn(256, 16, generator=g))
            rec.end_epoch()
        rec.close()

    store = str(tiny_disk / "run.zarr")
    with pytest.raises(CaptureError) as info:
        run(store, 100)
    message = str(info.value)
    assert message.startswith(f"{store}: ") and "No space left on device" in message, message
    info_run = open_run(store)
    assert len(info_run.epochs) >= 2 and info_run.epochs == list(range(len(info_run.epochs)))
    clean = str(tmp_path / "clean.zarr")
    run(clean, len(info_run.epochs))
    _same_stats(store, clean, info_run.epochs)


# -- other writer-thread failures ------------------------------------------------------------------


@pytest.fixture
def exploding_codec(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Blosc encoding fails (after ``settings["delay"]`` seconds) in this test: a codec that raises."""
    settings = {"delay": 0.0}

    def encode(self: Any, chunk_bytes: Any, chunk_spec: Any) -> Any:
        time.sleep(settings["delay"])
        raise RuntimeError("codec exploded")

    monkeypatch.setattr(zarr.codecs.BloscCodec, "_encode_sync", encode)
    return settings


def test_codec_failure_raises_at_the_next_call(tmp_path: Path, exploding_codec: dict[str, float]) -> None:
    path = str(tmp_path / "run.zarr")
    net = SmallNet()
    rec = Recorder(net, path, chunk_bytes=256, compression="lz4")  # a Blosc codec, which explodes
    with pytest.raises(CaptureError, match=r"layer '(conv|fc)'.*codec exploded") as info:
        for epoch in range(3):
            for x in _batches(epoch):
                net(x)
            rec.end_epoch()
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value.__cause__.__cause__, RuntimeError)  # CaptureError <- WriterError <- codec's
    with pytest.raises(CaptureError, match="codec exploded"):
        rec.close()
    assert open_run(path).epochs == []


def test_writer_failure_after_the_last_call_is_reported_by_close(
    tmp_path: Path, exploding_codec: dict[str, float]
) -> None:
    """The write fails after the training loop's last recorder call: close() raises it."""
    exploding_codec["delay"] = 0.3
    path = str(tmp_path / "run.zarr")
    net = nn.Sequential(nn.Linear(4, 3))
    rec = Recorder(net, path, chunk_bytes=64, compression="lz4")
    net(torch.randn(32, 4))  # whole chunks, written in the background while close() waits
    with pytest.raises(CaptureError, match="layer '0'.*codec exploded"):
        rec.close()


def test_writer_failure_warns(tmp_path: Path, exploding_codec: dict[str, float]) -> None:
    path = str(tmp_path / "run.zarr")
    net = SmallNet()
    rec = Recorder(net, path, chunk_bytes=256, on_error="warn", compression="lz4")
    with pytest.warns(RuntimeWarning, match="capture switched off.*codec exploded"):
        for epoch in range(3):
            for x in _batches(epoch):
                net(x)
            rec.end_epoch()
    assert not rec.is_recording
    rec.close()


def test_codec_object_as_compression(tmp_path: Path) -> None:
    """A zarr codec object as ``compression`` is what the raw arrays get (it used to fail the writer)."""
    path = str(tmp_path / "run.zarr")
    net = SmallNet()
    codec = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=4)
    with Recorder(net, path, compression=codec) as rec:
        _record_epochs(rec, net, range(1))
    run = open_run(path)
    compressor, checksum = run.ranks[0].raw("conv").array.compressors  # the checksum comes last
    assert (compressor.cname.value, compressor.clevel) == ("zstd", 3)
    assert isinstance(checksum, zarr.codecs.Crc32cCodec)


def test_commit_failure_leaves_the_epoch_incomplete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "run.zarr")
    torch.manual_seed(0)
    net = SmallNet()
    rec = Recorder(net, path, **OPTIONS)
    _record_epochs(rec, net, range(1))
    original = store_writer.RunStoreWriter.commit_epoch

    def failing(self: Any, epoch: int, *args: Any) -> None:
        if epoch == 1:
            raise ValueError("commit refused")
        original(self, epoch, *args)

    monkeypatch.setattr(store_writer.RunStoreWriter, "commit_epoch", failing)
    with pytest.raises(CaptureError, match="epoch 1 commit.*commit refused"):
        _record_epochs(rec, net, range(1, 2))
    run = open_run(path)
    assert run.epochs == [0] and run.incomplete_epoch == 1
