"""Which recorded rows enter a covariance: sample selection from the call bookkeeping.

Every recorded call is a row of the run's ``calls`` table (epoch, phase, layer,
delve's call counter, first row, row count). A :class:`Selection` turns that table
into row ranges of the raw array, per (epoch, phase), with delve 0.1.50's rules:

* ``log_interval``: keep calls whose counter (1-based, per layer, shared by train and
  eval, never reset) is a multiple of it;
* ``max_samples``: per epoch and phase, keep at most that many rows, cutting the
  call that crosses the budget;
* ``calls``: a window ``(start, stop)`` over the kept calls of an epoch and phase
  (Python slice semantics, negative numbers count from the end);
* ``last_call``: only the last kept call (delve 0.1.50's covariance is that of the
  last recorded batch of the epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Selection", "select_rows"]


@dataclass(frozen=True)
class Selection:
    """Sample selection options (all ``None`` / ``False``: every recorded row).

    Examples
    --------
    >>> Selection(log_interval=2).is_default, Selection().is_default
    (False, True)
    """

    log_interval: int | None = None
    max_samples: int | None = None
    calls: tuple[int | None, int | None] | None = None
    last_call: bool = False

    def __post_init__(self) -> None:
        for name in ("log_interval", "max_samples"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
            ):
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.calls is not None:
            if len(self.calls) != 2:
                raise ValueError(f"calls: a (start, stop) window, got {self.calls!r}")
            object.__setattr__(self, "calls", (self.calls[0], self.calls[1]))

    @property
    def is_default(self) -> bool:
        return (
            self.log_interval is None
            and self.max_samples is None
            and self.calls is None
            and not self.last_call
        )

    @property
    def needs_rows(self) -> bool:
        """Whether only raw activations can serve it (gram blocks hold whole epochs or the last call).

        ``log_interval=1`` keeps every recorded call, so gram blocks serve it.

        Examples
        --------
        >>> Selection(log_interval=1).needs_rows, Selection(log_interval=2).needs_rows
        (False, True)
        """
        return (
            self.log_interval not in (None, 1) or self.max_samples is not None or self.calls is not None
        )

    def key(self) -> tuple:
        return (self.log_interval, self.max_samples, self.calls, self.last_call)


def select_rows(
    call_index: np.ndarray, first_row: np.ndarray, row_count: np.ndarray, selection: Selection
) -> list[tuple[int, int]]:
    """Row ranges ``(start, stop)`` of the calls of one (rank, layer, epoch, phase) kept by ``selection``.

    Parameters
    ----------
    call_index, first_row, row_count : numpy.ndarray
        Columns of the calls table for those calls, in recording order.

    Examples
    --------
    >>> import numpy as np
    >>> idx, first, n = np.array([1, 2, 3, 4]), np.array([0, 16, 32, 48]), np.array([16, 16, 16, 16])
    >>> select_rows(idx, first, n, Selection(log_interval=2, max_samples=20))
    [(16, 32), (48, 52)]
    >>> select_rows(idx, first, n, Selection(last_call=True))
    [(48, 64)]
    """
    kept: list[tuple[int, int]] = []
    budget = selection.max_samples
    for c, start, n in zip(call_index.tolist(), first_row.tolist(), row_count.tolist(), strict=True):
        if selection.log_interval is not None and c % selection.log_interval:
            continue
        if budget is not None:
            if budget <= 0:
                break
            n = min(n, budget)
            budget -= n
        if n > 0:
            kept.append((start, start + n))
    if selection.calls is not None:
        kept = kept[slice(*selection.calls)]
    if selection.last_call:
        kept = kept[-1:]
    return kept
