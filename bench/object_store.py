"""Run stores on object storage: capture write speed against plain s3fs, zarr's two S3 stores, the checksum.

Everything runs against a local S3 server (moto's ``ThreadedMotoServer``, in a process of its own
on 127.0.0.1): such a test server is much slower than a disk or a real object store, so every
result is compared with what plain ``s3fs`` puts / gets of the same bytes, in objects of the same
size, reach on the same server in the same run (the *limit*, printed beside each result).

1. ``capture``: a raw float16 ``capture.Recorder`` writing to ``s3://`` (16 MiB chunks, the
   default) for ``--steps`` steps of one 16 MiB layer output, timed from the first step (the store
   is created before) until ``close()`` returns (the epoch's commit and every write included),
   against plain s3fs puts of as many 16 MiB objects, one after the other and all at once; the
   limit is the faster of the two. Interleaved, ``--reps`` times; the ratio is taken per
   repetition, then the median. Target: >= 0.7.
2. ``backends``: zarr's ``FsspecStore`` (s3fs) and ``ObjectStore`` (obstore) writing whole 16 MiB
   chunks of a float16 array one after the other (as the capture writer does), and reading the
   array back, each against plain s3fs puts / gets.
   ``object_size``: 64 MiB written as objects (chunks) of 1, 4, 16 and 64 MiB, against plain puts.
3. ``checksum``: what the crc32c of every chunk costs: the checksum of a 16 MiB chunk, zarr's
   crc32c encoding (checksum and copy), and writing the chunk to a local disk and to the server.
4. ``analysis_read``: a raw float16 run of a conv layer (``--read-chunks`` 16 MiB chunks) on the
   server, read as the analysis reads it: the raw chunk reader alone
   (:meth:`capture.store.RawChunks.chunks`: every chunk object fetched whole, a few ahead, its
   checksum verified, decoded), the same loop through each of zarr's two S3 stores
   (``FsspecStore`` and ``ObjectStore``, which :func:`capture.storage.open_store` gives for reads
   where it can), and the whole analysis (``analyze.analyze_runs``, raw source, channelwise, no
   cache) of the run on the server (with the default store, and with ``FsspecStore`` forced by
   ``DELVE_CHUNK_READER=fsspec``) and of a local copy; against plain s3fs gets of the same chunk objects, one after the
   other and all at once (the limit is the faster). Interleaved, ``--reps`` times; ratios per
   repetition, then the median. Target: the chunk reader >= 0.7.

Run from the repository root::

    python bench/object_store.py            # about 3-5 minutes on 2 cores
    python bench/object_store.py --quick    # to check that it runs (about 1 minute)

Results go to ``bench/results/object_store.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from capture import Recorder  # noqa: E402
from capture.checksum import crc32c  # noqa: E402
from capture.storage import StoreLocation, open_store  # noqa: E402

MIB = 2**20
CHUNK = 16 * MIB
TARGET_CAPTURE_VS_PLAIN = 0.7
#: /work/shared/perf-limits.md: the moto server moved about 55 MB/s each way (512-row float32 chunks).
PERF_LIMITS_NOTE = "perf-limits.md: moto ~55 MB/s each way through FsspecStore + s3fs (small chunks)"
BUCKET = "bench"
SERVER = (
    "import logging, sys\n"
    "from moto.server import ThreadedMotoServer\n"
    "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
    "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
    "s.start()\n"
    "print(s.get_host_and_port()[1], flush=True)\n"
    "sys.stdin.read()\n"
    "s.stop()\n"
)


@contextmanager
def s3_server() -> Iterator[dict[str, Any]]:
    """moto's server in a child process; yields the s3fs storage options that reach it."""
    import s3fs

    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        yield options
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=60)


def plain_fs(options: dict[str, Any]) -> Any:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)


def mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_chunks(array: Any, block: np.ndarray, n: int) -> None:
    """Write ``block`` as chunks 0..n-1 of ``array``, one zarr write each (as the capture writer does)."""
    rows = len(block)
    for i in range(n):
        array[i * rows : (i + 1) * rows] = block


def put_serially(fs: Any, puts: list[tuple[str, bytes]]) -> None:
    for key, data in puts:
        fs.pipe_file(key, data)


# -- plain s3fs: the limit -------------------------------------------------------------------------
def plain_puts(fs: Any, prefix: str, objects: int, data: bytes) -> dict[str, float]:
    """Seconds for ``objects`` puts of ``data``: one after the other, and all at once."""
    serial = timed(partial(put_serially, fs, [(f"{prefix}/s/{i}", data) for i in range(objects)]))
    together = timed(lambda: fs.pipe({f"{prefix}/c/{i}": data for i in range(objects)}))
    return {"serial": serial, "concurrent": together}


def plain_gets(fs: Any, prefix: str, objects: int) -> dict[str, float]:
    serial = timed(lambda: [fs.cat_file(f"{prefix}/s/{i}") for i in range(objects)])
    together = timed(lambda: fs.cat([f"{prefix}/c/{i}" for i in range(objects)]))
    return {"serial": serial, "concurrent": together}


# -- 1. capture ------------------------------------------------------------------------------------
def capture_write(
    url: str, options: dict[str, Any], steps: int, payload: torch.Tensor, module: nn.Module | None = None
) -> float:
    """Seconds for a raw float16 Recorder to take ``steps`` calls of a layer whose output is ``payload``.

    A forward hook ahead of the Recorder's replaces the (1 x 1) Linear's output with ``payload``
    (float32), so the Recorder's hook, its float16 cast and its writer run as in training, without
    the model's compute. The store is created before the clock starts (as the plain puts' client
    is); the clock stops when ``close()`` returns (the epoch's commit and every write included).
    ``module`` (default a Linear) is the recorded layer, called on one zero input.
    """
    net = nn.Linear(1, 1) if module is None else module
    net.register_forward_hook(lambda module, args, output: payload)
    x = torch.zeros(1, 1) if module is None else torch.zeros(1, 1, 1, 1)
    rec = Recorder({"layer": net}, url, mode="raw", dtype="float16", storage_options=options)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            net(x)
    rec.end_epoch()
    rec.close()
    return time.perf_counter() - t0


def run_capture(options: dict[str, Any], steps: int, reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    fs = plain_fs(options)
    width = 8192
    nbytes = steps * CHUNK
    data = np.random.default_rng(0).standard_normal(CHUNK // 2).astype(np.float16).tobytes()
    payload = torch.from_numpy(
        np.random.default_rng(1).standard_normal((CHUNK // (2 * width), width), np.float32)
    )
    rows: list[dict[str, float]] = []
    capture_write(f"s3://{BUCKET}/warmup.zarr", options, 1, payload)  # clients, zarr: not timed
    for rep in range(reps):
        prefix = f"{BUCKET}/cap-{uuid.uuid4().hex[:8]}"
        order = ("plain", "capture") if rep % 2 == 0 else ("capture", "plain")
        out: dict[str, float] = {}
        for what in order:
            if what == "plain":
                out.update(
                    {f"plain_{k}": v for k, v in plain_puts(fs, f"{prefix}/plain", steps, data).items()}
                )
            else:
                out["capture"] = capture_write(f"s3://{prefix}/run.zarr", options, steps, payload)
        fs.rm(prefix, recursive=True)
        limit = min(out["plain_serial"], out["plain_concurrent"])
        out["ratio"] = limit / out["capture"]
        rows.append(out)
        log(
            f"  rep {rep}: capture {mbps(nbytes, out['capture'])} MB/s | plain s3fs limit "
            f"{mbps(nbytes, limit)} MB/s (serial {mbps(nbytes, out['plain_serial'])}, concurrent "
            f"{mbps(nbytes, out['plain_concurrent'])}) | ratio {out['ratio']:.2f}"
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        "what": f"Recorder(mode='raw', dtype='float16') to s3://, one layer output of {CHUNK // MIB} MiB in "
        f"float16 per step (float32 (1024, {width}) replayed), default 16 MiB chunks, from the first "
        "step until close() returns",
        "bytes": nbytes,
        "steps": steps,
        "reps": rows,
        "capture_MBps": mbps(nbytes, med["capture"]),
        "plain_serial_MBps": mbps(nbytes, med["plain_serial"]),
        "plain_concurrent_MBps": mbps(nbytes, med["plain_concurrent"]),
        "limit_MBps": mbps(
            nbytes, statistics.median(min(r["plain_serial"], r["plain_concurrent"]) for r in rows)
        ),
        "ratio_median": round(statistics.median(r["ratio"] for r in rows), 3),
        "ratio_range": [round(min(r["ratio"] for r in rows), 3), round(max(r["ratio"] for r in rows), 3)],
        "target": TARGET_CAPTURE_VS_PLAIN,
        "limit": "the faster of plain s3fs puts of the same 16 MiB objects, serial or concurrent",
        "perf_limits_md": PERF_LIMITS_NOTE,
    }


# -- 2. FsspecStore vs ObjectStore -----------------------------------------------------------------
def object_store(url: str, options: dict[str, Any]) -> Any:
    """zarr's ObjectStore (obstore) at ``s3://bucket/prefix``, on the same server and credentials."""
    from obstore.store import S3Store

    bucket, _, prefix = url[len("s3://") :].partition("/")
    inner = S3Store(
        bucket,
        prefix=prefix,
        endpoint=options["endpoint_url"],
        access_key_id=options["key"],
        secret_access_key=options["secret"],
        region="us-east-1",
        client_options={"allow_http": True},
    )
    return zarr.storage.ObjectStore(inner)


def zarr_round_trip(store: Any, chunks: int) -> tuple[float, float]:
    """Seconds to write ``chunks`` whole 16 MiB float16 chunks one by one, and to read them all back."""
    rows, width = CHUNK // (2 * 8192), 8192
    block = np.random.default_rng(1).standard_normal((rows, width)).astype(np.float16)
    array = zarr.create_array(
        store,
        shape=(rows * chunks, width),
        chunks=(rows, width),
        dtype="float16",
        fill_value=0,
        compressors=[zarr.codecs.Crc32cCodec()],
        config={"write_empty_chunks": True},
    )

    t_write = timed(partial(write_chunks, array, block, chunks))
    t_read = timed(lambda: array[:])
    return t_write, t_read


def run_backends(
    options: dict[str, Any], chunks: int, reps: int, log: Callable[[str], None]
) -> dict[str, Any]:
    fs = plain_fs(options)
    nbytes = chunks * CHUNK
    data = np.random.default_rng(2).standard_normal(CHUNK // 2).astype(np.float16).tobytes()
    makers = {
        "FsspecStore": lambda url: open_store(url, options),
        "ObjectStore": lambda url: object_store(url, options),
    }
    samples: dict[str, list[float]] = {}
    for rep in range(reps):
        prefix = f"{BUCKET}/be-{uuid.uuid4().hex[:8]}"
        names = list(makers) if rep % 2 == 0 else list(reversed(makers))
        for name in names:
            t_w, t_r = zarr_round_trip(makers[name](f"s3://{prefix}/{name}"), chunks)
            samples.setdefault(f"{name}_write", []).append(t_w)
            samples.setdefault(f"{name}_read", []).append(t_r)
        for k, v in plain_puts(fs, f"{prefix}/plain", chunks, data).items():
            samples.setdefault(f"plain_put_{k}", []).append(v)
        for k, v in plain_gets(fs, f"{prefix}/plain", chunks).items():
            samples.setdefault(f"plain_get_{k}", []).append(v)
        fs.rm(prefix, recursive=True)
    med = {k: mbps(nbytes, statistics.median(v)) for k, v in samples.items()}
    out: dict[str, Any] = {"bytes": nbytes, "chunks": chunks, "MBps": med, "perf_limits_md": PERF_LIMITS_NOTE}
    for name in makers:
        out[f"{name}_write_vs_plain_serial_put"] = round(med[f"{name}_write"] / med["plain_put_serial"], 3)
        out[f"{name}_read_vs_plain_concurrent_get"] = round(
            med[f"{name}_read"] / med["plain_get_concurrent"], 3
        )
        log(
            f"  {name}: write {med[f'{name}_write']} MB/s (plain serial put {med['plain_put_serial']}), "
            f"read {med[f'{name}_read']} MB/s (plain concurrent get {med['plain_get_concurrent']})"
        )
    return out


# -- 2b. object size --------------------------------------------------------------------------------
def run_object_sizes(options: dict[str, Any], reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """64 MiB of float16 written as chunks of 1, 4, 16 and 64 MiB (FsspecStore, one after the other).

    One chunk is one object; a 64 MiB object is also what a shard of four 16 MiB chunks written
    at once would be. Beside each, plain s3fs puts of objects of that size (serial).
    """
    fs = plain_fs(options)
    total, width = 64 * MIB, 8192
    samples: dict[str, list[float]] = {}
    for _ in range(reps):
        prefix = f"{BUCKET}/os-{uuid.uuid4().hex[:8]}"
        for mib in (1, 4, 16, 64):
            rows = mib * MIB // (2 * width)
            block = np.random.default_rng(mib).standard_normal((rows, width)).astype(np.float16)
            array = zarr.create_array(
                open_store(f"s3://{prefix}/{mib}", options),
                shape=(total // (2 * width), width),
                chunks=(rows, width),
                dtype="float16",
                fill_value=0,
                compressors=[zarr.codecs.Crc32cCodec()],
                config={"write_empty_chunks": True},
            )
            n = total // (mib * MIB)
            samples.setdefault(f"zarr_{mib}MiB", []).append(timed(partial(write_chunks, array, block, n)))
            puts = [(f"{prefix}/p{mib}/{i}", block.tobytes()) for i in range(n)]
            samples.setdefault(f"plain_{mib}MiB", []).append(timed(partial(put_serially, fs, puts)))
        fs.rm(prefix, recursive=True)
    med = {k: mbps(total, statistics.median(v)) for k, v in samples.items()}
    for mib in (1, 4, 16, 64):
        log(
            f"  {mib:>2} MiB objects: zarr {med[f'zarr_{mib}MiB']} MB/s, plain s3fs serial puts {med[f'plain_{mib}MiB']}"
        )
    return {"bytes": total, "MBps": med, "perf_limits_md": PERF_LIMITS_NOTE}


# -- 3. the checksum ------------------------------------------------------------------------------
def run_checksum(
    options: dict[str, Any], folder: Path, reps: int, log: Callable[[str], None]
) -> dict[str, Any]:
    block = np.random.default_rng(3).standard_normal(CHUNK // 2).astype(np.float16)
    rows, width = CHUNK // (2 * 8192), 8192
    arr2d = block.reshape(rows, width)
    times: dict[str, list[float]] = {}
    spec_codec = zarr.codecs.Crc32cCodec()

    def write(checksum: bool, where: str) -> float:
        """Seconds to write the 16 MiB chunk into a new array on the local disk or on the server."""
        url = f"s3://{BUCKET}/ck-{uuid.uuid4().hex[:8]}" if where == "s3" else str(folder / uuid.uuid4().hex)
        array = zarr.create_array(
            open_store(url, options if where == "s3" else None),
            shape=(rows, width),
            chunks=(rows, width),
            dtype="float16",
            fill_value=0,
            compressors=[spec_codec] if checksum else None,
            config={"write_empty_chunks": True},
        )
        t = timed(lambda: array.__setitem__(slice(None), arr2d))
        if where == "s3":
            plain_fs(options).rm(url, recursive=True)
        else:
            shutil.rmtree(url)
        return t

    def encode() -> None:  # what zarr's crc32c codec does per chunk: checksum, then a copy with it appended
        data = block.view(np.uint8)
        np.append(data, np.array([crc32c(data)], dtype=np.uint32).view(np.uint8))

    for _ in range(reps):
        times.setdefault("crc32c_16MiB", []).append(timed(lambda: crc32c(block)))
        times.setdefault("crc32c_encode_16MiB", []).append(timed(encode))
        for checksum in (False, True):
            tag = "with_crc32c" if checksum else "without"
            times.setdefault(f"local_write_{tag}", []).append(write(checksum, "local"))
            times.setdefault(f"s3_write_{tag}", []).append(write(checksum, "s3"))
    ms = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
    out = {
        "chunk_bytes": CHUNK,
        "median_ms": ms,
        "crc32c_GBps": round(CHUNK / (ms["crc32c_16MiB"] / 1e3) / 1e9, 2),
        "crc32c_share_of_local_write": round(ms["crc32c_encode_16MiB"] / ms["local_write_with_crc32c"], 3),
        "local_write_cost": round(ms["local_write_with_crc32c"] / ms["local_write_without"] - 1, 3),
        "s3_write_cost": round(ms["s3_write_with_crc32c"] / ms["s3_write_without"] - 1, 3),
        "local_disk": str(folder),
    }
    log(
        f"  crc32c of 16 MiB {ms['crc32c_16MiB']} ms ({out['crc32c_GBps']} GB/s), zarr's encode (checksum + copy) "
        f"{ms['crc32c_encode_16MiB']} ms; writing the chunk: local {ms['local_write_without']} -> "
        f"{ms['local_write_with_crc32c']} ms, S3 {ms['s3_write_without']} -> {ms['s3_write_with_crc32c']} ms"
    )
    return out


# -- 4. the analysis read ----------------------------------------------------------------------------
def read_objects(store: Any, reader: Any) -> None:
    """What :meth:`capture.store.RawChunks.chunks` does for an array at a URL, through ``store``.

    Every chunk object of ``reader``'s array fetched whole, a few ahead, and decoded (checksum
    verified and stripped) by :meth:`capture.store.ChunkFiles.decode`: to compare zarr's stores.
    """
    from capture.chunk_objects import fetch, fetch_ahead
    from capture.store import ChunkFiles

    prefix = f"{reader.array_path}/"
    meta = json.loads(fetch(store, f"{prefix}zarr.json").tobytes())
    where = {"folder": reader.array_path, "array": reader.array_path, "store": reader.store}
    layout = ChunkFiles.from_metadata(meta, reader.chunk_rows, **where)
    shape = (reader.chunk_rows, *layout.row_shape)
    keys = [f"{prefix}{layout.key(chunk)}" for chunk in range(reader.n_chunks)]
    for chunk, stored in enumerate(fetch_ahead(store, keys)):
        layout.decode(stored, chunk, shape)


def analyse(url: str, options: dict[str, Any] | None, reader: str = "auto") -> None:
    """The whole analysis of the run at ``url`` (raw source, channelwise, trc, no cache, threads).

    ``reader``: the value of ``DELVE_CHUNK_READER`` (``fsspec``: FsspecStore for every read).
    """
    from analyze import analyze_runs
    from capture.read_store import READER_VARIABLE

    os.environ[READER_VARIABLE] = reader
    try:
        analyze_runs(url, source="raw", storage_options=options, cache_dir=None, progress=False, stats=("trc",))
    finally:
        os.environ.pop(READER_VARIABLE, None)


def run_analysis_read(
    options: dict[str, Any], chunks: int, reps: int, folder: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """The analysis read of a raw run on the server (see the module docstring), and its limits.

    ``analysis_local`` analyses a copy of the run in ``folder`` (a local disk): the compute alone.
    On these 2 cores the S3 server (Python) and the reduction compete for the CPU, so the whole
    analysis is also compared with the time of the plain gets followed by the local analysis.
    """
    from capture.store import open_run

    fs = plain_fs(options)
    base = f"{BUCKET}/read-{uuid.uuid4().hex[:8]}"
    url = f"s3://{base}/run.zarr"
    # a conv layer's output of 16 MiB in float16 per step (512 x 64 x 16 x 16): one chunk per step
    payload = torch.from_numpy(np.random.default_rng(4).standard_normal((512, 64, 16, 16), np.float32))
    capture_write(url, options, chunks, payload, nn.Conv2d(1, 1, 1))
    run = open_run(url, storage_options=options)
    reader = run.ranks[0].raw("layer").reader()
    keys = sorted(k for k in fs.find(f"{base}/run.zarr/{reader.array_path}/c"))
    nbytes = sum(fs.size(k) for k in keys)
    assert len(keys) == chunks == reader.n_chunks, (len(keys), chunks, reader.n_chunks)
    local = folder / "run.zarr"
    fs.get(f"{base}/run.zarr", str(local), recursive=True)
    cases: dict[str, Callable[[], Any]] = {
        "plain_serial": lambda: [fs.cat_file(k) for k in keys],
        "plain_concurrent": lambda: fs.cat(keys),
        "reader": lambda: [None for _ in reader.chunks()],
        "objects_FsspecStore": partial(read_objects, StoreLocation(url, options).store(read_only=True), reader),
        "objects_ObjectStore": partial(read_objects, object_store(url, options), reader),
        "analysis": partial(analyse, url, options),
        "analysis_FsspecStore": partial(analyse, url, options, "fsspec"),
        "analysis_local": partial(analyse, str(local), None),
    }
    for fn in cases.values():  # clients, stores, imports: not timed
        fn()
    rows: list[dict[str, float]] = []
    for rep in range(reps):
        names = list(cases) if rep % 2 == 0 else list(reversed(cases))
        out = {name: timed(cases[name]) for name in names}
        limit = min(out["plain_serial"], out["plain_concurrent"])
        for name in ("reader", "objects_FsspecStore", "objects_ObjectStore", "analysis", "analysis_FsspecStore"):
            out[f"{name}_ratio"] = limit / out[name]
        out["analysis_vs_gets_then_local_ratio"] = (limit + out["analysis_local"]) / out["analysis"]
        rows.append(out)
        log(
            f"  rep {rep}: chunk reader {mbps(nbytes, out['reader'])} MB/s (its loop through FsspecStore "
            f"{mbps(nbytes, out['objects_FsspecStore'])}, ObjectStore {mbps(nbytes, out['objects_ObjectStore'])}) "
            f"| whole analysis {mbps(nbytes, out['analysis'])} (FsspecStore {mbps(nbytes, out['analysis_FsspecStore'])}"
            f", of a local copy {mbps(nbytes, out['analysis_local'])}) | "
            f"plain s3fs gets serial {mbps(nbytes, out['plain_serial'])}, concurrent "
            f"{mbps(nbytes, out['plain_concurrent'])}"
        )
    fs.rm(base, recursive=True)
    shutil.rmtree(local)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        "what": f"a raw float16 run of one conv layer, {chunks} chunk objects of {CHUNK // MIB} MiB (512 x 64 x "
        "16 x 16): the raw chunk reader (RawChunks.chunks: fetch + checksum + decode), its loop through "
        "each of zarr's S3 stores (objects_*), and analyze_runs (raw source, channelwise, trc, no cache, "
        "threads) of the run on the server and of a local copy",
        "bytes": nbytes,
        "chunks": chunks,
        "reps": rows,
        "MBps": {k: mbps(nbytes, v) for k, v in med.items() if not k.endswith("_ratio")},
        "limit_MBps": mbps(nbytes, statistics.median(min(r["plain_serial"], r["plain_concurrent"]) for r in rows)),
        "ratio_median": {k[: -len("_ratio")]: round(v, 3) for k, v in med.items() if k.endswith("_ratio")},
        "ratio_range": {
            k[: -len("_ratio")]: [round(min(r[k] for r in rows), 3), round(max(r[k] for r in rows), 3)]
            for k in rows[0]
            if k.endswith("_ratio")
        },
        "target": TARGET_CAPTURE_VS_PLAIN,
        "limit": "the faster of plain s3fs gets of the same chunk objects, serial or concurrent; for "
        "analysis_vs_gets_then_local: those gets followed by the analysis of a local copy",
        "perf_limits_md": PERF_LIMITS_NOTE,
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    dists = ("zarr", "s3fs", "fsspec", "obstore", "moto", "numpy", "torch", "google-crc32c")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "versions": {d: _version(d) for d in dists},
        "loadavg_start": os.getloadavg(),
    }


def verdict(result: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The ratios against plain s3fs and whether they meet the targets (logged with the limits)."""
    cap, read = result.get("capture"), result["analysis_read"]
    out: dict[str, Any] = {}
    if cap is not None:
        out["capture_vs_plain_s3fs"] = cap["ratio_median"]
        out["capture_target_met"] = cap["ratio_median"] >= TARGET_CAPTURE_VS_PLAIN
        log(
            f"capture: {cap['capture_MBps']} MB/s against the plain s3fs limit {cap['limit_MBps']} MB/s "
            f"(medians): ratio {cap['ratio_median']} (per repetition {cap['ratio_range'][0]}-"
            f"{cap['ratio_range'][1]}; target >= {TARGET_CAPTURE_VS_PLAIN}); {PERF_LIMITS_NOTE}"
        )
    ratios = read["ratio_median"]
    out["analysis_read_vs_plain_s3fs"] = ratios
    out["analysis_read_target_met"] = ratios["reader"] >= TARGET_CAPTURE_VS_PLAIN
    mb = read["MBps"]
    log(
        f"analysis read: chunk reader {mb['reader']} MB/s (through FsspecStore {mb['objects_FsspecStore']}, "
        f"ObjectStore {mb['objects_ObjectStore']}), whole analysis {mb['analysis']} (FsspecStore "
        f"{mb['analysis_FsspecStore']}, of a local copy {mb['analysis_local']}), against the plain s3fs limit {read['limit_MBps']} MB/s (medians): ratios "
        f"{ratios} (target: the chunk reader >= {TARGET_CAPTURE_VS_PLAIN}); {PERF_LIMITS_NOTE}"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="16 MiB capture steps per repetition")
    ap.add_argument("--reps", type=int, default=9, help="interleaved repetitions")
    ap.add_argument("--chunks", type=int, default=8, help="16 MiB chunks in the backend comparison")
    ap.add_argument("--read-chunks", type=int, default=16, help="16 MiB chunks of the analysis read")
    ap.add_argument("--only", choices=["analysis_read"], help="run this part alone (results merged into --out)")
    ap.add_argument(
        "--workdir", default=None, help="local folder for the checksum test (default: under bench/)"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "object_store.json"))
    ap.add_argument("--quick", action="store_true", help="a few steps only, to check that it runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.reps, args.chunks, args.read_chunks = 3, 1, 2, 2
    base = Path(args.workdir) if args.workdir else ROOT / "bench"
    folder = Path(tempfile.mkdtemp(prefix="objstore-bench-", dir=base))

    def log(msg: str) -> None:
        print(msg, flush=True)

    stamp = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    result: dict[str, Any] = {
        "benchmark": "object_store",
        **stamp,
        "machine": machine_info(),
        "server": "moto ThreadedMotoServer in a child process on 127.0.0.1",
    }
    out = Path(args.out)
    if args.only and out.exists():  # one part again: the other parts' results stay as they were
        result = json.loads(out.read_text())
    t0 = time.perf_counter()
    try:
        with s3_server() as options:
            if not args.only:
                log(f"capture: {args.steps} x 16 MiB float16, {args.reps} reps")
                result["capture"] = run_capture(options, args.steps, args.reps, log)
                log(f"backends: {args.chunks} x 16 MiB chunks, {args.reps} reps")
                result["backends"] = run_backends(options, args.chunks, args.reps, log)
                log(f"object size: 64 MiB as 1-64 MiB chunks, {max(1, args.reps - 2)} reps")
                result["object_size"] = run_object_sizes(options, max(1, args.reps - 2), log)
                log("checksum")
                result["checksum"] = run_checksum(options, folder, max(3, args.reps), log)
            log(f"analysis read: {args.read_chunks} x 16 MiB chunks, {args.reps} reps")
            read = run_analysis_read(options, args.read_chunks, args.reps, folder, log)
            result["analysis_read"] = {**read, **stamp, "loadavg": os.getloadavg()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["verdict"] = verdict(result, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
