"""A background thread that runs write tasks in order, with bounded memory in flight.

The capture hook hands work (a copied batch, a block of moments, a commit) to
:class:`BackgroundWriter` and goes on with training. When more than
``max_queue_bytes`` wait, the hook blocks until the writer catches up: nothing is
ever dropped. A task that fails stops the writer; the error is raised, with its
context, at the recorder's next call.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundWriter", "WriterError"]


class WriterError(RuntimeError):
    """Writing to a run store failed in the background writer."""


class BackgroundWriter:
    """Run callables on one background thread, in submission order.

    Parameters
    ----------
    max_queue_bytes : int
        Bound on the bytes of submitted but unfinished tasks. A task larger than
        the bound is accepted alone.
    name : str
        Thread name (shown in tracebacks and profilers).
    """

    def __init__(self, max_queue_bytes: int = 256 * 2**20, name: str = "delve-pipeline-writer") -> None:
        if max_queue_bytes <= 0:
            raise ValueError(f"max_queue_bytes: must be positive, got {max_queue_bytes!r}")
        self.max_queue_bytes = int(max_queue_bytes)
        self._tasks: collections.deque[tuple[Callable[[], Any], int, str]] = collections.deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._pending = 0
        self._closed = False
        self._error: BaseException | None = None
        self._error_context = ""
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- producer side -------------------------------------------------------------------------
    def submit(self, task: Callable[[], Any], nbytes: int = 0, context: str = "") -> None:
        """Queue ``task``; block while more than ``max_queue_bytes`` are in flight.

        Raises
        ------
        WriterError
            If an earlier task failed.
        """
        with self._cond:
            self._raise_if_failed()
            if self._closed:
                raise WriterError("the writer is closed")
            while self._in_flight > 0 and self._in_flight + nbytes > self.max_queue_bytes:
                self._cond.wait()
                self._raise_if_failed()
            self._in_flight += nbytes
            self._pending += 1
            self.peak_bytes = max(self.peak_bytes, self._in_flight)
            self._tasks.append((task, nbytes, context))
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every submitted task has run; raise if one failed."""
        with self._cond:
            while self._pending > 0 and self._error is None:
                self._cond.wait()
            self._raise_if_failed()

    def close(self) -> None:
        """Finish the queued tasks and stop the thread (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            self._raise_if_failed()

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def in_flight_bytes(self) -> int:
        return self._in_flight

    def check(self) -> None:
        """Raise :class:`WriterError` if a task has failed."""
        with self._cond:
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            ctx = f" ({self._error_context})" if self._error_context else ""
            raise WriterError(f"background write failed{ctx}: {self._error}") from self._error

    # -- consumer side -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._closed:
                    self._cond.wait()
                if not self._tasks:
                    return
                task, nbytes, context = self._tasks.popleft()
            try:
                if self._error is None:
                    task()
            except BaseException as exc:  # noqa: BLE001 - reported to the training thread
                with self._cond:
                    self._error = exc
                    self._error_context = context
            finally:
                with self._cond:
                    self._in_flight -= nbytes
                    self._pending -= 1
                    self._cond.notify_all()
