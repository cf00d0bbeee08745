"""Throughput of the raw-activation reduction (``analyze.run_stats``) against this machine's limits.

A run store of at least 2 GB of decoded float32 activations is written with ``capture.Recorder``
(``mode="raw"``, ``dtype="float32"``, the Recorder's default compression and chunk size) by feeding
synthetic inputs through two small modules:

* ``conv``: ``nn.Conv2d(64, 256, 1)`` on 64 x 64 x 16 x 16 inputs: 256 channels of 16 x 16 maps,
  16 MiB per call (reduced ``channelwise``: a (N*16*16, 256) matrix);
* ``fc``: ``nn.Linear(256, 1024)`` on 1024 x 256 inputs: 1024 features, 4 MiB per call.

(80% of the bytes are conv maps, 20% linear outputs; 2 epochs, train phase.) Then, in rounds (4
warm, 2 cold), each measured under the same machine load: the machines are shared and noisy, so
ratios are taken within a round and the median over rounds is reported, and also the best
reduction over the best limits of all rounds (closest to an idle machine):

* **reduction**: ``analyze.run_stats(store, stats="lsat")`` with its defaults (scheduler
  ``threads``, ``conv_methods="channelwise"``, ``task_bytes`` default), in a fresh child process,
  timed around the call alone; the whole store, then each layer alone. The child reports its peak
  RSS (``VmHWM``: ``ru_maxrss`` would count the parent's RSS at the fork), its CPU time and the
  time spent in the eigendecompositions (part of ``run_stats``, not of the reduction); the parent
  also polls the child's RSS with psutil.
* **I/O limit**: every chunk file of the two raw arrays read with plain ``open().read()`` (one
  thread), then read and decoded by the store's own chunk reader (``capture.store.RawChunks``,
  the reader the reduction uses: plain reads into a reused buffer, Blosc decoded when the store is
  compressed) with one and with two threads: the faster read + decode is the limit.
* **compute limit**: a representative subset of each layer (256 MiB of conv maps, 64 MiB of linear
  outputs, decoded) held in memory as its float64 (rows, features) matrix; ``X.T @ X`` in plain
  numpy timed and extrapolated per byte to the layer's size: the faster of one product with the
  default BLAS threads and two half products on two threads with one BLAS thread each.

Cold runs: the store's pages are evicted from the page cache (``posix_fadvise(DONTNEED)`` on its
files after ``sync``, checked with ``fincore``; ``--cold drop_caches`` drops the whole page cache
instead, which disturbs other processes) before a reduction and before a read + decode pass.

Throughput is in GB/s (1e9 bytes/s) of decoded activation bytes, and in samples (dim-0 rows) per
second. Targets (from the issue): reduction >= 0.8 of min(I/O limit, compute limit), warm, with the
default scheduler; peak RSS of the reduction < 1.5 GB.

Run from the repository root::

    python bench/reduce_throughput.py           # 2.3 GB store, 3-6 minutes on 2 cores
    python bench/reduce_throughput.py --quick   # a 0.3 GB store, one round: checks that it runs
    python bench/reduce_throughput.py --keep --store-dir /path   # keep the store afterwards
    python bench/reduce_throughput.py --store /path/run.zarr     # measure an existing store

Results go to ``bench/results/reduce.json``. The store is deleted at the end unless ``--keep``.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GB = 1e9
MiB = 2**20
#: Targets of the issue.
TARGET_RATIO = 0.8
TARGET_RSS = 1.5e9


# -- the store -------------------------------------------------------------------------------------
def write_store(path: Path, gb: float, compression: str | None, chunk_bytes: int | None) -> dict[str, Any]:
    """Write the benchmark store with ``capture.Recorder``; returns what was written and how fast."""
    import torch
    from torch import nn

    from capture import Recorder

    torch.manual_seed(0)
    conv, fc = nn.Conv2d(64, 256, 1), nn.Linear(256, 1024)
    conv_batch, fc_batch = 64, 1024
    step_bytes = conv_batch * 256 * 16 * 16 * 4 + fc_batch * 1024 * 4
    epochs = 2
    steps = max(1, -(-int(gb * GB) // (step_bytes * epochs)))
    xc, xl = torch.empty(conv_batch, 64, 16, 16), torch.empty(fc_batch, 256)
    kwargs: dict[str, Any] = {} if compression is None else {"compression": compression}
    if chunk_bytes is not None:
        kwargs["chunk_bytes"] = chunk_bytes
    t0 = time.perf_counter()
    with (
        torch.no_grad(),
        Recorder({"conv": conv, "fc": fc}, path, mode="raw", dtype="float32", **kwargs) as rec,
    ):
        for _ in range(epochs):
            for _ in range(steps):
                xc.normal_()
                xl.normal_()
                conv(xc)
                fc(xl)
            rec.end_epoch()
    seconds = time.perf_counter() - t0
    written = epochs * steps * step_bytes
    return {"seconds": seconds, "decoded_bytes": written, "write_gbps": written / seconds / GB}


def inventory(store: Path) -> dict[str, dict[str, Any]]:
    """Per raw layer: its reader (``capture.store.RawChunks``), chunk files, codec, sizes and matrix shape."""
    from capture.store import open_run

    run = open_run(store)
    out = {}
    for part in run.ranks:
        for name, rec in part.layers.items():
            if not rec.raw_array:
                continue
            raw = part.raw(name)
            reader = raw.reader()
            files = reader.files()
            if files is None:
                raise SystemExit(f"{store}/{name}: not readable as plain chunk files (codecs, layout)")
            row_bytes = int(np.prod(rec.sample_shape)) * raw.dtype.itemsize
            width = rec.sample_shape[0] if rec.layout == "conv" else int(np.prod(rec.sample_shape))
            paths = [files.path(i) for i in range(reader.n_chunks)]
            codec = "none"
            if files.blosc:
                meta = json.loads((Path(files.folder) / "zarr.json").read_text())
                codec = meta["codecs"][1]["configuration"]
            out[f"{part.rank}/{name}"] = {
                "layer": name,
                "layout": rec.layout,
                "sample_shape": list(rec.sample_shape),
                "features": int(width),
                "samples": raw.rows,
                "matrix_rows": raw.rows * (int(np.prod(rec.sample_shape[1:])) if rec.layout == "conv" else 1),
                "chunk_rows": reader.chunk_rows,
                "chunk_bytes": reader.chunk_rows * row_bytes,
                "chunks": reader.n_chunks,
                "reader": reader,
                "files": paths,
                "codec": codec,
                "decoded_bytes": raw.rows * row_bytes,
                "stored_bytes": sum(os.path.getsize(f) for f in paths if os.path.exists(f)),
            }
    return out


# -- page cache ------------------------------------------------------------------------------------
def store_files(store: Path) -> list[str]:
    return [str(p) for p in store.rglob("*") if p.is_file()]


def evict(store: Path, how: str) -> dict[str, Any]:
    """Drop the store's pages from the page cache; returns the resident bytes left (fincore)."""
    os.sync()
    files = store_files(store)
    if how == "drop_caches":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    else:
        for name in files:
            fd = os.open(name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return {"method": how, "resident_bytes_after": resident_bytes(files)}


def resident_bytes(files: list[str]) -> int | None:
    """Bytes of ``files`` in the page cache (util-linux ``fincore``), or None without it."""
    if not shutil.which("fincore"):
        return None
    total = 0
    for i in range(0, len(files), 200):
        res = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", *files[i : i + 200]],
            capture_output=True,
            text=True,
            check=False,
        )
        total += sum(int(x) for x in res.stdout.split() if x.isdigit())
    return total


# -- the limits --------------------------------------------------------------------------------------
def plain_read(inv: dict[str, dict[str, Any]], decode: bool, threads: int) -> dict[str, Any]:
    """Every chunk file read with ``open().read()`` (``decode=False``), or read and decoded by the
    store's chunk reader (``RawChunks.chunks``: mapped, or read into a reused buffer and Blosc
    decoded) and copied into a buffer, the chunks of each layer split between ``threads`` threads."""
    from capture.buffers import thread_buffer

    def read_files(files: list[str]) -> int:
        total = 0
        for name in files:
            with open(name, "rb") as f:
                total += len(f.read())
        return total

    def decode_chunks(job: tuple[Any, int, int]) -> int:
        # every decoded byte lands in this thread's buffer (a mapped chunk is copied: so the bytes
        # are really read, as the old readinto did)
        reader, lo, hi = job
        total = 0
        for _, _, x in reader.chunks(lo, hi):
            np.copyto(thread_buffer("bench.decoded", x.shape, x.dtype), x)
            total += x.nbytes
        return total

    jobs: list[Any] = []
    for layer in inv.values():
        n = layer["chunks"]
        cuts = [n * i // threads for i in range(threads + 1)]
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            jobs.append(layer["files"][lo:hi] if not decode else (layer["reader"], lo, hi))
    one = decode_chunks if decode else read_files
    c0, t0 = time.process_time(), time.perf_counter()
    if threads == 1:
        nbytes = sum(one(j) for j in jobs)
    else:
        with ThreadPoolExecutor(threads) as pool:
            nbytes = sum(pool.map(one, jobs))
    seconds = time.perf_counter() - t0
    decoded = sum(layer["decoded_bytes"] for layer in inv.values())
    return {
        "decode": decode,
        "threads": threads,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - c0,
        "bytes": nbytes,
        "gbps": decoded / seconds / GB,
    }


def load_subsets(inv: dict[str, dict[str, Any]], conv_mib: int, flat_mib: int) -> dict[str, Any]:
    """Float64 (rows, features) matrices of the first rows of each layer (the compute-limit input)."""
    mats = {}
    for key, layer in inv.items():
        want = (conv_mib if layer["layout"] == "conv" else flat_mib) * MiB
        row_bytes = layer["decoded_bytes"] // layer["samples"]
        rows = max(1, min(layer["samples"], want // row_bytes))
        parts = []
        for _, first, x in layer["reader"].chunks(0, -(-rows // layer["chunk_rows"])):
            parts.append(np.array(x[: rows - first]))
        x = np.concatenate(parts)
        if layer["layout"] == "conv":  # (N, C, *spatial) -> (N * spatial, C)
            x = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
        else:
            x = x.reshape(rows, -1)
        mats[key] = {"x": np.ascontiguousarray(x, dtype=np.float64), "decoded_bytes": rows * row_bytes}
    return mats


def _gram_two_halves(x: np.ndarray) -> np.ndarray:
    """``X.T @ X`` as two half products on two threads, BLAS at one thread each."""
    from threadpoolctl import threadpool_limits

    half = len(x) // 2
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda part: part.T @ part, (x[:half], x[half:]))
    return a + b


def compute_limit(inv: dict[str, dict[str, Any]], mats: dict[str, Any], reps: int = 2) -> dict[str, Any]:
    """``X.T @ X`` (float64, numpy) per byte of each subset, scaled to each layer.

    Two ways, the faster counts: one product with numpy's default BLAS threads, and two half
    products on two threads with one BLAS thread each (what the reduction does; on a busy machine
    a multi-threaded OpenBLAS can lose much more than its share).
    """
    per_layer = {}
    total_s = cpu_s = 0.0
    for key, m in mats.items():
        x = m["x"]
        ways: dict[str, tuple[float, float]] = {}
        for way, fn in (("blas_threads", lambda x: x.T @ x), ("two_halves", _gram_two_halves)):
            times, cpus = [], []
            for _ in range(reps):
                c0, t0 = time.process_time(), time.perf_counter()
                g = fn(x)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                del g
            ways[way] = (min(times), min(cpus))
        best, best_cpu = min(ways.values())
        s_per_byte = best / m["decoded_bytes"]
        layer_s = s_per_byte * inv[key]["decoded_bytes"]
        layer_cpu = best_cpu / m["decoded_bytes"] * inv[key]["decoded_bytes"]
        d = x.shape[1]
        per_layer[inv[key]["layer"]] = {
            "subset_bytes": m["decoded_bytes"],
            "matrix": list(x.shape),
            "gbps": 1 / s_per_byte / GB,
            "gbps_by_way": {w: m["decoded_bytes"] / t / GB for w, (t, _) in ways.items()},
            "gflops_full_product": 2 * x.shape[0] * d * d / best / 1e9,
            "extrapolated_seconds": layer_s,
        }
        total_s += layer_s
        cpu_s += layer_cpu
    decoded = sum(layer["decoded_bytes"] for layer in inv.values())
    return {"layers": per_layer, "seconds": total_s, "cpu_seconds": cpu_s, "gbps": decoded / total_s / GB}


# -- the reduction (child process) --------------------------------------------------------------------
def _vm_hwm() -> int:
    """Peak RSS of this process (``VmHWM``; unlike ``ru_maxrss`` it does not inherit the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(store: str, layers: str | None) -> None:
    import resource

    import psutil

    import analyze.execute
    from analyze import run_stats

    # Time the eigendecompositions (analyze.execute._finalize, one per epoch, phase and layer) apart:
    # they are part of run_stats but not of the reduction of the activations.
    finalize = analyze.execute._finalize
    spent = [0.0]
    lock = threading.Lock()

    def timed_finalize(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return finalize(*args, **kwargs)
        finally:
            with lock:
                spent[0] += time.perf_counter() - t

    analyze.execute._finalize = timed_finalize

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = time.process_time(), time.perf_counter()
    table = run_stats(store, stats="lsat", layers=layers, progress=False)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "finalize_seconds": spent[0],
        "user_seconds": u1.ru_utime - u0.ru_utime,
        "sys_seconds": u1.ru_stime - u0.ru_stime,
        "minor_faults": u1.ru_minflt - u0.ru_minflt,
        "involuntary_switches": u1.ru_nivcsw - u0.ru_nivcsw,
        "rss_before_bytes": rss0,
        "peak_rss_bytes": _vm_hwm(),
        "lsat": {f"{r.layer}/{r.epoch}/{r.phase}": float(r.value) for r in table.itertuples()},
    }
    print("RESULT " + json.dumps(result), flush=True)


def graph_child(store: str) -> None:
    """The reduction alone: ``analyze.reduce.raw_reduction_graph`` of every raw layer (chunks ->
    moments -> merge tree, ``threads`` scheduler, the default task size), no statistics."""
    import dask

    from analyze.reduce import RawSource, raw_reduction_graph
    from capture.format import PHASES
    from capture.store import open_run

    run = open_run(store)
    graphs = []
    for part in run.ranks:
        for name, rec in part.layers.items():
            if not rec.raw_array:
                continue
            raw = part.raw(name)
            calls = part.calls[part.calls[:, 2] == rec.index]
            groups: dict[Any, list[tuple[int, int]]] = {}
            for e, p, first, count in zip(calls[:, 0], calls[:, 1], calls[:, 4], calls[:, 5], strict=True):
                groups.setdefault((int(e), PHASES[int(p)]), []).append((int(first), int(first + count)))
            src = RawSource(
                store=store,
                array_path=f"{part.group.path}/{rec.raw_array}",
                stored_dtype=rec.stored_dtype or "float32",
                layout=rec.layout,
                chunk_rows=raw.chunk_rows,
                rows=raw.rows,
            )
            method = "channelwise" if rec.layout == "conv" else "none"
            row_bytes = int(np.prod(rec.sample_shape)) * raw.dtype.itemsize
            graphs.append(
                raw_reduction_graph(src, groups, [method], task_bytes=16 * MiB, row_bytes=row_bytes)
            )
    c0, t0 = time.process_time(), time.perf_counter()
    dask.compute(*graphs, scheduler="threads")
    print(
        "RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0})
    )


def reduce_in_child(
    store: Path, inv: dict[str, dict[str, Any]], layers: str | None, graph: bool = False
) -> dict[str, Any]:
    """Run the reduction in a fresh process; poll its RSS."""
    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(store)]
    if layers:
        cmd += ["--layers", layers]
    if graph:
        cmd += ["--graph"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"the reduction failed ({proc.returncode}):\n{err[-3000:]}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT ") :])
    res["polled_peak_rss_bytes"] = peak
    if graph:
        res["gbps"] = sum(v["decoded_bytes"] for v in inv.values()) / res["seconds"] / GB
        return res
    chosen = [v for v in inv.values() if layers is None or v["layer"] == layers]
    decoded = sum(v["decoded_bytes"] for v in chosen)
    res["layers"] = layers or "all"
    res["decoded_bytes"] = decoded
    res["gbps"] = decoded / res["seconds"] / GB
    res["samples_per_s"] = sum(v["samples"] for v in chosen) / res["seconds"]
    res["matrix_rows_per_s"] = sum(v["matrix_rows"] for v in chosen) / res["seconds"]
    return res


# -- main ------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    out = {}
    for dist in ("numpy", "torch", "zarr", "numcodecs", "dask", "threadpoolctl"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.3, help="decoded GB to write (default 2.3)")
    ap.add_argument("--store", help="measure this existing store (not written, not deleted)")
    ap.add_argument("--store-dir", help="folder for the written store (default: the system temp folder)")
    ap.add_argument("--compression", default=None, help="Recorder compression (default: the Recorder's)")
    ap.add_argument(
        "--chunk-mib", type=float, default=None, help="Recorder chunk_bytes in MiB (default: the Recorder's)"
    )
    ap.add_argument("--rounds", type=int, default=4, help="warm rounds (default 4)")
    ap.add_argument("--cold-rounds", type=int, default=2, help="cold rounds (default 2; 0: none)")
    ap.add_argument("--cold", choices=("fadvise", "drop_caches"), default="fadvise")
    ap.add_argument("--no-per-layer", action="store_true", help="reduce the whole store only")
    ap.add_argument("--budget-s", type=float, default=600, help="start no new round after this (default 600)")
    ap.add_argument("--quick", action="store_true", help="0.3 GB, one warm and one cold round")
    ap.add_argument("--keep", action="store_true", help="keep the written store")
    ap.add_argument("--out", default=str(HERE / "results" / "reduce.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--layers", help=argparse.SUPPRESS)
    ap.add_argument("--graph", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child and args.graph:
        graph_child(args.child)
        return
    if args.child:
        child(args.child, args.layers)
        return
    if args.quick:
        args.gb, args.rounds, args.cold_rounds = 0.3, 1, 1
    start = time.perf_counter()

    tmp = None
    written = None
    if args.store:
        store = Path(args.store)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="reduce-bench-", dir=args.store_dir))
        store = tmp / "run.zarr"
        print(f"writing {args.gb:.2f} GB of activations to {store} ...", flush=True)
        chunk_bytes = None if args.chunk_mib is None else int(args.chunk_mib * MiB)
        written = write_store(store, args.gb, args.compression, chunk_bytes)
        print(f"  written in {written['seconds']:.1f} s ({written['write_gbps']:.2f} GB/s)", flush=True)
    try:
        results = run(store, args, written, start)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            print(f"kept {store}")
    results["store_kept"] = bool(tmp is None or args.keep)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def run(store: Path, args: argparse.Namespace, written: dict | None, start: float) -> dict[str, Any]:
    load_start = os.getloadavg()
    inv = inventory(store)
    decoded = sum(v["decoded_bytes"] for v in inv.values())
    stored = sum(v["stored_bytes"] for v in inv.values())
    samples = sum(v["samples"] for v in inv.values())
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    print(
        f"store: {decoded / GB:.2f} GB decoded, {stored / GB:.2f} GB on disk, "
        f"codec {next(iter(inv.values()))['codec']}, chunks of "
        + ", ".join(f"{v['layer']}: {v['chunk_bytes'] / MiB:.0f} MiB x {v['chunks']}" for v in inv.values()),
        flush=True,
    )
    mats = load_subsets(inv, conv_mib=256, flat_mib=64)
    layer_names = [v["layer"] for v in inv.values()] if not args.no_per_layer else []

    warm: list[dict[str, Any]] = []
    cold: list[dict[str, Any]] = []
    # warm-up: one untimed read so that "warm" means in the page cache
    plain_read(inv, decode=False, threads=1)
    for i in range(max(args.rounds, 1)):
        if i and time.perf_counter() - start > args.budget_s:
            print(f"time budget reached: {i} warm round(s)")
            break
        r: dict[str, Any] = {"round": i, "loadavg": os.getloadavg()}
        r["reduction"] = reduce_in_child(store, inv, None)
        r["graph"] = reduce_in_child(store, inv, None, graph=True)
        r["per_layer"] = {name: reduce_in_child(store, inv, name) for name in layer_names}
        r["read"] = plain_read(inv, decode=False, threads=1)
        r["read_decode_1t"] = plain_read(inv, decode=True, threads=1)
        r["read_decode_2t"] = plain_read(inv, decode=True, threads=2)
        r["compute"] = compute_limit(inv, mats)
        r["io_limit_gbps"] = max(r["read_decode_1t"]["gbps"], r["read_decode_2t"]["gbps"])
        r["limit_gbps"] = min(r["io_limit_gbps"], r["compute"]["gbps"])
        r["ratio"] = r["reduction"]["gbps"] / r["limit_gbps"]
        r["graph_ratio"] = r["graph"]["gbps"] / r["limit_gbps"]
        # CPU-time efficiency (less sensitive to other processes): limit CPU s / reduction CPU s
        r["cpu_ratio"] = r["compute"]["cpu_seconds"] / r["reduction"]["cpu_seconds"]
        r["graph_cpu_ratio"] = r["compute"]["cpu_seconds"] / r["graph"]["cpu_seconds"]
        for name, res in r["per_layer"].items():
            key = next(k for k, v in inv.items() if v["layer"] == name)
            comp = r["compute"]["layers"][name]["gbps"]
            res["compute_limit_gbps"] = comp
            res["io_limit_gbps"] = r["io_limit_gbps"]  # the store's read + decode rate
            res["ratio"] = res["gbps"] / min(comp, r["io_limit_gbps"])
            del key
        warm.append(r)
        print(
            f"warm {i}: reduction {r['reduction']['gbps']:.3f} GB/s "
            f"({r['reduction']['samples_per_s']:.0f} samples/s, {r['reduction']['seconds']:.1f} s, "
            f"peak RSS {r['reduction']['peak_rss_bytes'] / GB:.2f} GB) | I/O limit {r['io_limit_gbps']:.2f} "
            f"(read {r['read']['gbps']:.2f}) | compute limit {r['compute']['gbps']:.3f} "
            + " ".join(f"[{n} {v['gbps']:.3f}]" for n, v in r["compute"]["layers"].items())
            + f" | ratio {r['ratio']:.2f} | reduction graph alone {r['graph']['gbps']:.3f} GB/s, "
            f"ratio {r['graph_ratio']:.2f} (load {r['loadavg'][0]:.1f})"
            + "".join(
                f" | {n} {v['gbps']:.3f} GB/s ratio {v['ratio']:.2f}" for n, v in r["per_layer"].items()
            ),
            flush=True,
        )
    for i in range(args.cold_rounds):
        if time.perf_counter() - start > args.budget_s:
            print(f"time budget reached: {i} cold round(s)")
            break
        c: dict[str, Any] = {"round": i, "loadavg": os.getloadavg()}
        c["evict_reduction"] = evict(store, args.cold)
        c["reduction"] = reduce_in_child(store, inv, None)
        c["evict_graph"] = evict(store, args.cold)
        c["graph"] = reduce_in_child(store, inv, None, graph=True)
        c["evict_read"] = evict(store, args.cold)
        c["read_decode_1t"] = plain_read(inv, decode=True, threads=1)
        c["evict_read_2t"] = evict(store, args.cold)
        c["read_decode_2t"] = plain_read(inv, decode=True, threads=2)
        c["compute"] = compute_limit(inv, mats)
        c["io_limit_gbps"] = max(c["read_decode_1t"]["gbps"], c["read_decode_2t"]["gbps"])
        c["limit_gbps"] = min(c["io_limit_gbps"], c["compute"]["gbps"])
        c["ratio"] = c["reduction"]["gbps"] / c["limit_gbps"]
        c["graph_ratio"] = c["graph"]["gbps"] / c["limit_gbps"]
        cold.append(c)
        left = c["evict_reduction"]["resident_bytes_after"]
        print(
            f"cold {i}: reduction {c['reduction']['gbps']:.3f} GB/s ({c['reduction']['seconds']:.1f} s) | "
            f"cold read+decode limit {c['io_limit_gbps']:.2f} | compute limit {c['compute']['gbps']:.3f} | "
            f"ratio {c['ratio']:.2f} | graph alone {c['graph']['gbps']:.3f} GB/s ratio {c['graph_ratio']:.2f} "
            f"| resident after eviction: " + ("unknown" if left is None else f"{left / MiB:.0f} MiB"),
            flush=True,
        )

    peak = max(
        [r["reduction"]["peak_rss_bytes"] for r in warm + cold]
        + [v["peak_rss_bytes"] for r in warm for v in r["per_layer"].values()]
    )
    polled = max(
        [r["reduction"]["polled_peak_rss_bytes"] for r in warm + cold]
        + [v["polled_peak_rss_bytes"] for r in warm for v in r["per_layer"].values()]
    )
    summary: dict[str, Any] = {
        "decoded_gb": decoded / GB,
        "stored_gb": stored / GB,
        "samples": samples,
        "warm_reduction_gbps": median([r["reduction"]["gbps"] for r in warm]),
        "warm_reduction_samples_per_s": median([r["reduction"]["samples_per_s"] for r in warm]),
        "warm_reduction_matrix_rows_per_s": median([r["reduction"]["matrix_rows_per_s"] for r in warm]),
        "warm_reduction_best_gbps": max(r["reduction"]["gbps"] for r in warm),
        "warm_finalize_seconds": median([r["reduction"]["finalize_seconds"] for r in warm]),
        "warm_reduction_seconds": median([r["reduction"]["seconds"] for r in warm]),
        "warm_io_limit_gbps": median([r["io_limit_gbps"] for r in warm]),
        "warm_plain_read_gbps": median([r["read"]["gbps"] for r in warm]),
        "compute_limit_gbps": median([r["compute"]["gbps"] for r in warm]),
        "warm_ratio": median([r["ratio"] for r in warm]),
        "warm_graph_gbps": median([r["graph"]["gbps"] for r in warm]),
        "warm_graph_ratio": median([r["graph_ratio"] for r in warm]),
        "warm_graph_cpu_ratio": median([r["graph_cpu_ratio"] for r in warm]),
        # best reduction against best limits over the rounds (less sensitive to other processes)
        "warm_ratio_best": max(r["reduction"]["gbps"] for r in warm) / max(r["limit_gbps"] for r in warm),
        "warm_cpu_ratio": median([r["cpu_ratio"] for r in warm]),
        "per_layer": {
            name: {
                "gbps": median([r["per_layer"][name]["gbps"] for r in warm]),
                "samples_per_s": median([r["per_layer"][name]["samples_per_s"] for r in warm]),
                "matrix_rows_per_s": median([r["per_layer"][name]["matrix_rows_per_s"] for r in warm]),
                "compute_limit_gbps": median([r["compute"]["layers"][name]["gbps"] for r in warm]),
                "ratio": median([r["per_layer"][name]["ratio"] for r in warm]),
                "ratio_best": max(r["per_layer"][name]["gbps"] for r in warm)
                / min(
                    max(r["compute"]["layers"][name]["gbps"] for r in warm),
                    max(r["io_limit_gbps"] for r in warm),
                ),
            }
            for name in layer_names
        },
        "cold_reduction_gbps": median([c["reduction"]["gbps"] for c in cold]) if cold else None,
        "cold_io_limit_gbps": median([c["io_limit_gbps"] for c in cold]) if cold else None,
        "cold_ratio": median([c["ratio"] for c in cold]) if cold else None,
        "cold_graph_gbps": median([c["graph"]["gbps"] for c in cold]) if cold else None,
        "cold_graph_ratio": median([c["graph_ratio"] for c in cold]) if cold else None,
        "cold_method": args.cold if cold else None,
        "peak_rss_bytes": peak,
        "polled_peak_rss_bytes": polled,
        "child_rss_before_reduction_bytes": median([r["reduction"]["rss_before_bytes"] for r in warm]),
    }
    summary["targets"] = {
        "graph_ratio_warm_ge_0.8": summary["warm_graph_ratio"] >= TARGET_RATIO,
        "graph_ratio_cold_ge_0.8": None if not cold else summary["cold_graph_ratio"] >= TARGET_RATIO,
        "run_stats_ratio_warm_ge_0.8": summary["warm_ratio"] >= TARGET_RATIO,
        "peak_rss_lt_1.5GB": peak < TARGET_RSS,
        "store_larger_than_1.5GB": decoded > TARGET_RSS,
    }
    print()
    print(
        f"reduction (warm, median of {len(warm)}): {summary['warm_reduction_gbps']:.3f} GB/s, "
        f"{summary['warm_reduction_samples_per_s']:.0f} samples/s, "
        f"{summary['warm_reduction_matrix_rows_per_s']:.3g} matrix rows/s"
    )
    print(
        f"  of which eigendecompositions (analyze.execute._finalize, summed over threads): "
        f"{summary['warm_finalize_seconds']:.2f} s of {summary['warm_reduction_seconds']:.2f} s; best round "
        f"{summary['warm_reduction_best_gbps']:.3f} GB/s"
    )
    print(
        f"the reduction alone (raw_reduction_graph, no statistics): warm {summary['warm_graph_gbps']:.3f} GB/s, "
        f"ratio {summary['warm_graph_ratio']:.2f} (CPU-time ratio {summary['warm_graph_cpu_ratio']:.2f})"
        + (
            f"; cold {summary['cold_graph_gbps']:.3f} GB/s, ratio {summary['cold_graph_ratio']:.2f}"
            if cold
            else ""
        )
    )
    print(
        f"limits (warm): I/O read+decode {summary['warm_io_limit_gbps']:.2f} GB/s "
        f"(plain read {summary['warm_plain_read_gbps']:.2f}), compute float64 X.T@X "
        f"{summary['compute_limit_gbps']:.3f} GB/s -> ratio {summary['warm_ratio']:.2f} "
        f"(best of rounds {summary['warm_ratio_best']:.2f}; target {TARGET_RATIO}; CPU-time ratio "
        f"{summary['warm_cpu_ratio']:.2f})"
    )
    for name, v in summary["per_layer"].items():
        print(
            f"  {name}: {v['gbps']:.3f} GB/s, {v['samples_per_s']:.0f} samples/s; compute limit "
            f"{v['compute_limit_gbps']:.3f} GB/s; ratio {v['ratio']:.2f} (best of rounds {v['ratio_best']:.2f})"
        )
    if cold:
        print(
            f"cold ({args.cold}): reduction {summary['cold_reduction_gbps']:.3f} GB/s, cold read+decode "
            f"{summary['cold_io_limit_gbps']:.2f} GB/s, ratio to min(limits) {summary['cold_ratio']:.2f}"
        )
    print(
        f"peak RSS of the reduction: {peak / GB:.2f} GB (polled {polled / GB:.2f} GB; "
        f"{summary['child_rss_before_reduction_bytes'] / GB:.2f} GB after imports) on a "
        f"{decoded / GB:.2f} GB store (target < 1.5 GB)"
    )
    print(
        "targets: "
        + ", ".join(
            f"{k}: {'n/a' if v is None else 'met' if v else 'MISSED'}" for k, v in summary["targets"].items()
        )
    )
    return {
        "benchmark": "reduce_throughput",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_start": load_start,
            "load_avg_at_end": os.getloadavg(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        },
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "store": {
            "path": str(store),
            "written": written,
            "layers": {
                k: {kk: vv for kk, vv in v.items() if kk not in ("files", "reader")} for k, v in inv.items()
            },
        },
        "summary": summary,
        "warm_rounds": warm,
        "cold_rounds": cold,
        "seconds": time.perf_counter() - start,
    }


if __name__ == "__main__":
    main()
