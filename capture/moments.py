"""Partial moments of a sample matrix: count, mean and centred second moment, in float64.

One set of kernels serves every stage: the capture hook (gram mode), the reduction of stored raw
chunks, the drop-in tracker (through the hook's blocks) and the PCA layers. The same rows handed
over in the same batches give the same bits in all of them.

How a batch is reduced (:func:`shifted_sums`, :func:`moments_of_sums`)
-----------------------------------------------------------------------
The rows ``x_i`` are cast to float64 and shifted by a fixed vector ``s`` in one pass, a column of
ones is appended, and one BLAS ``dsyrk`` per slab of rows adds ``y_i y_i^T`` (``y_i = [x_i - s,
1]``) to a ``(d + 1, d + 1)`` column-major accumulator, in place (``beta=1``). Its lower triangle
then holds ``Q = sum (x_i - s)(x_i - s)^T``, the column sums ``S = sum (x_i - s)`` and the count.
Only when a block is finished are they turned into ``mean = s + S / n`` and ``m2 = Q - S S^T / n``.
There is no separate mean pass and no centring pass, and the cast happens in cache-sized slabs.
A long batch (a conv map's positions) is taken as two halves summed apart and added at the end;
the second half may run on a helper thread (:func:`helper_thread`: the capture hook's, while training waits
for it) without changing a bit.

The shift rule (:func:`shift_of`): the float64 mean of the first slab of rows of the first batch
(the first ``slab_rows(d)`` rows; non-finite entries replaced by 0), summed from the input itself
before the cast (half the bytes of the float64 slab for float32 input), so that the cast subtracts
it in the same pass and the helper thread can start at once. It depends on the rows and their
memory layout alone, so every path that hands the same batches over computes the same shift. ``m2 = Q - S S^T / n`` loses about ``(1 + |mean - s|^2 / var)``
times the rounding of ``Q``; the first slab's mean is within a few standard deviations of the
batch mean even for a conv map whose border rows differ from its inside (a single row, the top-left
corner of the first map, can be hundreds of standard deviations away when the inputs carry a
large common offset).

Between blocks, partial moments ``(count, mean, m2)`` are merged pairwise (Chan, Golub and
LeVeque), which is cancellation safe: :func:`merge_moments`, :func:`tree_merge`.

:class:`Moments` is the stateful shell (``update``, ``merge``, ``compute``, ``reset``), and
:func:`one_blas_thread` the one BLAS-thread limit of both stages.

Arrays: numpy arrays and CPU torch tensors go through the BLAS kernels above (torch tensors come
back as torch tensors); tensors on other devices are reduced with torch on their device by the same
formulas (one product per batch, not bit-identical to the CPU path).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from capture.buffers import thread_buffer

__all__ = [
    "Moments",
    "batch_moments",
    "helper_thread",
    "merge_moments",
    "moments_of_sums",
    "one_blas_thread",
    "shift_of",
    "shifted_sums",
    "slab_rows",
    "tree_merge",
    "to_numpy",
]

#: Bytes of float64 per slab of rows cast for one ``dsyrk`` (measured: 4-8 MiB ran fastest here).
SLAB_BYTES = 8 * 2**20
#: Fewest rows per slab (a shorter product runs below the BLAS's speed).
MIN_SLAB_ROWS = 512
#: A batch with at least this many rows per feature, and at least ``MIN_SLAB_ROWS`` rows, gets its
#: own moments, merged into the block (cheap next to its product; keeps the moments of the last
#: batch without a copy of its rows). Other batches are added to the block's shifted sums, saving
#: a d x d merge per batch (and, for a narrow layer's short batch, the kernel's per-call overhead,
#: several times its arithmetic).
OWN_MOMENTS_ROWS_PER_FEATURE = 8


def _own_moments(n: int, d: int) -> bool:
    """Whether :class:`Moments` gives a batch of ``n`` rows, ``d`` wide, its own moments."""
    return n >= OWN_MOMENTS_ROWS_PER_FEATURE * (d + 1) and n >= MIN_SLAB_ROWS


#: Fewest multiply-adds (rows x (d + 1)^2) in half a product for it to go to the helper thread:
#: handing a product over and waking the thread costs more than a smaller product (an MLP's
#: 10-wide output layer spent more time in the hand-over than in its products).
HELPER_MIN_WORK = 2**22

Partial = tuple[int, Any, Any]


def _worth_helping(helper: Any, rows: int, d: int) -> Any:
    """``helper``, or None when half a product of ``rows`` rows, ``d`` wide, is too small for it."""
    return helper if helper is not None and (rows // 2) * (d + 1) ** 2 >= HELPER_MIN_WORK else None


# -- BLAS ------------------------------------------------------------------------------------------
_blas_dsyrk: Any = None


def _dsyrk() -> Any:
    """``dsyrk(a, c, trans, lda)``: ``c += a^T a`` (``trans="T"``, ``a`` is k x n) or ``a a^T`` (``"N"``,
    n x k), lower triangle, column-major with leading dimension ``lda``; in place.

    The BLAS that scipy links, called through the function pointer scipy exports for Cython
    (``scipy.linalg.cython_blas``) with ctypes, which releases the GIL for the call: the analysis
    tasks and the hook's helper thread multiply at the same time (scipy's own wrapper holds the
    GIL: two threads ran one after the other). The wrapper is the fallback.
    """
    global _blas_dsyrk
    if _blas_dsyrk is None:
        _blas_dsyrk = _capsule_dsyrk() or _wrapper_dsyrk()
    return _blas_dsyrk


def _capsule_dsyrk() -> Any:
    import ctypes

    try:
        from scipy.linalg import cython_blas

        capsule = cython_blas.__pyx_capi__["dsyrk"]
        # private prototypes (setting restype on ctypes.pythonapi's would change them for everyone)
        get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
            ("PyCapsule_GetName", ctypes.pythonapi)
        )
        get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
            ("PyCapsule_GetPointer", ctypes.pythonapi)
        )
        pointer = get_pointer(capsule, get_name(capsule))
    except Exception:  # noqa: BLE001 - another scipy: its wrapper does the same (holding the GIL)
        return None
    c_int, c_double, ptr = ctypes.c_int, ctypes.c_double, ctypes.c_void_p
    int_p, double_p = ctypes.POINTER(c_int), ctypes.POINTER(c_double)
    blas = ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, int_p, int_p, double_p, ptr, int_p, double_p, ptr, int_p
    )(pointer)
    one = c_double(1.0)

    def dsyrk(a: np.ndarray, c: np.ndarray, trans: str, lda: int) -> None:
        n = c.shape[0]
        k = a.shape[0] if trans == "T" else a.shape[1]
        blas(
            b"L",
            trans.encode(),
            c_int(n),
            c_int(k),
            one,
            a.ctypes.data,
            c_int(lda),
            one,
            c.ctypes.data,
            c_int(n),
        )

    return dsyrk


def _wrapper_dsyrk() -> Any:
    from scipy.linalg.blas import dsyrk as wrapped

    def dsyrk(a: np.ndarray, c: np.ndarray, trans: str, lda: int) -> None:
        if not a.flags.f_contiguous:  # a leading dimension beyond the rows: the wrapper copies
            a = np.asfortranarray(a)
        wrapped(1.0, a, beta=1.0, c=c, trans=1 if trans == "T" else 0, lower=1, overwrite_c=1)

    return dsyrk


_blas_lock = threading.Lock()
_blas_users = 0
#: (library controller, its thread count found by the first caller) while a limit holds
_blas_saved: list[tuple[Any, int]] = []
_blas_libraries: list[Any] | None = None


def _release_blas_control() -> None:
    """Let the next thread that sets OpenBLAS's (process-wide) thread count do so.

    threadpoolctl >= 3.6 lets only the first thread that sets the count change it; the others are
    ignored silently until that thread leaves its limit. Whichever thread starts or ends the shared
    limit below must be heard.
    """
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:  # pragma: no cover - older threadpoolctl: any thread may set it
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


def _blas_controllers() -> list[Any]:
    """threadpoolctl's controllers of the BLAS libraries loaded (numpy's, scipy's); [] without it."""
    global _blas_libraries
    if _blas_libraries is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover
            _blas_libraries = []
        else:
            _dsyrk()  # scipy's BLAS must be loaded before the controller looks for libraries
            _blas_libraries = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _blas_libraries


class _OneBlasThread:
    """The context manager of :func:`one_blas_thread` (a class: entered once per hooked call, it
    must cost microseconds; threadpoolctl's ``limit`` object took about 0.1 ms a call)."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _blas_users
        with _blas_lock:
            if _blas_users == 0:
                _release_blas_control()
                _blas_saved[:] = [(lib, lib.get_num_threads()) for lib in _blas_controllers()]
                for lib, threads in _blas_saved:
                    if threads != 1:
                        lib.set_num_threads(1)
                _release_blas_control()
            _blas_users += 1

    def __exit__(self, *exc: Any) -> None:
        global _blas_users
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _release_blas_control()
                for lib, threads in _blas_saved:
                    if threads != 1:
                        lib.set_num_threads(threads)
                _blas_saved.clear()
                _release_blas_control()


_ONE_BLAS_THREAD = _OneBlasThread()


def one_blas_thread() -> contextlib.AbstractContextManager[None]:
    """Run the BLAS of numpy and scipy on one thread while any caller is inside.

    Used around the moment products of the capture hook and of the analysis tasks, which bring
    their own parallelism (the training's threads, the scheduler's): an OpenBLAS thread pool next
    to them spins against them (bench/README.md). The limit is process-wide; it holds until the
    last of the overlapping callers (any threads) leaves, which restores the thread counts found
    by the first. A no-op without threadpoolctl.

    Examples
    --------
    >>> with one_blas_thread():
    ...     pass
    """
    return _ONE_BLAS_THREAD


# -- the batch kernel ----------------------------------------------------------------------------
def slab_rows(d: int) -> int:
    """Rows per slab (one ``dsyrk``) for a matrix ``d`` features wide.

    Examples
    --------
    >>> slab_rows(128), slab_rows(1024)
    (8128, 1023)
    """
    return max(MIN_SLAB_ROWS, SLAB_BYTES // (8 * (d + 1)))


def _layout(x: np.ndarray, feature_major: bool) -> tuple[int, int, tuple[int, int]]:
    """``(d, n, (a, b))``: width, rows, and (feature major) the rows as ``a`` runs of ``b``."""
    if feature_major:
        if x.ndim not in (2, 3):
            raise ValueError(f"a feature-major matrix must be (d, n) or (d, a, b), got shape {x.shape}")
        runs = (1, int(x.shape[1])) if x.ndim == 2 else (int(x.shape[1]), int(x.shape[2]))
        return int(x.shape[0]), runs[0] * runs[1], runs
    if x.ndim != 2:
        raise ValueError(f"a sample-major matrix must be (n, d), got shape {x.shape}")
    return int(x.shape[1]), int(x.shape[0]), (int(x.shape[0]), 1)


def _fill_slab(
    x: np.ndarray,
    feature_major: bool,
    runs: tuple[int, int],
    r0: int,
    r1: int,
    shift: Any,
    buf: np.ndarray | None = None,
    at: int = 0,
) -> np.ndarray:
    """Rows ``[r0, r1)`` of ``x`` minus ``shift`` in float64, with a column of ones: ``(r1 - r0, d + 1)``.

    Written into ``buf`` from its row ``at`` (sample major ``(capacity, d + 1)``, feature major
    ``(d + 1, capacity)``, C-contiguous; this thread's slab buffer by default, filled from row 0).
    Returns the rows written, as a view ``(rows, d + 1)``: the transpose of ``buf``'s columns when
    feature major. From row 0 of the default buffer the BLAS reads it without a copy.
    """
    rows = r1 - r0
    if not feature_major:
        d = x.shape[1]
        if buf is None:
            buf = thread_buffer("moments.slab", (rows, d + 1))
        y = buf[at : at + rows]
        np.subtract(x[r0:r1], shift, out=y[:, :d], dtype=np.float64)
        y[:, d] = 1.0
        return y
    d = x.shape[0]
    if buf is None:
        buf = thread_buffer("moments.slab", (d + 1, rows))
    src = x.reshape(d, runs[0], runs[1])  # a view: x is (d, n) or (d, a, b)
    array_shift = isinstance(shift, np.ndarray)
    inner = runs[1]
    pos, r = at, r0
    while r < r1:  # at most three pieces: the end of a run, whole runs, the start of a run
        a, b = divmod(r, inner)
        if b == 0 and r1 - r >= inner:
            k = (r1 - r) // inner
            out = buf[:d, pos : pos + k * inner].reshape(d, k, inner)
            np.subtract(
                src[:, a : a + k], shift[:, None, None] if array_shift else shift, out=out, dtype=np.float64
            )
            step = k * inner
        else:
            step = min(inner - b, r1 - r)
            out = buf[:d, pos : pos + step]
            np.subtract(
                src[:, a, b : b + step], shift[:, None] if array_shift else shift, out=out, dtype=np.float64
            )
        pos += step
        r += step
    buf[d, at : at + rows] = 1.0
    return buf[:, at : at + rows].T


def _syrk(y: np.ndarray, out: np.ndarray) -> None:
    """``out += y^T y`` (lower triangle) for a slab ``y`` of :func:`_fill_slab`, without a copy.

    ``y`` (rows, d + 1) is C-contiguous (sample major: its transpose is the column-major
    ``(d + 1, rows)`` matrix ``A``, ``out += A A^T``), or a column-major matrix whose columns are
    contiguous (feature major: ``A = y``, ``out += A^T A``; its leading dimension may exceed the rows).
    """
    if y.flags.c_contiguous and not (y.flags.f_contiguous and y.shape[0] > 1):
        _dsyrk()(y.T, out, "N", y.shape[1])
    else:
        _dsyrk()(y, out, "T", y.strides[1] // 8)


def _native(x: Any) -> tuple[Any, bool]:
    """``x`` as a numpy array when the BLAS kernels can read it (numpy, CPU torch); else torch."""
    if isinstance(x, np.ndarray):
        return x, True
    import torch

    if isinstance(x, torch.Tensor) and x.device.type == "cpu":
        x = x.detach()
        if x.dtype not in (torch.float64, torch.float32, torch.float16):
            x = x.to(torch.float32)  # bfloat16, integers: numpy cannot view them; exact for bfloat16
        return x.numpy(), True
    return x, False


def _rows_mean(x: np.ndarray, feature_major: bool, runs: tuple[int, int], r0: int, r1: int) -> np.ndarray:
    """The shift from rows ``[r0, r1)`` of ``x``: their float64 mean (non-finite entries: 0).

    Read from ``x`` as it is (float32 is half the bytes of the float64 slab), before the slab is
    cast, so that the cast subtracts it in the same pass and the helper thread can start at once.
    Feature major, the rows are summed per run of contiguous positions.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are counted by the callers
        if not feature_major:
            total = x[r0:r1].sum(axis=0, dtype=np.float64)
        else:
            d = x.shape[0]
            src = x.reshape(d, runs[0], runs[1])
            inner = runs[1]
            total = np.zeros(d)
            r = r0
            while r < r1:  # the pieces of _fill_slab: the end of a run, whole runs, the start of a run
                a, b = divmod(r, inner)
                if b == 0 and r1 - r >= inner:
                    k = (r1 - r) // inner
                    total += src[:, a : a + k].sum(axis=(1, 2), dtype=np.float64)
                    r += k * inner
                else:
                    step = min(inner - b, r1 - r)
                    total += src[:, a, b : b + step].sum(axis=1, dtype=np.float64)
                    r += step
        mean = total / (r1 - r0)
    return np.where(np.isfinite(mean), mean, 0.0)


def shift_of(x: Any, feature_major: bool = False) -> Any:
    """The shift of a block whose first batch is ``x``: the mean of its first slab of rows.

    Float64 mean of the first ``slab_rows(d)`` rows (all of them in a shorter batch), non-finite
    entries replaced by 0.

    Examples
    --------
    >>> shift_of(np.array([[1.0, 2.0], [3.0, np.nan]])).tolist()
    [2.0, 0.0]
    """
    x, native = _native(x)
    if not native:
        return _torch_shift(x, feature_major)
    d, n, runs = _layout(x, feature_major)
    if n == 0:
        return np.zeros(d)
    return _rows_mean(x, feature_major, runs, 0, min(n, slab_rows(d)))


def _add_rows(
    x: np.ndarray,
    feature_major: bool,
    runs: tuple[int, int],
    rows: tuple[int, int],
    shift: np.ndarray | None,
    out: np.ndarray,
    on_shift: Any = None,
    split: tuple[np.ndarray, Any] | None = None,
) -> np.ndarray:
    """Add the slabs of rows ``[r0, r1)`` to ``out``, one ``dsyrk`` each; returns the shift.

    With ``shift=None`` the first slab gives it (:func:`shift_of`, averaged from ``x`` before the
    cast); ``on_shift(shift)`` is called as soon as it is known. With ``split=(second,
    helper)`` each slab's rows are halved between ``out`` and ``second`` (:func:`_split_syrk`).
    """
    d = out.shape[0] - 1
    step = slab_rows(d)
    for r0 in range(rows[0], rows[1], step):
        r1 = min(rows[1], r0 + step)
        if shift is None:
            shift = _rows_mean(x, feature_major, runs, r0, r1)
            if on_shift is not None:
                on_shift(shift)
        y = _fill_slab(x, feature_major, runs, r0, r1, shift)
        if split is None:
            _syrk(y, out)
        else:
            _split_syrk(y, out, split[0], split[1])
    return np.zeros(d) if shift is None else shift


def _split_syrk(y: np.ndarray, first: np.ndarray, second: np.ndarray, helper: Any) -> None:
    """A short batch's slab ``y`` in two halves of its rows: ``first += `` the first half's product,
    ``second += `` the other's (on ``helper`` meanwhile, when given). The same bits either way."""
    half = len(y) // 2
    helper = _worth_helping(helper, len(y), y.shape[1] - 1)
    if helper is None:
        _syrk(y[:half], first)
        _syrk(y[half:], second)
        return
    job = helper.submit(_syrk, y[half:], second)
    _syrk(y[:half], first)
    job.result()


_helper: Any = None
_helper_lock = threading.Lock()


def helper_thread() -> Any:
    """The one worker thread (a ``concurrent.futures`` executor) that can take half a product.

    The capture hook passes it to the kernels (``helper=``): while the hook runs, training waits
    and its other core is idle, so the second half of a long batch runs there. The numbers do not
    depend on it (see :func:`shifted_sums`).
    """
    global _helper
    with _helper_lock:
        if _helper is None:
            from concurrent.futures import ThreadPoolExecutor

            _helper = ThreadPoolExecutor(1, thread_name_prefix="capture-moments")
        return _helper


def shifted_sums(
    x: Any,
    shift: np.ndarray | None = None,
    out: np.ndarray | None = None,
    feature_major: bool = False,
    *,
    helper: Any = None,
    second: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Add ``sum_i y_i y_i^T``, ``y_i = [x_i - shift, 1]``, to the lower triangle of ``out``.

    The rows are cast and shifted slab by slab (``slab_rows(d)`` rows) into a reused buffer, one
    ``dsyrk`` (``beta=1``) per slab and half. A long batch (:func:`_long`) is taken as two halves,
    rows ``[0, n // 2)`` into ``out`` and the rest into a zeroed accumulator added to it at the end;
    a short batch's slabs are each halved that way (as when streamed into a block). With ``helper``
    (:func:`helper_thread`) the second halves run on that thread meanwhile; the same bits either way.

    Parameters
    ----------
    x : numpy.ndarray or CPU torch.Tensor
        ``(n, d)``; or, with ``feature_major=True``, ``(d, n)`` or ``(d, a, b)`` whose last two
        axes are the rows (e.g. ``(C, N, H * W)``, a view of a conv output ``(N, C, H, W)``).
    shift : array of shape (d,), optional
        Subtracted from every row in the cast pass. None: :func:`shift_of` ``(x)``, taken from the
        first slab while it is in cache.
    out : array of shape (d + 1, d + 1), float64, Fortran order, optional
        The accumulator; only its lower triangle is read and written, its upper triangle must be 0.
        A new zero one by default.
    feature_major : bool
        Whether features run along the first axis of ``x``.
    helper : concurrent.futures.Executor, optional
        Where the second half of a long batch may run.
    second : array like ``out``, optional
        The accumulator of the second halves, kept by the caller over several batches (it adds
        it to ``out`` once, when they are all in: one ``(d + 1)^2`` pass less per batch). By
        default a zeroed buffer, added to ``out`` before returning. Adding ``second`` to ``out``
        after one batch into zeroed accumulators gives the default's bits.

    Returns
    -------
    shift : array of shape (d,)
    sums : the accumulator
        ``Q = sum (x_i - s)(x_i - s)^T`` in ``[:d, :d]``, the column sums ``S`` in row ``d``, the
        number of rows at ``[d, d]``.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> shift, sums = shifted_sums(x)
    >>> shift.tolist(), sums.tolist()
    ([2.0, 4.0], [[2.0, 0.0, 0.0], [4.0, 8.0, 0.0], [0.0, 0.0, 2.0]])
    """
    x, _ = _native(x)
    d, n, runs = _layout(x, feature_major)
    if out is None:
        out = np.zeros((d + 1, d + 1), order="F")
    for name, acc in (("out", out), ("second", second)):
        if acc is not None and (
            acc.shape != (d + 1, d + 1) or acc.dtype != np.float64 or not acc.flags.f_contiguous
        ):
            raise ValueError(f"{name}: need a ({d + 1}, {d + 1}) float64 Fortran-ordered accumulator")
    own_second = second is None
    if second is None:
        second = _zeroed_sums("moments.second", d)
    if not _long(n, d):  # each slab's rows in two halves, as when streamed into a block
        shift = _add_rows(x, feature_major, runs, (0, n), shift, out, split=(second, helper))
    else:
        shift = _long_halves(x, feature_major, runs, shift, out, second, _worth_helping(helper, n, d))
    if own_second:
        out += second
    return shift, out


def _long_halves(
    x: np.ndarray,
    feature_major: bool,
    runs: tuple[int, int],
    shift: np.ndarray | None,
    out: np.ndarray,
    second: np.ndarray,
    helper: Any,
) -> np.ndarray:
    """Rows ``[0, n // 2)`` of a long batch into ``out``, the rest into ``second`` (on ``helper``)."""
    n = runs[0] * runs[1]
    half = n // 2
    pending: list[Any] = []

    def start_second(s: np.ndarray) -> None:
        args = (x, feature_major, runs, (half, n), s, second)
        pending.append(helper.submit(_add_rows, *args) if helper is not None else args)

    if shift is not None:
        start_second(shift)
    shift = _add_rows(
        x, feature_major, runs, (0, half), shift, out, on_shift=None if pending else start_second
    )
    job = pending[0]
    if helper is not None:
        job.result()
    else:
        _add_rows(*job)
    return shift


def _long(n: int, d: int) -> bool:
    """Whether a batch of ``n`` rows, ``d`` wide, is long: its own moments, summed as two halves.

    Long: at least ``OWN_MOMENTS_ROWS_PER_FEATURE`` rows per feature and two slabs (a conv map's
    positions). A short batch's slabs follow each other from its first row, as when it is streamed
    into a block (:class:`Moments`), so one short batch gives the same bits either way.
    """
    return n >= OWN_MOMENTS_ROWS_PER_FEATURE * (d + 1) and n >= 2 * slab_rows(d)


def _zeroed_sums(key: str, d: int) -> np.ndarray:
    """A zeroed ``(d + 1, d + 1)`` Fortran-ordered accumulator in this thread's reused buffer ``key``."""
    sums = thread_buffer(key, (d + 1, d + 1)).T
    sums.fill(0.0)
    return sums


def moments_of_sums(count: int, shift: Any, sums: Any) -> Partial:
    """``(count, mean, m2)`` from an accumulator of :func:`shifted_sums` (lower triangle).

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> shift, sums = shifted_sums(x, np.ones(2))
    >>> n, mean, m2 = moments_of_sums(2, shift, sums)
    >>> mean.tolist(), m2.tolist()
    ([2.0, 4.0], [[2.0, 4.0], [4.0, 8.0]])
    """
    d = int(sums.shape[0]) - 1
    if count == 0:
        return 0, _zeros_like(sums, (d,)), _zeros_like(sums, (d, d))
    s = sums[d, :d]
    if isinstance(sums, np.ndarray):
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are counted by the callers
            mean = shift + s / count
            m2 = _centred_from_sums(sums, s, count)
        return count, mean, m2
    mean = shift + s / count
    m2 = sums[:d, :d].tril()
    m2 = m2 + m2.tril(-1).T
    return count, mean, m2 - (s[:, None] * s[None, :]) / count


#: Tile size of the mirror in :func:`_centred_from_sums` (a tile and its transpose stay in cache).
_TILE = 64


def _centred_from_sums(sums: np.ndarray, s: np.ndarray, count: int) -> np.ndarray:
    """``Q - S S^T / n`` from the lower triangle of ``sums``, exactly symmetric, tile by tile.

    Each lower tile is computed once and written twice (as itself and transposed); a whole-matrix
    transposed read runs several times slower, out of cache.
    """
    d = len(s)
    m2 = np.empty((d, d))
    for i in range(0, d, _TILE):
        ie = min(d, i + _TILE)
        for j in range(0, i + 1, _TILE):
            je = min(d, j + _TILE)
            tile = np.multiply.outer(s[i:ie], s[j:je])
            tile /= count
            np.subtract(sums[i:ie, j:je], tile, out=tile)
            m2[i:ie, j:je] = tile
            if j != i:
                m2[j:je, i:ie] = tile.T
        block = m2[i:ie, i:ie]  # the diagonal tile: its upper part came from the (zero) upper triangle
        upper = np.triu_indices(ie - i, 1)
        block[upper] = block.T[upper]
    return m2


def batch_moments(x: Any, feature_major: bool = False, *, helper: Any = None) -> Partial:
    """Count, mean and centred second moment of one batch, in float64.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        The sample matrix, shape ``(n, d)``; or ``(d, ...)`` with ``feature_major=True``, whose
        other axes are the rows (the faster layout for a channelwise convolution).
    feature_major : bool
        Whether features run along the first axis.
    helper : concurrent.futures.Executor, optional
        A thread for half of a long batch's product (:func:`shifted_sums`); the same bits.

    Returns
    -------
    count : int
        Number of rows ``n``.
    mean : array of shape (d,)
        Row mean, float64 (a torch tensor for a torch input).
    m2 : array of shape (d, d)
        ``sum_i (x_i - mean)(x_i - mean)^T``, float64, symmetric.

    Examples
    --------
    >>> n, mean, m2 = batch_moments(np.array([[1.0, 2.0], [3.0, 6.0]]))
    >>> n, mean.tolist(), m2.tolist()
    (2, [2.0, 4.0], [[2.0, 4.0], [4.0, 8.0]])
    """
    native, ok = _native(x)
    if not ok:
        return _torch_batch_moments(native, feature_major)
    d, n, _ = _layout(native, feature_major)
    with one_blas_thread():
        sums = _zeroed_sums("moments.sums", d)
        shift, sums = shifted_sums(native, out=sums, feature_major=feature_major, helper=helper)
    part = moments_of_sums(n, shift, sums)
    return part if isinstance(x, np.ndarray) else _as_torch(part)


def _as_torch(part: Partial) -> Partial:
    """``part`` with CPU torch tensors (sharing the numpy arrays' memory)."""
    import torch

    return part[0], torch.from_numpy(np.asarray(part[1])), torch.from_numpy(np.asarray(part[2]))


# -- torch on other devices -------------------------------------------------------------------------
def _torch_rows(x: Any, feature_major: bool) -> Any:
    import torch

    x64 = x.to(torch.float64)
    return x64.reshape(x64.shape[0], -1).T if feature_major else x64


def _torch_shift(x: Any, feature_major: bool) -> Any:
    import torch

    rows = _torch_rows(x, feature_major)
    mean = rows[: slab_rows(rows.shape[1])].mean(dim=0)
    return torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean))


def _torch_batch_moments(x: Any, feature_major: bool) -> Partial:
    import torch

    rows = _torch_rows(x, feature_major)
    n, d = int(rows.shape[0]), int(rows.shape[1])
    if n == 0:
        return 0, rows.new_zeros(d), rows.new_zeros((d, d))
    shift = _torch_shift(x, feature_major)
    y = torch.cat([rows - shift, rows.new_ones((n, 1))], dim=1)
    return moments_of_sums(n, shift, (y.T @ y).tril())


def _zeros_like(ref: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(ref, np.ndarray):
        return np.zeros(shape, dtype=np.float64)
    import torch

    return torch.zeros(shape, dtype=torch.float64, device=ref.device)


# -- merging ---------------------------------------------------------------------------------------
def merge_moments(a: Partial, b: Partial, *, inplace: bool = False) -> Partial:
    """Merge two partial moments ``(count, mean, m2)`` (Chan et al.'s pairwise update).

    With ``inplace=True`` the result's ``m2`` is ``a``'s ``m2`` array, updated in place (for an
    accumulator that owns ``a``; its d x d temporary is a reused buffer). The numbers are the same.

    Examples
    --------
    >>> x = np.arange(12.0).reshape(6, 2) ** 1.5
    >>> n, mean, m2 = merge_moments(batch_moments(x[:2]), batch_moments(x[2:]))
    >>> bool(np.allclose(m2 / n, np.cov(x.T, bias=True)))
    True
    """
    na, ma, sa = a
    nb, mb, sb = b
    if na == 0:
        return nb, mb, sb
    if nb == 0:
        return na, ma, sa
    if isinstance(sa, np.ndarray):
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are counted by the callers
            return _chan(na, ma, sa, nb, mb, sb, inplace)
    return _chan(na, ma, sa, nb, mb, sb, inplace)


def _chan(na: int, ma: Any, sa: Any, nb: int, mb: Any, sb: Any, inplace: bool) -> Partial:
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    if inplace and isinstance(sa, np.ndarray) and sa.flags.writeable:
        # The same operations in the same order as below: (sa + sb) + (outer * factor).
        outer = np.multiply(delta[:, None], delta[None, :], out=thread_buffer("moments.outer", sa.shape))
        outer *= na * nb / n
        sa += sb
        sa += outer
        return n, mean, sa
    if inplace:
        sa += sb
        sa += (delta[:, None] * delta[None, :]) * (na * nb / n)
        return n, mean, sa
    m2 = sa + sb + (delta[:, None] * delta[None, :]) * (na * nb / n)
    return n, mean, m2


def tree_merge(parts: Sequence[Partial]) -> Partial:
    """Merge partial moments pairwise in a fixed, balanced tree order.

    The order only depends on the position of each part in ``parts``, so the result is bit-for-bit
    reproducible for a given list.
    """
    if not parts:
        raise ValueError("tree_merge needs at least one partial moment")
    level = list(parts)
    while len(level) > 1:
        nxt = [merge_moments(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


# -- the stateful shell ----------------------------------------------------------------------------
def _all_finite(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return bool(np.isfinite(x).all())
    import torch

    return bool(torch.isfinite(x).all())


class _ShiftedBlock:
    """The shifted sums of a block of short batches, whose rows stream through one slab.

    The rows of successive batches fill one float64 slab (cast, shifted, with the column of ones);
    each full slab (``slab_rows(d)`` rows) is one ``dsyrk`` into the accumulator, so a block of many
    short calls (an MLP's 128-row batches) runs long products, and the ``(d + 1)^2`` accumulator is
    read and written once per slab, not once per call. The shift is the first batch's
    (:func:`shift_of`). The slab grows with the rows it has held, up to a slab (a narrow layer's
    slab holds many rows: it is not taken whole for a block of a few calls).
    """

    def __init__(self, d: int, feature_major: bool) -> None:
        self.d, self.feature_major = d, feature_major
        self.step = slab_rows(d)
        self.sums = np.zeros((d + 1, d + 1), order="F")
        self.second = np.zeros((d + 1, d + 1), order="F")  # the slabs' second halves
        self.slab = np.empty((0, 0))
        self.filled = 0
        self.rows = 0
        self.shift: np.ndarray | None = None

    def _room(self, rows: int) -> None:
        """Make the slab hold ``rows`` rows (at most a slab), keeping what it holds."""
        capacity = self.slab.shape[1] if self.feature_major else self.slab.shape[0]
        if rows <= capacity:
            return
        # at once to a whole slab for a wide layer (a slab is at most a few accumulators' size)
        grown = min(self.step, max(rows, 2 * capacity, 4 * (self.d + 1)))
        shape = (self.d + 1, grown) if self.feature_major else (grown, self.d + 1)
        slab = np.empty(shape)
        if self.filled:
            if self.feature_major:
                slab[:, : self.filled] = self.slab[:, : self.filled]
            else:
                slab[: self.filled] = self.slab[: self.filled]
        self.slab = slab

    def add(self, x: np.ndarray, helper: Any = None) -> bool:
        """Stream the rows of ``x`` in; returns whether they were all finite."""
        d, n, runs = _layout(x, self.feature_major)
        total = 0.0
        r = 0
        with np.errstate(invalid="ignore", over="ignore"):
            while r < n:
                take = min(n - r, self.step - self.filled)
                self._room(self.filled + take)
                if self.shift is None:  # the shift rule: the first slab's rows of the first batch
                    self.shift = _rows_mean(x, self.feature_major, runs, r, r + take)
                y = _fill_slab(x, self.feature_major, runs, r, r + take, self.shift, self.slab, self.filled)
                total += float(y[:, :d].sum())
                self.filled += take
                r += take
                if self.filled == self.step:
                    self._product(helper)
        self.rows += n
        return bool(np.isfinite(total))

    def _product(self, helper: Any = None) -> None:
        if self.filled:
            y = self.slab[:, : self.filled].T if self.feature_major else self.slab[: self.filled]
            _split_syrk(y, self.sums, self.second, helper)
            self.filled = 0

    def finish(self) -> Partial:
        """``(count, mean, m2)`` of the block."""
        with one_blas_thread():
            self._product()
        self.sums += self.second
        assert self.shift is not None
        return moments_of_sums(self.rows, self.shift, self.sums)


class Moments:
    """Streaming moments of a sample matrix: a stateful shell around the kernels.

    State: the moments merged so far ``(count, mean, m2)`` and, for short batches, a block of
    shifted sums not yet turned into moments (their rows streamed through one slab). :meth:`update` adds a batch,
    :meth:`merge` another partial result (Chan's update), :meth:`compute` returns ``(count, mean,
    m2)``, :meth:`reset` forgets everything.

    A batch of at least ``OWN_MOMENTS_ROWS_PER_FEATURE * (d + 1)`` and ``MIN_SLAB_ROWS`` rows (a
    conv map's positions) gets its own moments (:func:`batch_moments`), merged into the state; a shorter one streams into
    the shifted sums of the current block (no d x d merge per batch, one product per slab of rows).
    The same batches in the same order give the same bits wherever this class is used; one short
    batch alone gives the bits of :func:`batch_moments`.

    Parameters
    ----------
    count, mean, m2 : optional
        Start from these partial moments.
    keep_last : bool
        Keep what it takes to return the moments of the last batch alone (:meth:`last`): those
        moments themselves, or a copy of a short batch's rows.

    Attributes
    ----------
    last_finite : bool or None
        Whether the last batch was free of NaN / Inf (None before any).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(100, 3))
    >>> acc = Moments()
    >>> for part in np.array_split(x, 7):
    ...     _ = acc.update(part)
    >>> bool(np.allclose(acc.covariance(), np.cov(x.T, bias=True)))
    True
    """

    def __init__(self, count: int = 0, mean: Any = None, m2: Any = None, *, keep_last: bool = False) -> None:
        self._merged: Partial | None = None if mean is None else (int(count), mean, m2)
        self._owned = False  # whether _merged's m2 may be updated in place (nobody else holds it)
        self._block: _ShiftedBlock | None = None  # short batches since the last merge
        self._torch = False  # inputs were torch tensors: results are too
        self.keep_last = keep_last
        self._last: Any = None
        self._last_rows: np.ndarray | None = None
        self.last_finite: bool | None = None

    # -- state ---------------------------------------------------------------------------------------
    def update(self, x: Any, feature_major: bool = False, *, helper: Any = None) -> Moments:
        """Add a batch ``x`` (``(n, d)``; ``(d, n)`` or ``(d, a, b)`` when feature major).

        ``helper``: a thread for half of a long batch's product (:func:`helper_thread`).
        """
        native, blas = _native(x)
        self._torch = not isinstance(x, np.ndarray)
        if blas:
            d, n, _ = _layout(native, feature_major)
        else:
            n = int(x.shape[1:].numel() if feature_major else x.shape[0])
            d = int(x.shape[0] if feature_major else x.shape[1])
        if n == 0:
            self.last_finite = True
            return self
        if not blas or _own_moments(n, d):
            part = batch_moments(x, feature_major, helper=helper if blas else None)
            self._fold(part, shared=self.keep_last)
            self.last_finite = _all_finite(part[1])
            if self.keep_last:
                self._last, self._last_rows = part, None
            return self
        block = self._block
        if block is None or block.d != d or block.feature_major != feature_major:
            self._flush()
            block = self._block = _ShiftedBlock(d, feature_major)
        with one_blas_thread():
            self.last_finite = block.add(native, helper)
        if self.keep_last:
            self._keep_rows(native, feature_major)
        return self

    def _keep_rows(self, native: np.ndarray, feature_major: bool) -> None:
        """Copy a short batch's rows (into the previous copy's buffer when it fits)."""
        kept = self._last_rows
        if kept is None or kept.shape != native.shape or kept.dtype != native.dtype:
            kept = np.empty_like(native)
        np.copyto(kept, native)
        self._last, self._last_rows = feature_major, kept

    def _fold(self, part: Partial, shared: bool) -> None:
        """Merge ``part`` into the state (after the pending shifted sums)."""
        self._flush()
        if self._merged is None:
            self._merged, self._owned = part, not shared
        else:
            self._merged = merge_moments(self._merged, part, inplace=self._owned)
            self._owned = True

    def _flush(self) -> None:
        """Turn the pending block of short batches into moments and merge them into the state."""
        block, self._block = self._block, None
        if block is not None:
            part = block.finish()
            self._fold(_as_torch(part) if self._torch else part, shared=False)

    def merge(self, other: Moments) -> Moments:
        """Merge another partial result into this one (in place); returns ``self``."""
        part = other.compute()
        if part[1] is None:
            return self
        self._torch = self._torch or not isinstance(part[1], np.ndarray)
        self._fold(part, shared=True)
        return self

    def compute(self) -> tuple[int, Any, Any]:
        """``(count, mean, m2)`` of everything added; ``(0, None, None)`` before anything was.

        The arrays are the state's own until the next update: copy them to keep them.
        """
        self._flush()
        if self._merged is None:
            return 0, None, None
        self._owned = False  # handed out
        return self._merged

    def last(self) -> Partial | None:
        """``(count, mean, m2)`` of the last batch alone (``keep_last=True``), or None."""
        if self._last is None or not isinstance(self._last, bool):
            return self._last
        part = batch_moments(self._last_rows, self._last)
        return _as_torch(part) if self._torch else part

    def reset(self, keep_last: bool = False) -> None:
        """Forget every batch; with ``keep_last``, :meth:`last` still returns the last one's moments."""
        last, rows, torch_out = self._last, self._last_rows, self._torch
        self.__init__(keep_last=self.keep_last)  # type: ignore[misc]
        if keep_last:
            self._last, self._last_rows, self._torch = last, rows, torch_out

    # -- views ---------------------------------------------------------------------------------------
    def as_tuple(self) -> tuple[int, Any, Any]:
        """:meth:`compute`."""
        return self.compute()

    @property
    def count(self) -> int:
        """Rows added so far (does not finish the pending block)."""
        return (self._merged[0] if self._merged is not None else 0) + (self._block.rows if self._block else 0)

    @property
    def mean(self) -> Any:
        return self.compute()[1]

    @property
    def m2(self) -> Any:
        return self.compute()[2]

    @property
    def dim(self) -> int | None:
        mean = self.mean
        return None if mean is None else int(mean.shape[0])

    def covariance(self) -> np.ndarray:
        """Population covariance ``m2 / count`` as a float64 numpy array."""
        count, mean, m2 = self.compute()
        if mean is None or count == 0:
            raise ValueError("no samples were added to these moments")
        return to_numpy(m2) / count

    def to_numpy(self) -> Moments:
        """A copy whose arrays are numpy float64 arrays."""
        count, mean, m2 = self.compute()
        if mean is None:
            return Moments()
        return Moments(count, to_numpy(mean).copy(), to_numpy(m2).copy())


def to_numpy(x: Any) -> np.ndarray:
    """A float64 numpy array from a numpy array or a torch tensor on any device."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False)
    return x.detach().to("cpu").numpy().astype(np.float64, copy=False)
