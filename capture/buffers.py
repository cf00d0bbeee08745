"""Reused work buffers, one set per thread.

A fresh buffer of more than a few MiB page-faults on every use (glibc hands large blocks back to
the system when they are freed), which costs as much as the arithmetic done in it. The moment
kernels and the chunk reader therefore keep their buffers from one call to the next, per thread
(the analysis runs several tasks in threads at once).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["KEEP_BYTES", "thread_buffer"]

#: Largest buffer kept from one call to the next (a larger request gets a fresh array).
KEEP_BYTES = 32 * 2**20

_local = threading.local()


def thread_buffer(key: str, shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
    """A C-contiguous array of ``shape`` in this thread's reused buffer ``key``; its values are garbage.

    The array is valid until the next request of the same ``key`` on the same thread.

    Examples
    --------
    >>> a = thread_buffer("example", (2, 3))
    >>> b = thread_buffer("example", (3, 2))
    >>> a.shape, b.shape, bool(np.shares_memory(a, b))
    ((2, 3), (3, 2), True)
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > KEEP_BYTES:
        return np.empty(shape, dtype=dtype)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.size < nbytes:
        buf = buffers[key] = np.empty(max(nbytes, 64), dtype=np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)
