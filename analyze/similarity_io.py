"""What the similarity pass borrows from the covariance reduction: chunk reading, thread limits, compute.

This module is the one place where :mod:`analyze.similarity_graph` touches the raw-chunk reader and
the execution helpers of the covariance reduction (:mod:`analyze.reduce`, :mod:`analyze.execute`),
and the moment kernels' BLAS limit (:func:`capture.moments.one_blas_thread`).
Each is wrapped by one small public function here, or passed on as it is
(:func:`~analyze.execute.raw_source`, :func:`~analyze.execute.compute_with_progress`), so that a
move of the reader (to :mod:`capture.store`) changes this module alone.

:data:`chunk_reads` counts every store chunk the pass reads, per array and chunk: the tests use it
to prove that one pass reads each chunk of each layer once, and that a cached re-run reads none.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from analyze.execute import compute_with_progress, raw_source
from analyze.reduce import RawSource
from capture.moments import one_blas_thread

__all__ = [
    "RawSource",
    "chunk_reads",
    "compute_with_progress",
    "one_blas_thread",
    "one_torch_thread",
    "raw_source",
    "read_chunks",
]

#: ``(store, array path, chunk) -> times read`` by :func:`read_chunks` in this process.
chunk_reads: Counter[tuple[str, str, int]] = Counter()
_reads_lock = threading.Lock()


def read_chunks(src: RawSource, chunk_lo: int, chunk_hi: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(chunk, first row, decoded rows)`` of each store chunk of ``src`` in ``[chunk_lo, chunk_hi)``.

    The rows of a chunk live in a buffer that the next chunk overwrites: copy what you keep.
    float16 rows come back as float32 (as the covariance reduction works on them).
    """
    for chunk, first, rows in src.reader().chunks(chunk_lo, chunk_hi):
        with _reads_lock:
            chunk_reads[(src.store, src.array_path, chunk)] += 1
        yield chunk, first, rows.astype(np.float32) if rows.dtype == np.float16 else rows


_torch_lock = threading.Lock()
_torch_users = 0
_torch_threads = 0


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's intra-op pool limited to one thread while any task of this process is inside the block.

    The dask tasks are the parallelism: a pooling of a 16 MiB chunk ran at 4-9 GB/s on one torch
    thread and at 1.1-1.5 GB/s on two, next to another task. The setting is process-wide, so the
    first task in sets it and the last one out restores it.
    """
    import torch

    global _torch_users, _torch_threads
    with _torch_lock:
        if _torch_users == 0:
            _torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _torch_users += 1
    try:
        yield
    finally:
        with _torch_lock:
            _torch_users -= 1
            if _torch_users == 0:
                torch.set_num_threads(_torch_threads)
