"""Chunk objects of an array in an object store, fetched whole and ahead of their reader.

The object-store side of the raw chunk reader (:class:`capture.store.RawChunks`): where a local
store's chunk files are read with plain file reads, a store at a URL gets each chunk object whole,
with one request, and up to :data:`READ_AHEAD` of them are in flight while the reader decodes and
reduces the one before. The bytes are then decoded by the same plain decoder as a local chunk file
(:meth:`capture.store.ChunkFiles.decode`: checksum verified and stripped, Blosc decoded), not by
zarr's codec pipeline.

Requests run on zarr's event loop (:func:`zarr.core.sync.sync`), from a small pool of threads of
this process. Nothing here is shared with another process: the pool is made again in a forked
child, and the stores are opened by the process that reads (:func:`capture.storage.open_store`).

Examples
--------
>>> import uuid, zarr
>>> from capture.storage import open_store
>>> store = open_store(f"memory://doc-{uuid.uuid4().hex}/a.zarr")
>>> z = zarr.create_array(store, shape=(4,), chunks=(2,), dtype="uint8", compressors=None)
>>> z[:] = [1, 2, 3, 4]
>>> [None if b is None else bytes(b) for b in fetch_ahead(store, ["c/1", "c/0", "c/9"])]
[b'\\x03\\x04', b'\\x01\\x02', None]
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

__all__ = ["READ_AHEAD", "FETCH_THREADS", "fetch", "fetch_ahead"]

#: Chunk objects requested ahead of the one being read (per reader; a dask worker runs several).
READ_AHEAD = 4
#: Threads of this process that wait on requests (they only wait: the requests run on zarr's loop).
FETCH_THREADS = 16

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _pools.clear()  # the parent's threads do not exist in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _pool() -> ThreadPoolExecutor:
    pid = os.getpid()
    with _lock:
        pool = _pools.get(pid)
        if pool is None:
            _pools.clear()
            pool = _pools[pid] = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="chunk-fetch")
        return pool


def fetch(store: Store, key: str) -> np.ndarray | None:
    """The whole object ``key`` of ``store`` as bytes (a ``uint8`` array, no copy); None if absent."""
    buffer = sync(store.get(key, default_buffer_prototype()))
    return None if buffer is None else buffer.as_numpy_array()


def fetch_ahead(store: Store, keys: Sequence[str], ahead: int = READ_AHEAD) -> Iterator[np.ndarray | None]:
    """The objects ``keys`` of ``store`` in order (see :func:`fetch`), up to ``ahead`` requests in flight.

    A request that fails raises its error when its object's turn comes; requests not yet consumed
    when the caller stops are cancelled (or finish unread).
    """
    pool = _pool()
    pending: deque[Future[np.ndarray | None]] = deque()
    todo = iter(keys)
    try:
        for key in todo:
            pending.append(pool.submit(fetch, store, key))
            if len(pending) >= max(1, ahead):
                break
        while pending:
            data = pending.popleft().result()
            for key in todo:
                pending.append(pool.submit(fetch, store, key))
                break
            yield data
    finally:
        for future in pending:
            future.cancel()
