"""Dask reduction of stored runs to per-(epoch, phase) moments, deterministically.

Raw activations
---------------
A layer's raw array is read in tasks of ``2**k`` consecutive store chunks (aligned).
Each task computes, for every store chunk and every (epoch, phase) group with
selected rows in that chunk, the float64 moments of each reduction method's
matrix. Moments are merged over a binary tree whose shape depends only on the
store's chunk index (node ``[lo, hi)`` = merge of its two halves, an empty half
being the identity): tasks build the lower levels, dask ``delayed`` merges build
the upper ones. The result is therefore bit-for-bit the same whatever the task
size, the scheduler (synchronous, threads, processes, distributed) or the
number of workers.

Gram blocks
-----------
Blocks stored by the capture hook are merged in block order with
:func:`capture.moments.tree_merge`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from dask import delayed

from capture.moments import batch_moments, merge_moments, tree_merge
from capture.reshape import to_matrix
from capture.store import decode_stored

__all__ = [
    "Partial",
    "RawSource",
    "merge_partials",
    "raw_reduction_graph",
    "gram_partial",
    "chunk_reads",
    "ChunkReadError",
]

#: ``(count, mean, m2, nonfinite_rows)`` with numpy float64 arrays; ``None`` for "no rows".
Partial = tuple[int, np.ndarray, np.ndarray, int]

#: Counts the raw chunk ranges read (tests use it to prove that a cached re-run reads none).
chunk_reads: dict[str, int] = {"tasks": 0, "rows": 0}


@dataclass(frozen=True)
class RawSource:
    """Where a (rank, layer) raw array lives and how its rows become matrices."""

    store: str
    array_path: str
    stored_dtype: str
    layout: str
    chunk_rows: int
    rows: int
    interpolation: str | None = None
    downsample: int | None = None
    device: str = "cpu"
    label: str = ""


class ChunkReadError(RuntimeError):
    """A chunk range of a raw array could not be read or reduced."""


def merge_partials(a: Partial | None, b: Partial | None) -> Partial | None:
    """Merge two partial results; ``None`` is the identity (exactly)."""
    if a is None:
        return b
    if b is None:
        return a
    n, mean, m2 = _merge_moments(a[:3], b[:3])
    return n, mean, m2, a[3] + b[3]


def _merge_moments(a: tuple[int, Any, Any], b: tuple[int, Any, Any]) -> tuple[int, Any, Any]:
    """:func:`capture.moments.merge_moments`, bit for bit, with two d x d temporaries fewer (numpy)."""
    na, ma, sa = a
    nb, mb, sb = b
    if na == 0 or nb == 0 or not (isinstance(sa, np.ndarray) and isinstance(sb, np.ndarray)):
        return merge_moments(a, b)
    # The same operations in the same order as merge_moments, two of them in place.
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    m2 = sa + sb
    outer = delta[:, None] * delta[None, :]
    outer *= na * nb / n
    m2 += outer
    return n, mean, m2


def _merge_dicts(a: dict[Any, Partial], b: dict[Any, Partial]) -> dict[Any, Partial]:
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_partials(out.get(key), value)
    return out


def _merge_owned(a: Partial, b: Partial, scratch: dict[Any, np.ndarray]) -> Partial:
    """:func:`merge_partials` of two non-empty partials, bit for bit, written into ``a``'s m2.

    For the merges inside a task, whose partials the task made itself and nobody else holds: a
    fresh d x d result and temporary page-fault on every merge (half its cost for d = 1024).
    """
    na, ma, sa, fa = a
    nb, mb, sb, fb = b
    if not (
        na
        and nb
        and isinstance(sa, np.ndarray)
        and isinstance(sb, np.ndarray)
        and sa.dtype == sb.dtype == np.float64
        and sa.shape == sb.shape
        and sa.ndim == 2
        and sa.flags.writeable
    ):
        return merge_partials(a, b)
    # The operations of capture.moments.merge_moments, in its order.
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    outer = _scratch_array(scratch, "outer", sa.shape)
    np.multiply(delta[:, None], delta[None, :], out=outer)
    outer *= na * nb / n
    sa += sb
    sa += outer
    return n, mean, sa, fa + fb


def _tree_over_positions(
    leaves: dict[int, dict[Any, Partial]], lo: int, hi: int, scratch: dict[Any, np.ndarray] | None = None
) -> dict[Any, Partial]:
    """Merge ``leaves`` (position -> partials) over the aligned binary tree on ``[lo, hi)``.

    With ``scratch`` the leaves' arrays are merged in place (they must belong to the caller).
    """
    present = [p for p in leaves if lo <= p < hi]
    if not present:
        return {}
    if hi - lo == 1:
        return leaves[lo]
    mid = (lo + hi) // 2
    left = _tree_over_positions(leaves, lo, mid, scratch)
    right = _tree_over_positions(leaves, mid, hi, scratch)
    if scratch is None:
        return _merge_dicts(left, right)
    out = dict(left)
    for key, value in right.items():
        mine = out.get(key)
        out[key] = value if mine is None else _merge_owned(mine, value, scratch)
    return out


_scratch_local = threading.local()
#: Largest buffer a thread keeps from one task to the next.
_SCRATCH_KEEP = 32 * 2**20


def _thread_scratch() -> dict[str, np.ndarray]:
    """This thread's reusable buffers, kept between tasks (a few per thread, each <= 32 MiB).

    A fresh large buffer page-faults on every use: glibc gives it back to the system when it is
    freed, and one kept for the whole task is freed at the task's end.
    """
    buffers = getattr(_scratch_local, "buffers", None)
    if buffers is None:
        buffers = _scratch_local.buffers = {}
    return buffers


def _scratch_array(
    scratch: dict[str, np.ndarray], key: str, shape: tuple[int, ...], dtype: Any = np.float64
) -> np.ndarray:
    """A C-contiguous array of ``shape`` in the reusable buffer ``key`` (its values are garbage)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes > _SCRATCH_KEEP:
        return np.empty(shape, dtype=dtype)
    buf = scratch.get(key)
    if buf is None or buf.size < nbytes:
        buf = scratch[key] = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def _batch_moments(
    x: Any, feature_major: bool, scratch: dict[str, np.ndarray] | None
) -> tuple[int, Any, Any]:
    """:func:`capture.moments.batch_moments`, bit for bit, centring into a reused buffer."""
    axis = 1 if feature_major else 0
    if scratch is None or not isinstance(x, np.ndarray) or not x.flags.c_contiguous or x.shape[axis] == 0:
        return batch_moments(x, feature_major=feature_major)
    # batch_moments' numpy path; a C-contiguous x gives a C-ordered centred matrix there too.
    mean = x.mean(axis=axis, dtype=np.float64)
    centred = _scratch_array(scratch, "centred", x.shape)
    if feature_major:
        np.subtract(x, mean[:, None], dtype=np.float64, out=centred)
        return int(x.shape[axis]), mean, centred @ centred.T
    np.subtract(x, mean[None, :], dtype=np.float64, out=centred)
    return int(x.shape[axis]), mean, centred.T @ centred


def _matrix_moments(
    x: np.ndarray, layout: str, method: str, src: RawSource, scratch: dict[str, np.ndarray] | None = None
) -> Partial:
    """Float64 moments of the matrix of ``x`` (rows of one group in one chunk).

    ``scratch`` (:func:`_thread_scratch`) holds the float64 buffer of the centring.
    """
    if x.dtype == np.float16:
        # torch keeps float16 through mean / interpolate: work in float32, as for float32 and bfloat16 stores
        x = x.astype(np.float32)
    if src.device != "cpu":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x)).to(src.device)
        mat = to_matrix(t, layout, method, interpolation=src.interpolation, downsample=src.downsample)
        n, mean, m2 = batch_moments(mat)
        mean, m2 = mean.cpu().numpy(), m2.cpu().numpy()
    elif layout == "conv" and method == "channelwise" and src.interpolation is None:
        # Fused: transpose to channel-major, cast to float64 and centre in one pass; then SYRK.
        c = x.shape[1]
        axes = (0, *range(2, x.ndim))
        mean = x.mean(axis=axes, dtype=np.float64)
        shape = (c, x.shape[0], *x.shape[2:])
        centred = (
            np.empty(shape, dtype=np.float64)
            if scratch is None
            else _scratch_array(scratch, "centred", shape)
        )
        np.subtract(np.moveaxis(x, 1, 0), mean.reshape(c, *([1] * (x.ndim - 1))), out=centred)
        centred = centred.reshape(c, -1)
        n, m2 = centred.shape[1], centred @ centred.T
    else:
        feature_major = method == "channelwise"
        mat = to_matrix(
            x,
            layout,
            method,
            interpolation=src.interpolation,
            downsample=src.downsample,
            feature_major=feature_major,
        )
        n, mean, m2 = _batch_moments(mat, feature_major, scratch)
    nonfinite = 0
    if not np.isfinite(mean).all():
        nonfinite = int((~np.isfinite(x.reshape(x.shape[0], -1))).any(axis=1).sum())
    return int(n), mean, m2, nonfinite


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None


def _release_blas_control() -> None:
    """Let the next thread that sets OpenBLAS's (process-wide) thread count do so.

    threadpoolctl >= 3.6 lets only the first thread that sets the count change it; the others
    are ignored silently, until that thread leaves a ``with threadpool_limits`` block. The tasks
    of a process take turns under ``_blas_lock``, so whichever of them starts the limit or ends
    it must be heard.
    """
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:  # pragma: no cover - older threadpoolctl: any thread may set it
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS limited to one thread while any reduction task of this process runs.

    The tasks are the parallelism. The limit is process-wide and ``threadpool_limits`` restores
    on exit what it found on entry: with two tasks overlapping in threads, the first to end would
    give the other's products every core again (on a busy machine a 2-thread OpenBLAS SYRK ran
    20x slower than a 1-thread one). One limit shared by the running tasks (a reference count)
    holds until the last one ends; the last one restores it, from whichever thread.
    """
    from threadpoolctl import threadpool_limits

    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _release_blas_control()
            _blas_limiter = threadpool_limits(limits=1, user_api="blas")
            _release_blas_control()
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                limiter, _blas_limiter = _blas_limiter, None
                _release_blas_control()
                limiter.restore_original_limits()
                _release_blas_control()


def _plain_chunk_files(src: RawSource) -> dict[str, Any] | None:
    """How to read ``src``'s chunks as plain files, or ``None`` when zarr must read them.

    Covers what :class:`capture.Recorder` writes: a local zarr v3 array, a regular grid with one
    chunk across every axis but the first, the default chunk key encoding, little-endian
    ``bytes`` and at most a Blosc compressor (no sharding, no other codec).
    """
    if "://" in src.store:
        return None
    folder = os.path.join(src.store, *src.array_path.split("/"))
    try:
        with open(os.path.join(folder, "zarr.json"), "rb") as f:
            meta = json.load(f)
        shape = [int(s) for s in meta["shape"]]
        grid = meta["chunk_grid"]
        chunks = [int(s) for s in grid["configuration"]["chunk_shape"]]
        keys = meta["chunk_key_encoding"]
        codecs = meta["codecs"]
        dtype = np.dtype(meta["data_type"])
        fill = meta.get("fill_value", 0)
    except Exception:  # noqa: BLE001 - anything unexpected: let zarr read it
        return None
    if (
        meta.get("zarr_format") != 3
        or meta.get("storage_transformers")
        or grid.get("name") != "regular"
        or keys.get("name") != "default"
        or len(shape) < 1
        or len(chunks) != len(shape)
        or chunks[0] != src.chunk_rows
        or chunks[1:] != shape[1:]
        or dtype.kind not in "fiub"
        or not codecs
        or codecs[0].get("name") != "bytes"
        or (codecs[0].get("configuration") or {}).get("endian", "little") != "little"
        or any(c.get("name") != "blosc" for c in codecs[1:])
        or len(codecs) > 2
        or not isinstance(fill, (int, float))
    ):
        return None
    sep = (keys.get("configuration") or {}).get("separator", "/")
    return {
        "folder": folder,
        "prefix": "c" + sep,
        "suffix": "".join(sep + "0" for _ in shape[1:]),
        "dtype": dtype.newbyteorder("<"),
        "row_shape": tuple(shape[1:]),
        "blosc": len(codecs) == 2,
        "fill": fill,
    }


def _read_chunk_file(
    plan: dict[str, Any], chunk: int, out: np.ndarray, scratch: dict[str, np.ndarray] | None = None
) -> None:
    """Decode store chunk ``chunk`` into ``out`` (the whole chunk, C-contiguous), as zarr would.

    A compressed chunk's bytes are read into the reusable buffer ``frame`` of ``scratch``.
    """
    path = os.path.join(plan["folder"], f"{plan['prefix']}{chunk}{plan['suffix']}")
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:  # never written: zarr reads the fill value
        out[...] = plan["fill"]
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        if not plan["blosc"]:
            if size != out.nbytes or f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise ValueError(f"chunk file {path} holds {size} bytes, not {out.nbytes}")
            return
        frame = (
            np.empty(size, np.uint8)
            if scratch is None
            else _scratch_array(scratch, "frame", (size,), np.uint8)
        )
        with memoryview(frame) as raw:
            if f.readinto(raw) != size:
                raise ValueError(f"chunk file {path}: short read")
            _decode_blosc(path, raw, out)


def _decode_blosc(path: str, raw: memoryview, out: np.ndarray) -> None:
    from numcodecs import blosc

    # The Blosc header (16 bytes): decoded size at bytes 4-8, frame size at 12-16 (little endian).
    nbytes = int.from_bytes(raw[4:8], "little") if len(raw) >= 16 else -1
    cbytes = int.from_bytes(raw[12:16], "little") if len(raw) >= 16 else -1
    if nbytes != out.nbytes or cbytes != len(raw):
        raise ValueError(
            f"chunk file {path}: a Blosc frame of {cbytes} bytes decoding to {nbytes} in a file of {len(raw)} "
            f"bytes, for a chunk of {out.nbytes}"
        )
    blosc.decompress(raw, out)


def _chunks_of(
    src: RawSource, chunk_lo: int, chunk_hi: int, scratch: dict[str, np.ndarray] | None = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(chunk, first row, decoded rows)`` of each store chunk in ``[chunk_lo, chunk_hi)`` with rows.

    Chunk files of a plain local array are decoded one at a time into one chunk-sized buffer (the
    rows of a chunk are consumed before the next is read); other arrays are read through zarr.
    The values are the same either way.
    """
    r = src.chunk_rows
    plan = _plain_chunk_files(src)
    if plan is None:
        start, stop = chunk_lo * r, min(chunk_hi * r, src.rows)
        array = zarr.open_array(src.store, path=src.array_path, mode="r")
        data = decode_stored(np.asarray(array[start:stop]), src.stored_dtype)
        for chunk in range(chunk_lo, chunk_hi):
            c0, c1 = chunk * r, min((chunk + 1) * r, src.rows)
            if c1 > c0:
                yield chunk, c0, data[c0 - start : c1 - start]
        return
    shape = (r, *plan["row_shape"])
    buffer = (
        np.empty(shape, plan["dtype"])
        if scratch is None
        else _scratch_array(scratch, "chunk", shape, plan["dtype"])
    )
    for chunk in range(chunk_lo, chunk_hi):
        c0, c1 = chunk * r, min((chunk + 1) * r, src.rows)
        if c1 <= c0:
            break
        _read_chunk_file(plan, chunk, buffer, scratch)
        yield chunk, c0, decode_stored(buffer[: c1 - c0], src.stored_dtype)


def _reduce_chunk_range(
    src: RawSource,
    chunk_lo: int,
    chunk_hi: int,
    groups: dict[Any, list[tuple[int, int]]],
    methods: tuple[str, ...],
) -> dict[Any, Partial]:
    """Partials of every (group, method) over store chunks ``[chunk_lo, chunk_hi)`` (one task)."""
    r = src.chunk_rows
    start, stop = chunk_lo * r, min(chunk_hi * r, src.rows)
    epochs = sorted({g[0] for g in groups if isinstance(g, tuple)})
    leaves: dict[int, dict[Any, Partial]] = {}
    scratch = _thread_scratch()
    chunks = _chunks_of(src, chunk_lo, chunk_hi, scratch)
    with _one_blas_thread():
        while True:
            try:
                item = next(chunks, None)
            except Exception as exc:  # noqa: BLE001 - re-raised with its context
                raise ChunkReadError(
                    f"{src.label or src.store}: epoch(s) {epochs}: reading chunks "
                    f"{chunk_lo}-{min(chunk_hi, -(-src.rows // r)) - 1} "
                    f"(rows {start}-{stop - 1}) of {src.array_path} failed: {type(exc).__name__}: {exc}"
                ) from exc
            if item is None:
                break
            chunk, c0, data = item
            c1 = c0 + len(data)
            for group, ranges in groups.items():
                parts = [data[max(a, c0) - c0 : min(b, c1) - c0] for a, b in ranges if a < c1 and b > c0]
                if not parts:
                    continue
                x = parts[0] if len(parts) == 1 else np.concatenate(parts)
                leaf = leaves.setdefault(chunk, {})
                for method in methods:
                    leaf[(group, method)] = _matrix_moments(x, src.layout, method, src, scratch)
    chunk_reads["tasks"] += 1
    chunk_reads["rows"] += stop - start
    return _tree_over_positions(leaves, chunk_lo, chunk_hi, scratch)


def raw_reduction_graph(
    src: RawSource,
    groups: dict[Any, list[tuple[int, int]]],
    methods: Sequence[str],
    task_bytes: int = 16 * 2**20,
    row_bytes: int = 1,
) -> Any:
    """A dask ``delayed`` giving ``{(group, method): Partial}`` for one (rank, layer) raw array.

    Parameters
    ----------
    src : RawSource
        The array and its reshaping.
    groups : dict
        group key (e.g. ``(epoch, phase)``) -> selected row ranges ``(start, stop)``.
    methods : sequence of str
        Reduction methods for the layer's layout.
    task_bytes : int
        Decoded bytes per task (rounded to a power-of-two number of store chunks).
        It does not change the result, only the parallelism.
    row_bytes : int
        Decoded bytes of one row.
    """
    r = src.chunk_rows
    n_chunks = -(-src.rows // r) if src.rows else 0
    per_task = max(1, task_bytes // max(1, r * row_bytes))
    per_task = 1 << (per_task.bit_length() - 1)  # power of two: tasks align with the tree
    needed: set[int] = set()
    for ranges in groups.values():
        for a, b in ranges:
            if b > a:
                needed.update(range(a // r // per_task, (b - 1) // r // per_task + 1))
    size = 1
    while size < max(1, -(-n_chunks // per_task)):
        size *= 2
    methods = tuple(methods)
    nodes: dict[int, Any] = {}
    for t in sorted(needed):
        lo = t * per_task
        hi = lo + per_task
        sub = {g: [(a, b) for a, b in rs if a < hi * r and b > lo * r] for g, rs in groups.items()}
        sub = {g: rs for g, rs in sub.items() if rs}
        nodes[t] = delayed(_reduce_chunk_range, pure=True)(src, lo, hi, sub, methods)
    # Upper levels of the same aligned tree, over task positions [0, size).
    while size > 1:
        merged: dict[int, Any] = {}
        for left in range(0, size, 2):
            a, b = nodes.get(left), nodes.get(left + 1)
            if a is not None and b is not None:
                merged[left // 2] = delayed(_merge_dicts, pure=True)(a, b)
            elif a is not None or b is not None:
                merged[left // 2] = a if a is not None else b
        nodes, size = merged, size // 2
    return nodes.get(0, delayed(dict)())


def gram_partial(
    read_block: Callable[[int], tuple[int, np.ndarray, np.ndarray]],
    blocks: Sequence[int],
    nonfinite_rows: int,
) -> Partial | None:
    """Merge stored gram blocks (indices in store order) into one partial."""
    if not len(blocks):
        return None
    n, mean, m2 = tree_merge([read_block(int(i)) for i in blocks])
    return n, mean, m2, nonfinite_rows
