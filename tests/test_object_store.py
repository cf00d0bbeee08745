"""Run stores on object storage, against a real S3 API (moto's server, ``tests/_s3.py``), and checksums.

Every run here is the same recording (``_s3.record``: a fixed model on fixed batches, mode
``both``, float16, small chunks and gram blocks) written to a local folder, to ``s3://`` or to
``memory://``; the stores must hold exactly the same committed data: the calls table, every raw
row and every gram block, bit for bit, and the same objects as the local store has files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _s3 import EPOCHS, S3Prefix, S3Server, at_once, record
from zarr.storage import MemoryStore, WrapperStore

from capture import StoreFormatError, open_run
from capture.checksum import ChunkChecksumError, strip, verify
from capture.format import FORMAT_MINOR
from capture.store import RunInfo

ROOT = Path(__file__).resolve().parents[1]
RAW = "rank-00000/layers/0/raw"  # the conv layer's raw array


# -- references ----------------------------------------------------------------------------------


# ``local_run`` (the recording on local disk, uninterrupted: the reference of every store here)
# and ``s3_run`` (the same recording on the S3 server) are fixtures of ``tests/_s3.py``.


def committed(run: RunInfo, epochs: list[int] | None = None) -> dict[str, Any]:
    """Everything a reader may use of ``run`` (only ``epochs``, default its complete ones), as numpy."""
    epochs = run.epochs if epochs is None else epochs
    calls = run.calls()
    keep = np.isin(calls["epoch"], epochs)
    out: dict[str, Any] = {"calls": {k: v[keep] for k, v in calls.items()}, "layers": run.layers}
    out["scalars"] = {e: v for e, v in run.scalars.items() if e in epochs}
    part = run.ranks[0]
    for layer in run.layers:
        raw = part.raw(layer)
        rows = int(calls["row_count"][keep & (calls["layer"] == run.layers.index(layer))].sum())
        out[f"raw/{layer}"] = raw.read(0, rows)
        for method in part.layers[layer].gram:
            blocks = part.gram(layer, method)
            mine = [b for b in range(blocks.blocks) if int(blocks.info_column("epoch")[b]) in epochs]
            out[f"gram/{layer}/{method}/info"] = blocks.info[mine]
            for b in mine:
                count, mean, m2 = blocks.read(b)
                out[f"gram/{layer}/{method}/{b}"] = (count, mean, m2)
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "calls":
            for column in a[key]:
                np.testing.assert_array_equal(a[key][column], b[key][column], err_msg=column)
        elif isinstance(a[key], tuple):
            assert a[key][0] == b[key][0], key
            np.testing.assert_array_equal(a[key][1], b[key][1], err_msg=key)
            np.testing.assert_array_equal(a[key][2], b[key][2], err_msg=key)
        elif isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def stats_csv(run: str | Path, **options: Any) -> bytes:
    """The ``stats.csv`` bytes of an analysis of ``run`` (no cache: every value read from the store)."""
    from analyze import analyze_runs
    from analyze.outputs import sorted_table, table_csv

    return table_csv(sorted_table(analyze_runs(run, progress=False, cache_dir=None, **options)))


def local_files(path: Path) -> set[str]:
    return {str(f.relative_to(path)) for f in path.rglob("*") if f.is_file()}


def object_keys(fs: Any, key: str) -> set[str]:
    return {k[len(key) + 1 :] for k in fs.find(key)}


# -- stores at URLs ------------------------------------------------------------------------------


def test_capture_to_s3_equals_the_local_run(
    s3_run: tuple[str, dict], local_run: Path, s3_server: S3Server
) -> None:
    url, options = s3_run
    run = open_run(url, storage_options=options)
    local = open_run(local_run)
    assert run.epochs == list(range(EPOCHS)) and run.incomplete_epoch is None
    assert run.path == url and run.storage_options == options
    assert_same(committed(run), committed(local))
    # the same objects as the local store has files, with the same sizes
    fs = s3_server.filesystem()
    key = url[len("s3://") :]
    assert object_keys(fs, key) == local_files(local_run)
    assert run.nbytes() == local.nbytes()
    assert run.meta["format_minor"] == FORMAT_MINOR and run.model == local.model


def test_memory_url_equals_the_local_run(local_run: Path) -> None:
    url = "memory://delve-tests/run.zarr"
    record(url)
    try:
        assert_same(committed(open_run(url)), committed(open_run(local_run)))
    finally:
        import fsspec

        fsspec.filesystem("memory").rm("/delve-tests", recursive=True)


def test_storage_options_are_refused_for_a_local_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_options: .* is a local path"):
        open_run(tmp_path, storage_options={"anon": True})


def test_missing_and_foreign_urls(s3: S3Prefix) -> None:
    with pytest.raises(FileNotFoundError, match="no run store here"):
        open_run(s3.url("nothing.zarr"), storage_options=s3.storage_options)
    missing = "s3://no-such-bucket/run.zarr"
    with pytest.raises(FileNotFoundError, match=f"^{missing}: no run store here"):
        open_run(missing, storage_options=s3.storage_options)
    with pytest.raises(FileNotFoundError, match=f"^{missing}: .*bucket does not exist"):
        record(missing, storage_options=s3.storage_options)
    fs = s3.filesystem()
    fs.pipe_file(s3.key("foreign/data.csv"), b"a,b\n1,2\n")
    with pytest.raises(StoreFormatError, match="not a zarr v3 group"):
        open_run(s3.url("foreign"), storage_options=s3.storage_options)
    # overwrite=True never deletes what is not a run store
    with pytest.raises(FileExistsError, match="not a zarr store; refusing to overwrite"):
        record(s3.url("foreign"), storage_options=s3.storage_options, overwrite=True)
    assert fs.cat_file(s3.key("foreign/data.csv")) == b"a,b\n1,2\n"


# -- the commit protocol on object storage -------------------------------------------------------


def settled(rec: Any) -> None:
    """Wait until every write ``rec`` issued is stored (object stores finish writes in the background)."""
    from zarr.core.sync import sync

    rec._writer.flush()  # noqa: SLF001 - a test looking at the order of stored objects
    sync(rec._store.group.store.drain())  # noqa: SLF001


class WriteLog:
    """Every object s3fs writes or deletes (a spy: the original calls go through)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import s3fs

        self.entries: list[tuple[str, str, str]] = []  # (phase, op, key)
        self.phase = ""
        pipe, rm = s3fs.S3FileSystem._pipe_file, s3fs.S3FileSystem._rm
        log = self

        async def pipe_file(fs: Any, path: str, data: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                out = await pipe(fs, path, data, *args, **kwargs)
            except FileExistsError:
                log.entries.append((log.phase, "refused", fs._strip_protocol(path)))
                raise
            log.entries.append(
                (log.phase, "put-" + kwargs.get("mode", "overwrite"), fs._strip_protocol(path))
            )
            return out

        async def remove(fs: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
            for p in [path] if isinstance(path, str) else path:
                log.entries.append((log.phase, "delete", fs._strip_protocol(p)))
            return await rm(fs, path, *args, **kwargs)

        monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", pipe_file)
        monkeypatch.setattr(s3fs.S3FileSystem, "_rm", remove)


def test_ranks_write_disjoint_objects_and_the_root_once(
    s3: S3Prefix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks of one run, interleaved: each writes only below its own prefix; the root is put once."""
    import torch
    from torch import nn

    from capture import Recorder

    log = WriteLog(monkeypatch)
    url, base = s3.url("ddp.zarr"), s3.key("ddp.zarr")
    nets = [nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)) for _ in range(2)]
    recs = []
    for rank in (0, 1):
        log.phase = f"rank{rank}"
        recs.append(
            Recorder(
                nets[rank],
                url,
                mode="both",
                layers=["0"],
                rank=rank,
                world_size=2,
                storage_options=s3.storage_options,
            )
        )
        settled(recs[rank])
    torch.manual_seed(0)
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for _epoch in range(2):
        for rank in (0, 1):
            log.phase = f"rank{rank}"
            x = torch.randn(6 + rank, 5)
            seen[rank].append(
                torch.nn.functional.linear(x, nets[rank][0].weight, nets[rank][0].bias).detach()
            )
            nets[rank](x)
            recs[rank].end_epoch()  # its commit waits for every write of the epoch
            settled(recs[rank])
    for rank in (0, 1):
        log.phase = f"rank{rank}"
        recs[rank].close()
    root = f"{base}/zarr.json"
    # rank 0 created the root (a put that only succeeds if the object is absent); rank 1 found it
    assert [(p, op) for p, op, k in log.entries if k == root] == [("rank0", "put-create")]
    for phase, op, key in log.entries:
        if key != root:
            assert key.startswith(f"{base}/rank-0000{phase[-1]}/"), (phase, op, key)
    run = open_run(url, storage_options=s3.storage_options)
    assert run.epochs == [0, 1] and [p.rank for p in run.ranks] == [0, 1]
    for rank in (0, 1):
        np.testing.assert_array_equal(
            run.ranks[rank].raw("0")[:], torch.cat(seen[rank]).numpy(), err_msg=f"rank {rank}"
        )


@pytest.mark.parametrize("where", ["local", "s3", "memory"])
def test_the_root_is_created_only_if_absent(where: str, s3: S3Prefix, tmp_path: Path) -> None:
    from capture.storage import StoreLocation

    url = {
        "local": str(tmp_path / "r.zarr"),
        "s3": s3.url("r.zarr"),
        "memory": f"memory://{tmp_path.name}/r",
    }[where]
    options = s3.storage_options if where == "s3" else None
    loc = StoreLocation(url, options)
    assert loc.create_if_absent("zarr.json", b"first") is True
    assert loc.create_if_absent("zarr.json", b"second") is False
    assert loc.has("zarr.json")
    got = (tmp_path / "r.zarr" / "zarr.json").read_bytes() if where == "local" else None
    if where == "s3":
        got = s3.filesystem().cat_file(s3.key("r.zarr/zarr.json"))
    if where == "memory":
        import fsspec

        got = fsspec.filesystem("memory").cat_file(f"/{tmp_path.name}/r/zarr.json")
        fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)
    assert got == b"first"


def test_an_epoch_commit_is_one_put_written_last(s3: S3Prefix, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from torch import nn

    from capture import Recorder

    log = WriteLog(monkeypatch)
    net = nn.Sequential(nn.Linear(6, 4))
    state = f"{s3.key('one.zarr')}/rank-00000/zarr.json"
    with Recorder(
        net, s3.url("one.zarr"), mode="both", chunk_bytes=64, storage_options=s3.storage_options
    ) as rec:
        for epoch in range(2):
            for _ in range(3):
                net(torch.randn(5, 6))
            settled(rec)  # separate the epoch's data writes from its commit
            log.phase = f"end{epoch}"
            rec.end_epoch()
            log.phase = ""
            commit = [(op, key) for phase, op, key in log.entries if phase == f"end{epoch}"]
            assert commit[-1] == ("put-overwrite", state)
            assert [key for _, key in commit].count(state) == 1
            assert len(commit) > 5  # the epoch's last chunks, calls, gram blocks and array shapes came first


def test_kill_mid_epoch_then_resume_equals_the_local_run(s3: S3Prefix, local_run: Path) -> None:
    """A writer SIGKILLed in epoch 1 (configured by the AWS_* environment alone), read, then resumed."""
    url = s3.url("killed/run.zarr")  # named "run", as the local run is in its table
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_s3.py"), url, "--kill", "1/3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    local = open_run(local_run)
    killed = open_run(url)  # no storage options: the environment points at the server
    assert killed.epochs == [0] and killed.incomplete_epoch == 1
    part = killed.ranks[0]
    # the uncommitted tail is in the store: epoch 1's rows and a gram block flushed in its middle
    assert part.raw("0").array.shape[0] > part.raw("0").rows
    assert 1 in part.gram("0", "channelwise").info_column("epoch")
    assert_same(committed(killed), committed(local, [0]))
    # the analysis of what was committed: the CSV bytes of the local run's epoch 0
    assert stats_csv(url, source="raw") == stats_csv(local_run, source="raw", epochs="0")
    record(url, resume=True)
    resumed = open_run(url)
    assert resumed.epochs == list(range(EPOCHS)) and resumed.incomplete_epoch is None
    assert_same(committed(resumed), committed(local))
    for source in ("raw", "gram"):
        assert stats_csv(url, source=source) == stats_csv(local_run, source=source), source


def test_two_readers_at_once(s3_run: tuple[str, dict], local_run: Path) -> None:
    url, options = s3_run
    expected = committed(open_run(local_run))
    for got in at_once(lambda: committed(open_run(url, storage_options=options))):
        assert_same(got, expected)


# -- checksums -----------------------------------------------------------------------------------


def _damage(kind: str, data: bytes) -> bytes:
    if kind == "flipped":
        return data[:10] + bytes([data[10] ^ 0x55]) + data[11:]
    return data[: len(data) // 2]  # truncated


@pytest.fixture(params=["local", "s3"])
def damageable(
    request: pytest.FixtureRequest,
    local_run: Path,
    s3_run: tuple[str, dict],
    s3_server: S3Server,
    tmp_path: Path,
) -> Iterator[tuple[Callable[[], RunInfo], Callable[[str], bytes], Callable[[str, bytes], None]]]:
    """The run (a local copy, or the S3 run, restored afterwards): ``(open it, read an object, write one)``."""
    if request.param == "local":
        import shutil

        copy = tmp_path / "run.zarr"
        shutil.copytree(local_run, copy)
        yield (
            lambda: open_run(copy),
            lambda k: (copy / k).read_bytes(),
            lambda k, b: (copy / k).write_bytes(b),
        )
        return
    url, options = s3_run
    fs = s3_server.filesystem()
    base = url[len("s3://") :]
    saved: dict[str, bytes] = {}

    def put(key: str, data: bytes) -> None:
        saved.setdefault(key, fs.cat_file(f"{base}/{key}"))
        fs.pipe_file(f"{base}/{key}", data)

    try:
        yield (lambda: open_run(url, storage_options=options), lambda k: fs.cat_file(f"{base}/{k}"), put)
    finally:
        for key, data in saved.items():
            fs.pipe_file(f"{base}/{key}", data)


@pytest.mark.parametrize("kind", ["flipped", "truncated"])
def test_a_damaged_chunk_is_named_by_its_checksum(damageable: Any, kind: str) -> None:
    reopen, get, put = damageable
    rows = reopen().ranks[0].raw("0").rows
    put(f"{RAW}/c/2/0/0/0", _damage(kind, get(f"{RAW}/c/2/0/0/0")))
    m2 = "rank-00000/layers/3/gram/none/m2/c/1/0/0"
    put(m2, _damage(kind, get(m2)))
    run = reopen()
    with pytest.raises(ChunkChecksumError, match=f"array '{RAW}', chunk 2 .*damaged") as info:
        run.ranks[0].raw("0").read(0, rows)
    assert (info.value.array, info.value.chunk) == (RAW, 2)
    np.testing.assert_array_equal(  # the chunks before it read as ever
        run.ranks[0].raw("0").read(0, 10),
        open_run(run.path, run.storage_options).ranks[0].raw("0").read(0, 10),
    )
    with pytest.raises(ChunkChecksumError, match="array 'rank-00000/layers/3/gram/none/m2', chunk 1 "):
        run.ranks[0].gram("3", "none").read(1)
    put("rank-00000/calls/c/0/0", _damage(kind, get("rank-00000/calls/c/0/0")))
    with pytest.raises(StoreFormatError, match="array 'rank-00000/calls', chunk 0 .*damaged"):
        reopen()


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_plain_chunk_reading_with_the_checksum_helper(tmp_path: Path, compression: str) -> None:
    """What a reader that decodes chunk files itself does: strip the checksum, then decode."""
    path = tmp_path / "run.zarr"
    record(path, compression=compression)
    raw = open_run(path).ranks[0].raw("0")
    chunk_rows, row_shape = raw.chunk_rows, raw.array.shape[1:]
    nbytes = chunk_rows * int(np.prod(row_shape)) * 2
    for chunk in range(2):
        data = (path / RAW / "c" / str(chunk) / "0" / "0" / "0").read_bytes()
        payload = strip(data, array=RAW, chunk=chunk, size=None if compression == "lz4" else nbytes)
        if compression == "lz4":
            from numcodecs import blosc

            payload = blosc.decompress(bytes(payload))
        values = np.frombuffer(payload, dtype="<f2").reshape(chunk_rows, *row_shape)
        np.testing.assert_array_equal(values, raw.read(chunk * chunk_rows, (chunk + 1) * chunk_rows))
        if compression == "none":  # no copy: the values straight into the chunk's buffer, then the trailer
            out = np.empty((chunk_rows, *row_shape), "<f2")
            with open(path / RAW / "c" / str(chunk) / "0" / "0" / "0", "rb") as f:
                assert f.readinto(memoryview(out).cast("B")) == out.nbytes
                verify(out, f.read(), array=RAW, chunk=chunk)
            np.testing.assert_array_equal(out, values)
            with pytest.raises(ChunkChecksumError, match=f"array '{RAW}', chunk {chunk}: .*damaged"):
                verify(out[::-1], data[-4:], array=RAW, chunk=chunk)
        with pytest.raises(ChunkChecksumError, match=f"array '{RAW}', chunk {chunk}: .*damaged") as info:
            strip(_damage("flipped", data), array=RAW, chunk=chunk)
        assert info.value.chunk == chunk
        with pytest.raises(ChunkChecksumError, match="truncated" if compression == "none" else "damaged"):
            strip(data[:-1], array=RAW, chunk=chunk, size=None if compression == "lz4" else nbytes)


# -- writes that finish behind ------------------------------------------------------------------


class SlowStore(WrapperStore):
    """A zarr MemoryStore whose writes take ``delays[key]`` seconds; the write of ``fail`` fails."""

    def __init__(self, delays: dict[str, float], fail: str = "") -> None:
        super().__init__(MemoryStore())
        self.delays, self.fail = delays, fail
        self.order: list[str] = []  # keys in the order their writes finished
        self.active = self.most = 0  # writes in progress, and the most at once

    async def set(self, key: str, value: Any) -> None:
        import asyncio

        self.active += 1
        self.most = max(self.most, self.active)
        try:
            await asyncio.sleep(self.delays.get(key, 0.0))
            if key == self.fail:
                raise OSError(f"write of {key} failed")
            await self._store.set(key, value)
            self.order.append(key)
        finally:
            self.active -= 1


def test_write_behind_keeps_the_commit_last_and_the_order_of_a_key() -> None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from capture.write_behind import WriteBehindStore

    slow = SlowStore({"a": 0.3, "k": 0.2, "b": 0.0})
    store = WriteBehindStore(slow, limit=2)
    buf = default_buffer_prototype().buffer.from_bytes

    async def scenario() -> bytes:
        await store.set("a", buf(b"A"))
        await store.set("k", buf(b"old"))
        assert store.in_flight == 2
        await store.set("k", buf(b"new"))  # waits for the first write of k: never overtaken
        await store.set("b", buf(b"B"))
        await store.set("zarr.json", buf(b"commit"))  # the barrier: after everything before it
        got = await store.get("k", default_buffer_prototype())
        return got.to_bytes()

    assert sync(scenario()) == b"new"
    assert slow.order[-1] == "zarr.json" and slow.order.count("k") == 2
    assert slow.most <= 2 and store.in_flight == 0


def test_write_behind_reports_a_failed_write() -> None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from capture.write_behind import WriteBehindStore

    store = WriteBehindStore(SlowStore({"bad": 0.05}, fail="bad"), limit=4)
    buf = default_buffer_prototype().buffer.from_bytes
    sync(store.set("bad", buf(b"x")))  # returns at once: the write is in flight
    with pytest.raises(OSError, match="write of bad failed"):
        sync(store.set("zarr.json", buf(b"commit")))  # the commit does not happen
    assert sync(store._store.exists("zarr.json")) is False  # noqa: SLF001


def test_an_unreachable_endpoint_is_one_line_naming_the_store(tmp_path: Path) -> None:
    """No server listens on the endpoint: a ConnectionError that names the URL, and a one-line CLI error."""
    url = "s3://bucket/run.zarr"
    no_retries = {"retries": {"max_attempts": 1}}
    options = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", "config_kwargs": no_retries}
    with pytest.raises(ConnectionError, match=f"^{url}: cannot reach the store"):
        open_run(url, storage_options=options)
    from click.testing import CliRunner

    from pipelines.cli import cli

    args = ["stats", url, "-o", str(tmp_path / "out"), "--storage-option", "endpoint_url=http://127.0.0.1:9"]
    args += ["--storage-option", "key=k", "--storage-option", "secret=s"]
    args += ["--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}}']
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert f"Error: {url}: cannot reach the store" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
